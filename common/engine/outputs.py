"""Typed results the engine hands back: per-token logprobs, completions and whole requests.

The layout follows vLLM's `vllm.outputs` so code written against vLLM reads ours unchanged:
`CompletionOutput.logprobs` is a list with one `{token_id: Logprob}` dict per generated token, and
`RequestOutput.prompt_logprobs` starts with `None` (the first prompt token has no preceding position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Logprob:
    """One entry of a vLLM-style logprobs dict: the log-probability, its 1-based rank and the text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob facts for one chosen token, taken from the raw (unprocessed) logits.

    Invariants: `rank` is 1-based among the whole vocabulary (1 = most likely); `top` holds the
    requested number of alternatives as (token_id, logprob) pairs sorted by logprob, highest first
    (it may or may not contain `token_id`).
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()

    def to_dict(self, decode: Callable[[int], str] | None = None) -> dict[int, Logprob]:
        """vLLM's per-position dict: the chosen token plus the top alternatives (ranks 1..k).

        The chosen token comes first; it appears once even when it is also among the top alternatives.
        `decode`, when given, fills `decoded_token` for each entry.
        """
        entries = {self.token_id: Logprob(self.logprob, self.rank)}
        for rank, (token_id, logprob) in enumerate(self.top, start=1):
            entries.setdefault(token_id, Logprob(logprob, rank))
        if decode is not None:
            for token_id, entry in entries.items():
                entry.decoded_token = decode(token_id)
        return entries


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request, as it stands now (it grows while streaming)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        """True once the completion has a finish reason; it never changes afterwards."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything a caller sees of one request: the prompt, its completions and whether it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # Prefill workers only: the finished request's KV for its computed tokens, gathered out of the
    # paged cache ([layers, 2, blocks, block_size, kv_heads, head_dim]) before its blocks were freed.
    exported_kv: Any = None
