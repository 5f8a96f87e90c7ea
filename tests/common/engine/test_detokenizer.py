"""Incremental detokenization against the real SmolLM2 tokenizer, and stop-string matching."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.engine.detokenizer import IncrementalDetokenizer, StopMatch, StopStringMatcher

VOCAB = 49152
PROMPTS = ["", "Hello", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Café 😀 東京"]
PIECES = ["😀", "🇫🇷", "👩‍💻", "東京", "漢字", "é", "ñ", "Ünïcödé", " ", "\n", "abc", " the", "!", "Ω≈ç√"]


def detokenize(
    tokenizer: Any, prompt_ids: list[int], output_ids: list[int], skip: bool = True, chunk: int = 1
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed `output_ids` `chunk` at a time; return the detokenizer (flushed) and every emitted piece."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip, True)
    pieces = [detok.append(output_ids[i : i + chunk]) for i in range(0, len(output_ids), chunk)]
    pieces.append(detok.flush())
    return detok, pieces


def test_random_vocab_sequences_match_full_decode(smollm2_tokenizer: Any) -> None:
    """Seeded loop over arbitrary token ids (including special tokens and broken UTF-8 bytes)."""
    rng = random.Random(0)
    for trial in range(300):
        prompt_ids = smollm2_tokenizer.encode(rng.choice(PROMPTS))
        output_ids = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 25))]
        if trial % 3 == 0:
            output_ids[rng.randrange(len(output_ids))] = rng.randrange(17)  # a special/added token
        skip = trial % 2 == 0
        detok, pieces = detokenize(smollm2_tokenizer, prompt_ids, output_ids, skip, chunk=1 + trial % 3)
        expected = smollm2_tokenizer.decode(output_ids, skip_special_tokens=skip)
        assert detok.text == "".join(pieces) == expected, (prompt_ids, output_ids, skip)
        assert detok.output_token_ids == output_ids


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=12),
    prompt=st.sampled_from(PROMPTS),
)
def test_text_with_multibyte_characters_roundtrips(smollm2_tokenizer: Any, pieces: list[str], prompt: str) -> None:
    text = "".join(pieces)
    output_ids = smollm2_tokenizer.encode(text)
    detok, emitted = detokenize(smollm2_tokenizer, smollm2_tokenizer.encode(prompt), output_ids)
    assert detok.text == text == smollm2_tokenizer.decode(output_ids)
    assert emitted[-1] == ""  # valid text never needs the final flush
    assert all("\ufffd" not in piece for piece in emitted)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("😀", ["Hi", "", " 😀"]),
        ("東京", ["Hi", "", "", " 東", "", "京"]),
        ("🇫🇷", ["Hi", "", "", " 🇫", "", "", "🇷"]),
        ("é", ["Hi", " é"]),
    ],
)
def test_multibyte_character_split_across_tokens_is_held_back(
    smollm2_tokenizer: Any, text: str, expected: list[str]
) -> None:
    """Pieces per token: "" while the bytes so far end mid-character, then the whole character."""
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], True, True)
    emitted = [detok.append([token]) for token in smollm2_tokenizer.encode("Hi " + text)]
    assert emitted == expected
    assert detok.flush() == ""
    assert detok.text == "Hi " + text


def test_emoji_bytes_held_until_complete(smollm2_tokenizer: Any) -> None:
    ids = smollm2_tokenizer.encode("Hello 😀")  # 'Hello', ' \xf0\x9f\x98', '\x80'
    assert len(ids) == 3
    detok = IncrementalDetokenizer(smollm2_tokenizer, smollm2_tokenizer.encode("Say hi:"), True, True)
    assert [detok.append([t]) for t in ids] == ["Hello", "", " 😀"]
    assert detok.flush() == ""


def test_flush_emits_incomplete_tail(smollm2_tokenizer: Any) -> None:
    ids = smollm2_tokenizer.encode("ok 😀")[:-1]  # cut the emoji's last byte
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], True, True)
    assert "".join(detok.append([t]) for t in ids) == "ok"
    assert detok.flush() == smollm2_tokenizer.decode(ids)[len("ok") :]
    assert detok.text == smollm2_tokenizer.decode(ids)
    assert detok.flush() == ""


def test_special_tokens_skipped_or_kept(smollm2_tokenizer: Any) -> None:
    ids = [1, *smollm2_tokenizer.encode("Hi"), 2]
    assert detokenize(smollm2_tokenizer, [], ids, skip=True)[0].text == "Hi"
    assert detokenize(smollm2_tokenizer, [], ids, skip=False)[0].text == "<|im_start|>Hi<|im_end|>"


def test_leading_space_of_first_output_token_kept(smollm2_tokenizer: Any) -> None:
    prompt = smollm2_tokenizer.encode("The capital of France is")
    detok, _ = detokenize(smollm2_tokenizer, prompt, smollm2_tokenizer.encode(" Paris."))
    assert detok.text == " Paris."


# -- stop strings ----------------------------------------------------------------------------------------


def stream_until_stop(tokenizer: Any, text: str, matcher: StopStringMatcher) -> tuple[StopMatch | None, list[str], str]:
    """Detokenize `text` token by token with stop checks and holdback; return match, streamed, final."""
    detok = IncrementalDetokenizer(tokenizer, [], True, True)
    streamed: list[str] = []
    sent = 0
    for token in tokenizer.encode(text):
        delta = detok.append([token])
        match = matcher.check(detok.text, len(delta))
        if match is not None:
            streamed.append(match.text[sent:])
            return match, streamed, match.text
        safe = len(detok.text) - matcher.holdback(detok.text)
        streamed.append(detok.text[sent:safe])
        sent = max(sent, safe)
    final = detok.text + detok.flush()
    streamed.append(final[sent:])
    return None, streamed, final


def test_stop_string_spanning_tokens_is_found(smollm2_tokenizer: Any) -> None:
    matcher = StopStringMatcher(("capital of France",), include_stop_str_in_output=False)
    match, streamed, final = stream_until_stop(smollm2_tokenizer, "What is the capital of France? Paris", matcher)
    assert match == StopMatch(text="What is the ", stop="capital of France")
    assert "".join(streamed) == final == "What is the "


def test_include_stop_str_in_output(smollm2_tokenizer: Any) -> None:
    matcher = StopStringMatcher(("France?",), include_stop_str_in_output=True)
    match, streamed, _ = stream_until_stop(smollm2_tokenizer, "What is the capital of France? Paris", matcher)
    assert match == StopMatch(text="What is the capital of France?", stop="France?")
    assert "".join(streamed) == match.text


def test_stop_string_inside_multibyte_text(smollm2_tokenizer: Any) -> None:
    matcher = StopStringMatcher(("京",), include_stop_str_in_output=False)
    match, _, _ = stream_until_stop(smollm2_tokenizer, "Tokyo is 東京 in Japanese", matcher)
    assert match == StopMatch(text="Tokyo is 東", stop="京")


def test_earliest_stop_wins_and_ties_prefer_first_listed() -> None:
    matcher = StopStringMatcher(("world", "lo w", "lo"), include_stop_str_in_output=False)
    assert matcher.check("hello world", new_char_count=11) == StopMatch("hel", "lo w")
    assert StopStringMatcher(("ab", "abc")).check("xxabc", 3) == StopMatch("xx", "ab")


def test_check_only_considers_occurrences_reaching_new_text() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.check("xSTOPabc", new_char_count=3) is None
    assert matcher.check("xSTOPabc", new_char_count=4) == StopMatch("x", "STOP")
    assert matcher.check("xSTOP", new_char_count=0) is None
    assert StopStringMatcher(()).check("anything", 8) is None


def test_holdback_counts_partial_stop_prefix() -> None:
    matcher = StopStringMatcher(("world", "!!!"))
    assert matcher.holdback("hello wor") == 3
    assert matcher.holdback("hello w") == 1
    assert matcher.holdback("hello!!") == 2
    assert matcher.holdback("hello") == 0
    assert matcher.holdback("") == 0
    assert StopStringMatcher(("ab", "aab")).holdback("xaa") == 2


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.text(alphabet="abc", min_size=0, max_size=3), min_size=1, max_size=15),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_streamed_text_never_shows_removed_stop_prefix(chunks: list[str], stops: list[str], include: bool) -> None:
    """Streaming with holdback never takes text back; the cut is at the first stop occurrence."""
    matcher = StopStringMatcher(tuple(stops), include)
    text, sent, match = "", 0, None
    for chunk in chunks:
        text += chunk
        match = matcher.check(text, len(chunk))
        if match is not None:
            break
        sent = max(sent, len(text) - matcher.holdback(text))
        assert sent <= len(text)
    final = match.text if match is not None else text
    assert final.startswith(text[:sent])  # nothing already streamed is taken back
    full = "".join(chunks)
    if match is None:
        assert not any(stop in full for stop in stops)
        return
    before = match.text[: len(match.text) - len(match.stop)] if include else match.text
    assert full[len(before) :].startswith(match.stop)
    assert len(before) + len(match.stop) <= len(text)
    assert not any(stop in before for stop in stops)  # the earliest occurrence was chosen
