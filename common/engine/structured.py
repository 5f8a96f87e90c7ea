"""Constrained decoding: compiled grammars (cached), each sample's place in its grammar, token masks on the logits.

Library: xgrammar. ``benchmarks/structured_bench.py`` measured it against llguidance on our workload (SmolLM2's
49,152-token vocabulary, a typical nested JSON schema, 2 CPU threads): per-step mask time 0.010 ms (xgrammar) vs
0.044 ms (llguidance) at batch 1 and 0.58 vs 1.85 ms at batch 64 (masks and token accepts together); schema
compile 25 ms vs 1.3 ms (benchmarks/RESULTS.md). xgrammar pays once per distinct schema (cached here) to
precompute its token masks and then wins every decode step, which is where the TPOT budget is spent; it also
forks matchers (n > 1), has a Triton kernel that applies the bitmask to CUDA logits, and is vLLM's default.

Invariants:
- ``GrammarState`` has accepted its request's output tokens so far, and with async scheduling possibly the one
  token still on its way to the host: step N+1's sampling (launched after its forward is enqueued, before the
  host applies step N) waits for step N's tokens and brings each matcher up to them, so the masks follow every
  token while the forward runs; ``Request.append_output_token`` then catches up, a no-op for a token already
  accepted. Preemption recomputes KV but keeps the output tokens, so the state stays right and needs no
  rollback. A sample that step N stops is still in step N+1; its terminated grammar gets no mask and the
  token is dropped when step N+1 is applied. A resumed request (decode pool, migration) rebuilds its state
  by accepting the tokens generated elsewhere.
- Masks are filled on the host from the states as they are when the step is sampled, applied to a copy of the
  logits on the logits' device (logprobs stay from the raw logits), and never inside a captured CUDA graph.
- A compile failure is a ValueError naming the constraint and the problem; nothing is cached for it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from common.engine.device_copy import to_device
from common.engine.sampling_params import StructuredOutputs

GRAMMAR_CACHE_SIZE = 256
"""Compiled grammars kept (least recently used first out); a typical JSON schema's takes about 0.3 MB at V=49k."""

GRAMMAR_CACHE_BYTES = 256 * 2**20
"""...and at most this much host memory in all (the newest one is kept whatever its size)."""

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""``json_object`` (OpenAI's response_format) means any JSON object, as vLLM compiles it."""

_NATIVE_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _xgrammar():
    # Imported on first use: engines that never see a constraint do not need the library (or its import time).
    import xgrammar

    return xgrammar


class GrammarState:
    """One sample's matcher: what its grammar allows next, given the tokens it has accepted.

    ``num_accepted`` counts the sample's output tokens accepted so far, so the same tokens can be offered twice
    (``catch_up``): with async scheduling the next step's sampling accepts the newest token before the host has
    appended it, and the append then finds it already accepted.
    """

    def __init__(self, matcher, num_accepted: int = 0) -> None:
        self._matcher = matcher
        self.num_accepted = num_accepted

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False (state unchanged) when the grammar does not allow it."""
        if not self._matcher.accept_token(token_id):
            return False
        self.num_accepted += 1
        return True

    def catch_up(self, output_token_ids: Sequence[int]) -> bool:
        """Accept the tokens of ``output_token_ids`` past ``num_accepted``; False at the first one the grammar
        refuses (the state stays before it)."""
        for token_id in output_token_ids[self.num_accepted :]:
            if self._matcher.is_terminated() or not self.accept(token_id):
                return False
        return True

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    def fork(self) -> GrammarState:
        """An independent copy at the same place (another sample of the same request)."""
        return GrammarState(self._matcher.fork(), self.num_accepted)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (bit t of word t // 32 set: token t allowed)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer and vocabulary; keeps the most recently used compiled grammars,
    at most ``cache_size`` of them and ``cache_bytes`` in all.

    The cache key is (kind, spec text): the same schema from any request reuses one compile. The tokenizer's
    token table (0.3-0.75 s at V=49k) is built by ``prepare_in_background`` while the engine starts, else on
    the first compile, which would stall every running stream of the engine loop that long.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        cache_size: int = GRAMMAR_CACHE_SIZE,
        cache_bytes: int = GRAMMAR_CACHE_BYTES,
        max_threads: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.max_threads = max_threads
        self._compiler = None
        self._preparing: threading.Thread | None = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar for ``spec`` (from the cache when seen before); ValueError naming the problem."""
        key = cache_key(spec)
        compiled = self._cache.get(key)
        if compiled is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return compiled
        self.misses += 1
        compiled = self._compile(spec)
        self._cache[key] = compiled
        self.cached_bytes += compiled.memory_size_bytes
        while len(self._cache) > 1 and (len(self._cache) > self.cache_size or self.cached_bytes > self.cache_bytes):
            self.cached_bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
        return compiled

    def new_state(self, spec: StructuredOutputs, accepted: Sequence[int] = ()) -> GrammarState:
        """A fresh matcher for ``spec`` that has accepted ``accepted`` (tokens generated before, e.g. by the
        prefill worker or a decode worker that failed); ValueError when one of them breaks the grammar."""
        state = GrammarState(_xgrammar().GrammarMatcher(self.compile(spec)))
        for position, token_id in enumerate(accepted):
            if state.is_terminated or not state.accept(token_id):
                raise ValueError(
                    f"output_token_ids: token {token_id} at position {position} does not follow the "
                    f"structured_outputs {spec.kind} constraint"
                )
        return state

    def _compile(self, spec: StructuredOutputs):
        compiler = self._xgrammar_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                return compiler.compile_json_schema(spec.json, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(_grammar(spec.grammar))
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"structured_outputs.{kind}: {_describe(error)}") from None

    def prepare_in_background(self) -> None:
        """Build the token table on a daemon thread now (no-op without a tokenizer). A failure there is not
        raised: the first compile builds it again and raises then."""
        if self.tokenizer is None or self._compiler is not None or self._preparing is not None:
            return
        self._preparing = threading.Thread(target=self._prepare, name="grammar-tokenizer-info", daemon=True)
        self._preparing.start()

    def _prepare(self) -> None:
        with contextlib.suppress(Exception):
            self._xgrammar_compiler()

    def _xgrammar_compiler(self):
        preparing = self._preparing
        if preparing is not None and preparing is not threading.current_thread():
            preparing.join()
            self._preparing = None
        if self._compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs: this model was loaded without a tokenizer")
            xgr = _xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=False)
        return self._compiler


def cache_key(spec: StructuredOutputs) -> tuple[str, str]:
    kind = spec.kind
    if kind == "choice":
        return kind, json.dumps(list(spec.choice))
    if kind == "json_object":
        return kind, ""
    return kind, getattr(spec, kind)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly ``choices`` (JSON string escapes are valid EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _grammar(text: str):
    """EBNF (GBNF: rules written ``name ::= ...``, root rule ``root``) or else Lark (``start: ...``), as vLLM."""
    xgr = _xgrammar()
    if "::=" in text:
        return xgr.Grammar.from_ebnf(text)
    return xgr.Grammar.from_lark(text)


def _describe(error: Exception) -> str:
    """The library's message without its native source location (it names the problem already)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return _NATIVE_ERROR_PREFIX.sub("", lines[0] if lines else type(error).__name__) + "".join(
        f"; {line.strip()}" for line in lines[1:3]
    )


# -- masks on the logits -------------------------------------------------------------------------------------


def apply_grammar_masks(
    logits: torch.Tensor,
    states: Sequence[GrammarState | None],
    blocked: Sequence[Sequence[int]] = (),
) -> None:
    """In place: -inf on every token the row's grammar does not allow next (rows whose state is None are left).

    ``blocked[i]`` (optional) lists tokens row i should not take while its grammar allows anything else (the
    min_tokens stop ids): cleared from the row's mask unless that would leave nothing. The mask is filled on the
    host, uploaded without a host sync, and applied by xgrammar's kernel on the logits' device.
    """
    # A terminated grammar's row is a sample whose request ends when the host applies its previous step (async
    # scheduling launched this one first): whatever it samples is dropped, so it gets no mask.
    rows = [i for i, state in enumerate(states) if state is not None and not state.is_terminated]
    if not rows:
        return
    vocab = logits.shape[1]
    bitmask = torch.full((len(states), (vocab + 31) // 32), -1, dtype=torch.int32)
    for i in rows:
        states[i].fill(bitmask, i)
        if blocked and blocked[i]:
            _clear_unless_empty(bitmask[i].numpy(), blocked[i], vocab)
    _xgrammar().apply_token_bitmask_inplace(logits, to_device(bitmask, logits.device), vocab_size=vocab)


def _clear_unless_empty(words: np.ndarray, token_ids: Sequence[int], vocab: int) -> None:
    ids = np.asarray([t for t in token_ids if 0 <= t < vocab], dtype=np.int64)
    if not len(ids):
        return
    cleared = words.copy()
    np.bitwise_and.at(cleared, ids // 32, ~(np.int32(1) << (ids % 32).astype(np.int32)))
    if cleared.any():
        words[:] = cleared


def allowed_token_ids(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    """The tokens a bitmask row allows (for tests and debugging)."""
    words = bitmask_row.numpy().view(np.uint32)
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return [int(t) for t in np.flatnonzero(bits.reshape(-1)[:vocab])]
