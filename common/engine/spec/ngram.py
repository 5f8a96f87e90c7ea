"""Prompt lookup (n-gram) proposals for speculative decoding: no draft model, only the sequence itself.

Semantics follow vLLM v1's ``NgramProposer`` (``vllm/v1/spec_decode/ngram_proposer.py``, the KMP search in
``_find_longest_matched_ngram_and_propose_tokens``): the longest n in [min_n, max_n] whose last-n-token suffix
occurs earlier in the sequence wins, and among the occurrences of that n the EARLIEST one is used (vLLM's scan over
the reversed sequence replaces its position on ties, which keeps the leftmost match). ``occurrence="latest"``
picks the most recent occurrence instead. An occurrence must end before the sequence's last token (it may overlap
the suffix), so at least one token follows it; the proposal is the up to k tokens after it, fewer where the
sequence ends first.

The search is vectorized: one comparison of the whole sequence against its last token finds the candidate match
ends, and each further step extends the surviving candidates one token to the left: by whole-slice compares while
many survive (a repetitive sequence), then by indexing only the survivors, so a typical step costs the number of
candidates left rather than the sequence length. No per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Occurrence = Literal["earliest", "latest"]

# Below one live match end in this many positions, indexing the survivors beats comparing every position.
_SPARSE_FRACTION = 32


def propose_ngram(
    token_ids: np.ndarray, num_tokens: int, min_n: int, max_n: int, *, occurrence: Occurrence = "earliest"
) -> list[int]:
    """Up to ``num_tokens`` tokens that followed an earlier occurrence of the sequence's longest matching suffix.

    ``token_ids`` is the whole sequence (prompt + outputs), 1-D integers. Returns [] when ``num_tokens`` <= 0,
    when the sequence has at most ``min_n`` tokens, or when no suffix of length ``min_n``..``max_n`` recurs.
    """
    if not 1 <= min_n <= max_n:
        raise ValueError(f"n-gram bounds must satisfy 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    if occurrence not in ("earliest", "latest"):
        raise ValueError(f"occurrence must be 'earliest' or 'latest', got {occurrence!r}")
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tokens.shape}")
    length = tokens.shape[0]
    if num_tokens <= 0 or length <= min_n:
        return []
    match_ends, matched = _longest_suffix_match_ends(tokens, min(max_n, length - 1))
    if matched < min_n:
        return []
    end = int(match_ends[0] if occurrence == "earliest" else match_ends[-1])
    return tokens[end + 1 : end + 1 + num_tokens].tolist()


def _longest_suffix_match_ends(tokens: np.ndarray, max_n: int) -> tuple[np.ndarray, int]:
    """(ascending last indices of the earlier occurrences of the longest matching suffix, its length <= max_n).

    Only occurrences ending before the last index count; (empty, 0) when the last token never occurred before.
    """
    alive, matched, extensible = _extend_dense(tokens, max_n)
    ends = np.flatnonzero(alive)
    if not extensible:
        return ends, matched
    return _extend_sparse(tokens, ends, matched, max_n)


def _extend_dense(tokens: np.ndarray, max_n: int) -> tuple[np.ndarray, int, bool]:
    """(mask over match ends of the suffix of length `matched`, matched, whether a longer match may exist).

    Compares whole slices while many ends survive (a repetitive sequence): contiguous compares beat indexing them.
    """
    last = tokens.shape[0] - 1
    alive = tokens[:last] == tokens[last]
    count = np.count_nonzero(alive)
    matched = 1 if count else 0
    while 0 < matched < max_n and count * _SPARSE_FRACTION > last:
        longer = np.zeros_like(alive)
        np.logical_and(alive[matched:], tokens[: last - matched] == tokens[last - matched], out=longer[matched:])
        count = np.count_nonzero(longer)
        if count == 0:
            return alive, matched, False
        alive, matched = longer, matched + 1
    return alive, matched, 0 < matched < max_n


def _extend_sparse(tokens: np.ndarray, ends: np.ndarray, matched: int, max_n: int) -> tuple[np.ndarray, int]:
    """Extends the matches of length `matched` ending at `ends` one token to the left at a time, up to max_n."""
    last = tokens.shape[0] - 1
    for length in range(matched, max_n):
        candidates = ends[np.searchsorted(ends, length) :]  # an occurrence cannot start before index 0
        longer = candidates[tokens[candidates - length] == tokens[last - length]]
        if longer.size == 0:
            return ends, length
        ends = longer
    return ends, max_n


class NgramProposer:
    """Proposes up to ``num_speculative_tokens`` draft tokens per sequence by prompt lookup (see ``propose_ngram``).

    Stateless between calls: each call searches the sequence it is given, so it is safe to share across requests.
    """

    def __init__(
        self,
        num_speculative_tokens: int,
        prompt_lookup_min: int,
        prompt_lookup_max: int,
        occurrence: Occurrence = "earliest",
    ) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                "prompt lookup bounds must satisfy 1 <= prompt_lookup_min <= prompt_lookup_max, "
                f"got {prompt_lookup_min} and {prompt_lookup_max}"
            )
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self.occurrence: Occurrence = occurrence

    def propose(self, token_ids: Sequence[int] | np.ndarray, max_tokens: int) -> list[int]:
        """Draft tokens for ``token_ids`` (prompt + outputs), at most ``min(num_speculative_tokens, max_tokens)``.

        ``max_tokens`` is the caller's room left (remaining max_tokens, model length); 0 or less gives [].
        """
        num_tokens = min(self.num_speculative_tokens, max_tokens)
        if num_tokens <= 0:
            return []
        tokens = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids, dtype=np.int64)
        return propose_ngram(
            tokens, num_tokens, self.prompt_lookup_min, self.prompt_lookup_max, occurrence=self.occurrence
        )
