"""Prompt lookup proposals: hand cases for each rule, and random sequences against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest

from common.engine.spec.ngram import NgramProposer, propose_ngram


def reference_ngram(tokens: list[int], num_tokens: int, min_n: int, max_n: int, occurrence: str) -> list[int]:
    """The definition, spelled out: longest n first, then every earlier occurrence of the last n tokens."""
    length = len(tokens)
    if num_tokens <= 0 or length <= min_n:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Occurrence tokens[s:s+n] must end before the last index: s + n - 1 <= length - 2.
        starts = [s for s in range(length - n) if tokens[s : s + n] == tokens[length - n :]]
        if starts:
            start = starts[0] if occurrence == "earliest" else starts[-1]
            return tokens[start + n : start + n + num_tokens]
    return []


def ngram(tokens: list[int], num_tokens: int, min_n: int, max_n: int, occurrence: str = "earliest") -> list[int]:
    return propose_ngram(np.array(tokens, dtype=np.int64), num_tokens, min_n, max_n, occurrence=occurrence)


def test_vllm_docstring_example() -> None:
    # [4, 2, 3] has no earlier occurrence; [2, 3] does, and only three tokens follow it.
    assert ngram([1, 2, 3, 4, 2, 3], 4, 2, 3) == [4, 2, 3]


def test_longest_n_wins_over_a_more_recent_shorter_match() -> None:
    tokens = [5, 6, 7, 100, 101, 9, 7, 200, 201, 5, 6, 7]
    for occurrence in ("earliest", "latest"):
        assert ngram(tokens, 2, 1, 3, occurrence) == [100, 101]
    # With only 1-grams allowed, [7] occurs at 2 and at 6.
    assert ngram(tokens, 2, 1, 1, "earliest") == [100, 101]
    assert ngram(tokens, 2, 1, 1, "latest") == [200, 201]


def test_earliest_occurrence_by_default_latest_on_request() -> None:
    tokens = [1, 2, 10, 1, 2, 20, 1, 2]
    assert ngram(tokens, 1, 2, 2) == [10]
    assert ngram(tokens, 1, 2, 2, "latest") == [20]
    assert NgramProposer(1, 2, 2).propose(tokens, 5) == [10]
    assert NgramProposer(1, 2, 2, occurrence="latest").propose(tokens, 5) == [20]


def test_truncated_where_the_sequence_ends_and_overlap_with_the_suffix_allowed() -> None:
    assert ngram([1, 2, 3, 1, 2], 5, 2, 2) == [3, 1, 2]
    # [7, 7, 7] ending at index 2 overlaps the suffix [7, 7, 7] at 1..3; one token follows it.
    assert ngram([7, 7, 7, 7], 3, 1, 3) == [7]
    assert ngram([7, 7, 7, 7], 3, 1, 2) == [7, 7]
    assert ngram([7, 7, 7, 7], 3, 1, 2, "latest") == [7]


def test_no_match_gives_nothing() -> None:
    assert ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram([3, 1, 2, 3, 2], 3, 1, 3) == [3, 2]  # only [2] recurs (at index 2)
    assert ngram([3, 1, 2, 3, 2], 3, 2, 3) == []  # ... and min_n=2 excludes it


def test_max_n_bounds_the_match_length() -> None:
    tokens = [8, 2, 3, 50, 1, 2, 3, 60, 1, 2, 3]
    assert ngram(tokens, 2, 2, 3) == [60, 1]  # [1, 2, 3] at 4..6
    assert ngram(tokens, 2, 2, 2) == [50, 1]  # [2, 3] first at 1..2


def test_num_tokens_caps_the_proposal() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert ngram(tokens, 1, 2, 2) == [3]
    assert ngram(tokens, 4, 2, 2) == [3, 4, 5, 6]
    assert ngram(tokens, 0, 2, 2) == []
    proposer = NgramProposer(3, 2, 2)
    assert proposer.propose(tokens, 100) == [3, 4, 5]
    assert proposer.propose(tokens, 2) == [3, 4]
    assert proposer.propose(tokens, 0) == []
    assert proposer.propose(tokens, -1) == []


def test_sequences_too_short_to_hold_an_earlier_match() -> None:
    assert ngram([], 3, 1, 3) == []
    assert ngram([5], 3, 1, 3) == []
    assert ngram([5, 5], 3, 1, 3) == [5]
    assert ngram([5, 5], 3, 2, 3) == []  # length <= min_n
    assert ngram([5, 5, 5], 3, 2, 3) == [5]


def test_input_types_and_result_type() -> None:
    tokens = [4, 9, 4, 9, 4]
    expected = ngram(tokens, 3, 1, 3)
    assert propose_ngram(np.array(tokens, dtype=np.int32), 3, 1, 3) == expected
    proposal = NgramProposer(3, 1, 3).propose(tokens, 3)
    assert proposal == expected == [9, 4]
    assert all(type(token) is int for token in proposal)


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="min_n"):
        propose_ngram(np.arange(5), 2, 3, 2)
    with pytest.raises(ValueError, match="min_n"):
        propose_ngram(np.arange(5), 2, 0, 2)
    with pytest.raises(ValueError, match="1-D"):
        propose_ngram(np.zeros((2, 3), dtype=np.int64), 2, 1, 2)
    with pytest.raises(ValueError, match="occurrence"):
        propose_ngram(np.arange(5), 2, 1, 2, occurrence="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(0, 1, 2)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(2, 3, 2)


def _random_sequence(rng: np.random.Generator) -> list[int]:
    """Small vocabularies (many matches: the dense search) and large ones with a copied span (few: the sparse)."""
    vocab = int(rng.choice([1, 2, 3, 5, 50, 1000]))
    tokens = rng.integers(0, vocab, int(rng.integers(0, 120))).tolist()
    if tokens and rng.random() < 0.5:
        start = int(rng.integers(0, len(tokens)))
        tokens += tokens[start : start + int(rng.integers(1, 12))]
    return tokens


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_reference_on_random_sequences(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(400):
        tokens = _random_sequence(rng)
        min_n = int(rng.integers(1, 5))
        max_n = min_n + int(rng.integers(0, 6))
        num_tokens = int(rng.integers(0, 8))
        for occurrence in ("earliest", "latest"):
            expected = reference_ngram(tokens, num_tokens, min_n, max_n, occurrence)
            assert ngram(tokens, num_tokens, min_n, max_n, occurrence) == expected, (tokens, min_n, max_n)


def test_long_sequences_match_reference() -> None:
    rng = np.random.default_rng(7)
    text = rng.integers(0, 32000, 32768)
    text[-6:] = text[1000:1006]  # a planted 6-gram, longer than max_n
    text[-9:-6] = text[997:1000]  # ... extended to 9 tokens
    repetitive = np.tile(rng.integers(0, 32000, 37), 900)[:32768]
    for tokens in (text, repetitive, np.full(32768, 7)):
        for occurrence in ("earliest", "latest"):
            expected = reference_ngram(tokens.tolist(), 5, 2, 8, occurrence)
            assert expected  # every case has a match
            assert propose_ngram(tokens, 5, 2, 8, occurrence=occurrence) == expected
