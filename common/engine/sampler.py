"""Turn one step's logits into next tokens (and logprobs), request by request, in one batched pass.

Order per step (as vLLM): logprobs come from the RAW logits; then logit_bias, the structured-output grammar
mask (common/engine/structured.py), the min_tokens mask, repetition penalty, frequency/presence penalties;
then greedy rows take the argmax, the others apply temperature, top-k, top-p, min-p and sample.

Reproducibility invariant: a row with its own generator draws exactly one uniform from it per step,
whatever the batch holds and however large the vocabulary, and every step of the computation is row-wise,
so the same seed gives the same tokens alone or batched. Sampling is inverse-CDF: the first token whose
cumulative probability reaches `u * total`, which picks token i with probability probs[i]. (One draw per
row instead of the exponential race's V draws: V CPU exponentials cost ~1 ms per row at V=49k.)

No host sync and no sort of the vocabulary: `Sampler.sample` only enqueues device work (uploads from pinned
memory); top-k uses ``topk``, top-p a radix select weighted by exact fixed-point probabilities (or a cumsum over
the top-k candidates), min-p compares exp(logit - max), and penalties count token occurrences on the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.engine.device_copy import record_event, to_device, to_host_async
from common.engine.outputs import TokenLogprobs
from common.engine.sampling_params import SamplingParams
from common.engine.structured import GrammarState, apply_grammar_masks

PROMPT_LOGPROBS_CHUNK = 512
"""Positions per log_softmax pass in `compute_prompt_logprobs`, to bound the [chunk, V] temporaries."""


@dataclass
class SamplingRow:
    """One batch row's request state, as the sampler needs it for this step.

    `output_token_ids` are the tokens generated so far that the host has (not counting this step's).
    `pending_token`, with async scheduling, is the newest generated token, still on the device: a one-element
    view of the previous step's sampled ids; it counts after `output_token_ids`. `generator` is the request's own
    CPU generator (seeded requests); None means draw from the sampler's shared generator. `grammar` (a
    structured-output request) says which tokens may come next; its request's tokens are all on the host.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    pending_token: torch.Tensor | None = None
    grammar: GrammarState | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + (self.pending_token is not None)


@dataclass
class SamplerOutput:
    """Per row: the chosen token, and its logprobs when the row asked for them (else None)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class PendingSample:
    """One step's sampled tokens (and logprob facts) still on the device, their copies to the host under way.

    ``token_ids`` ([R] int64 on the device) can feed the next step before the host has seen it. ``result()``
    waits for the copies only, never for work enqueued after them (async scheduling launches the next step
    before it reads this one).
    """

    def __init__(self, token_ids: torch.Tensor, logprobs: _LogprobTensors | None, rows: Sequence[SamplingRow]) -> None:
        self.token_ids = token_ids
        self._counts = [row.params.logprobs or 0 for row in rows]
        self._logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        self._host = to_host_async([token_ids, *(logprobs or ())])
        self._done = record_event(token_ids.device)
        self._output: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        """The tokens on the host (waits for their copies the first time; later calls return the same output)."""
        if self._output is None:
            self._output = self._read()
        return self._output

    def _read(self) -> SamplerOutput:
        if self._done is not None:
            self._done.synchronize()
        token_ids, *logprob_tensors = self._host
        logprobs: list[TokenLogprobs | None] = [None] * len(self._counts)
        if logprob_tensors:
            counts = [self._counts[i] for i in self._logprob_rows]
            for i, entry in zip(self._logprob_rows, _logprob_entries(logprob_tensors, counts), strict=True):
                logprobs[i] = entry
        return SamplerOutput(token_ids.tolist(), logprobs)


class Sampler:
    """Stateless apart from the shared generator, which the engine owns and seeds.

    The caller's logits are never modified: processing works on a copy, made only when some row needs it.
    An all-greedy batch without processing is a single argmax.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self._generator = generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        return self.sample(logits, rows).result()

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> PendingSample:
        """Enqueue the sampling of every row; the host does not wait for the device here."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        processed = apply_logits_processors(logits, rows)
        token_ids = self._choose(processed, rows)
        return PendingSample(token_ids, _row_logprob_tensors(logits, token_ids, rows), rows)

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Argmax for greedy rows, a random draw for the others; returns [B] int64 on logits' device."""
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        subset = [rows[i] for i in random_rows]
        if len(random_rows) == len(rows):
            return self._sample(logits, subset)
        token_ids = logits.argmax(dim=-1)
        index = _long(random_rows, logits)
        token_ids[index] = self._sample(logits[index], subset)
        return token_ids

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then inverse-CDF sampling with one uniform per row (in float32)."""
        logits = logits.float()
        temperatures = _column([row.params.temperature for row in rows], logits)
        probs = filter_min_p(filter_top_k_top_p(logits / temperatures, rows), rows).softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        targets = self._uniforms(rows, logits.device).unsqueeze(1) * cdf[:, -1:]
        return torch.searchsorted(cdf, targets).squeeze(1).clamp_(max=logits.shape[1] - 1)

    def _uniforms(self, rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
        """[R] uniforms in (0, 1]: one draw from each seeded row's generator, the rest from the shared one.

        Exactly one draw per row per step keeps a seeded row's stream independent of the batch and the
        vocabulary; excluding 0 means a zero-probability token at the start of the CDF is never chosen.
        """
        uniforms = torch.empty(len(rows))
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            uniforms[shared] = _uniform((len(shared),), self._generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                uniforms[i] = _uniform((1,), row.generator)
        return to_device(uniforms, device)


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform samples in (0, 1] drawn on the generator's device, returned on the CPU."""
    return (1.0 - torch.rand(shape, generator=generator, device=generator.device)).cpu()


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return _floats(values, like).unsqueeze(1)


# -- logits processors (before the greedy/random split) ------------------------------------------------


def apply_logits_processors(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logit_bias, grammar masks, min_tokens mask, repetition and frequency/presence penalties.

    Returns `logits` itself when no row needs any of them (argmax needs no float32 copy of a bf16 [B, V]: at batch
    256 x 128k vocabulary that copy was 196 MB of traffic a step), else a processed float32 copy.
    """
    if not any(_needs_processing(row) for row in rows):
        return logits
    out = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    apply_logit_bias(out, rows)
    apply_grammar_masks(out, [row.grammar for row in rows], [_min_tokens_stops(row) for row in rows])
    apply_min_tokens(out, rows)
    apply_penalties(out, rows)
    return out


def _needs_processing(row: SamplingRow) -> bool:
    params = row.params
    under_min = row.num_output_tokens < params.min_tokens
    return bool(params.logit_bias) or under_min or params.has_penalties or row.grammar is not None


def _min_tokens_stops(row: SamplingRow) -> list[int]:
    """The ids min_tokens keeps off a grammar row (its mask does it: see ``apply_min_tokens``)."""
    if row.grammar is None or row.num_output_tokens >= row.params.min_tokens:
        return []
    return sorted(row.eos_token_ids | set(row.params.stop_token_ids))


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: add each row's logit_bias to its logits (ids outside the vocab are skipped)."""
    vocab = logits.shape[1]
    entries = [
        (i, token_id, bias)
        for i, row in enumerate(rows)
        for token_id, bias in (row.params.logit_bias or {}).items()
        if token_id < vocab
    ]
    if entries:
        row_idx, token_idx, biases = zip(*entries, strict=True)
        index = (_long(row_idx, logits), _long(token_idx, logits))
        logits.index_put_(index, _floats(biases, logits), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: while a row has fewer than min_tokens outputs, its EOS and stop token ids get -inf.

    EOS is masked even for ignore_eos rows: min_tokens promises that many tokens before any stop. Rows with a
    grammar are left to their mask, which keeps those ids off unless the grammar allows nothing else (so a
    complete JSON value still ends rather than sampling from an all -inf row).
    """
    vocab = logits.shape[1]
    entries = [
        (i, token_id)
        for i, row in enumerate(rows)
        if row.num_output_tokens < row.params.min_tokens and row.grammar is None
        for token_id in sorted(row.eos_token_ids | set(row.params.stop_token_ids))
        if token_id < vocab
    ]
    if entries:
        row_idx, token_idx = zip(*entries, strict=True)
        # A device-side fill value: a Python scalar here would be uploaded with a blocking (syncing) copy.
        masked = logits.new_full((len(row_idx),), float("-inf"))
        logits.index_put_((_long(row_idx, logits), _long(token_idx, logits)), masked)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: repetition penalty over prompt+output tokens, then frequency/presence over outputs.

    Repetition (HF/vLLM): a seen token's positive logit is divided by the penalty, a negative one
    multiplied. Frequency/presence (OpenAI): logit -= frequency * count + presence * (count > 0).
    The host only flattens the token ids (one upload per penalty kind); the device counts them and
    updates every occurrence at once (an occurrence's duplicates write the same value), so the cost is
    O(tokens seen) plus, for frequency/presence, one [rows, V] count buffer.
    """
    _apply_repetition_penalty(logits, rows)
    _apply_frequency_presence(logits, rows)


def _apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not chosen:
        return
    row_idx, token_idx = token_occurrences(
        chosen, [(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in chosen], logits
    )
    row_idx, token_idx = _with_pending_tokens(row_idx, token_idx, chosen, [rows[i] for i in chosen], logits)
    penalty = _floats([row.params.repetition_penalty for row in rows], logits)[row_idx]
    values = logits[row_idx, token_idx]
    logits[row_idx, token_idx] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_frequency_presence(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    chosen = [i for i, row in enumerate(rows) if row.params.frequency_penalty or row.params.presence_penalty]
    if not chosen:
        return
    local_rows = list(range(len(chosen)))
    local_idx, token_idx = token_occurrences(local_rows, [(rows[i].output_token_ids,) for i in chosen], logits)
    local_idx, token_idx = _with_pending_tokens(local_idx, token_idx, local_rows, [rows[i] for i in chosen], logits)
    # integer counts by float atomics: exact (below 2**24) whatever order they land in
    flat_idx = local_idx * logits.shape[1] + token_idx
    counts = torch.zeros(len(chosen) * logits.shape[1], dtype=logits.dtype, device=logits.device)
    counts.index_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=logits.dtype))
    row_idx = _long(chosen, logits)[local_idx]
    frequency = _floats([row.params.frequency_penalty for row in rows], logits)[row_idx]
    presence = _floats([row.params.presence_penalty for row in rows], logits)[row_idx]
    logits[row_idx, token_idx] -= frequency * counts[flat_idx] + presence


def token_occurrences(
    row_ids: Sequence[int], sequences: Sequence[tuple[Sequence[int], ...]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (row, token) occurrence in `sequences` (row_ids[j] owns the parts of sequences[j]), duplicates
    included, as row indices and token ids on `like`'s device; ids outside [0, V) are left out.

    Flattened by numpy in C (no per-token Python), uploaded without a host sync.
    """
    lengths = [sum(len(part) for part in parts) for parts in sequences]
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(sequences))
    tokens = np.fromiter(flat, dtype=np.int64, count=sum(lengths))
    owners = np.repeat(np.asarray(row_ids, dtype=np.int64), lengths)
    valid = (tokens >= 0) & (tokens < like.shape[1])
    return to_device(owners[valid], like.device), to_device(tokens[valid], like.device)


def _with_pending_tokens(
    row_idx: torch.Tensor,
    token_idx: torch.Tensor,
    row_ids: Sequence[int],
    rows: Sequence[SamplingRow],
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The occurrences plus each row's token still on the device (row_ids[j] owns rows[j]), gathered there."""
    pending = [(row_id, row.pending_token) for row_id, row in zip(row_ids, rows, strict=True)]
    pending = [(row_id, token) for row_id, token in pending if token is not None]
    if not pending:
        return row_idx, token_idx
    owners = _long([row_id for row_id, _ in pending], like)
    tokens = torch.cat([token.reshape(1).to(torch.long) for _, token in pending])
    return torch.cat([row_idx, owners]), torch.cat([token_idx, tokens])


def _floats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.tensor(list(values), dtype=like.dtype), like.device)


def _long(values: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.tensor(list(values), dtype=torch.long), like.device)


# -- filters for sampled rows (after temperature) ------------------------------------------------------


def filter_top_k_top_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf; rows without either are untouched.

    Top-k keeps ties with the k-th value. Top-p (over what top-k kept) keeps token i iff the probability of
    the tokens with a strictly larger logit is below p: the smallest set of most likely tokens whose
    probability reaches p, the most likely token always, and every token tied with the last one kept (equal
    logits are kept or dropped together, where a sort would split them). Nothing sorts the vocabulary and
    nothing waits for the device: see `_top_p_threshold` and `_top_p_threshold_from_candidates`.
    """
    chosen = [i for i, row in enumerate(rows) if row.params.uses_top_k or row.params.top_p < 1.0]
    if not chosen:
        return logits
    vocab = logits.shape[1]
    ks = [rows[i].params.top_k if rows[i].params.uses_top_k else vocab for i in chosen]
    ps = [rows[i].params.top_p for i in chosen]
    every_row = len(chosen) == len(rows)
    block = logits if every_row else logits[_long(chosen, logits)]
    top_k = None
    if min(ks) < vocab:  # decided from the host's values: no device sync
        block, top_k = _top_k(block, ks)
    if min(ps) < 1.0:
        block = _top_p(block, ps, top_k if max(ks) < vocab else None)
    if every_row:
        return block
    out = logits.clone()
    out[_long(chosen, logits)] = block
    return out


@dataclass
class _TopK:
    """What top-k leaves for top-p: `largest` [R, max_k] descending, -inf past the kept ones; `kth` [R, 1]."""

    largest: torch.Tensor
    kth: torch.Tensor


def _top_k(logits: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, _TopK]:
    """Top-k with ``topk`` (ties with the k-th value kept); rows with k >= V keep everything."""
    vocab = logits.shape[1]
    max_k = max(k for k in ks if k < vocab)
    largest = logits.topk(max_k, dim=-1).values
    kth = largest.gather(1, _long([min(k, max_k) - 1 for k in ks], logits).unsqueeze(1))
    kth = torch.minimum(kth, _column([float("-inf") if k >= vocab else float("inf") for k in ks], logits))
    return logits.masked_fill(logits < kth, float("-inf")), _TopK(
        largest.masked_fill(largest < kth, float("-inf")), kth
    )


def _top_p(logits: torch.Tensor, ps: Sequence[float], top_k: _TopK | None) -> torch.Tensor:
    """Top-p per row (rows with p >= 1 keep everything); `top_k` when every row has one (a cheaper path)."""
    p = _column(ps, logits)
    scale = 2.0 ** (62 - logits.shape[1].bit_length())
    if top_k is None:
        threshold = _top_p_threshold(logits, p, scale)
    else:
        threshold = _top_p_threshold_from_candidates(logits, top_k, p, scale)
    if max(ps) >= 1.0:  # from the host's values; those rows keep even tokens of negligible mass
        threshold = threshold.masked_fill(p >= 1.0, float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


TOP_P_TOLERANCE = 2.0**-24
"""Float32 resolution: a nucleus whose probability is this close below p counts as reaching p (so 0.5 + 0.5
split at p=0.5 keeps one token, whichever way the float32 probabilities round)."""

RADIX_SMALL_VOCAB = 1 << 14
"""Below this vocabulary size the top-p radix select takes 8 bits per pass (4 passes of 256 bins), else 16 (2
passes of 65536 bins): a 65536-bin histogram per row would cost more than the row itself."""


def _fixed_point_mass(logits: torch.Tensor, row_max: torch.Tensor, scale: float) -> torch.Tensor:
    """int64 floor(exp(logit - row max) * scale): unnormalized probabilities whose sums are exact integers.

    Exact sums do not depend on summation order (the same alone or batched, under atomics or not); the
    scale 2**(62 - bits(V)) keeps a row's total below 2**62 and its rounding below V * 2**-45 of the top.
    """
    return (logits - row_max).exp_().mul_(scale).long()


def _mass_needed(p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """[R]: a token is kept iff the mass strictly above it is below this (at least 1: the top is kept)."""
    # above < (p - tol) * total  <=>  above < ceil((p - tol) * total), above being an integer
    return ((p.squeeze(1).double() - TOP_P_TOLERANCE) * total).ceil().long().clamp_(min=1)


def _top_p_threshold(logits: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """[R, 1]: the smallest kept logit, by a radix select weighted by mass (no sort, no host sync).

    Passes over the logits' order-preserving keys (as unsigned 32 bits), most significant digit first
    (two 16-bit digits, or four 8-bit ones for small vocabularies): each histograms the fixed-point mass
    of the tokens matching the digits chosen so far (one ``scatter_add_``) and picks the lowest digit whose
    mass above stays below what p needs. Every comparison is on exact integers.
    """
    keys = sortable_keys(logits).long() + 2**31
    mass = _fixed_point_mass(logits, logits.amax(dim=-1, keepdim=True), scale)
    need = _mass_needed(p, mass.sum(dim=-1))
    bits = 8 if logits.shape[1] < RADIX_SMALL_VOCAB else 16
    prefix, mass_above = torch.zeros_like(need), torch.zeros_like(need)
    for shift in range(32 - bits, -1, -bits):
        leading = keys >> shift  # the digits chosen so far, then this pass's digit
        if shift < 32 - bits:
            mass = mass.masked_fill_((leading >> bits) != prefix.unsqueeze(1), 0)
        digit, mass_above = _radix_pass(leading & ((1 << bits) - 1), mass, mass_above, need, 1 << bits)
        prefix = (prefix << bits) + digit
    return key_to_float(prefix - 2**31).unsqueeze(1)


def _radix_pass(
    digits: torch.Tensor, mass: torch.Tensor, mass_above: torch.Tensor, need: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest digit whose tokens are kept (mass in higher digits plus `mass_above` below `need`), and
    the mass strictly above that digit (plus `mass_above`)."""
    histogram = torch.zeros(mass.shape[0], bins, dtype=torch.long, device=mass.device)
    histogram.scatter_add_(1, digits, mass)
    # mass in digits > d: total - (mass in digits <= d)
    above = (mass_above + histogram.sum(dim=-1)).unsqueeze(1) - histogram.cumsum(dim=-1)
    digit = (above >= need.unsqueeze(1)).sum(dim=-1)  # above is non-increasing: the count is the first kept
    digit.clamp_(max=bins - 1)  # a no-op unless the row had NaN logits: keep the gather in bounds
    return digit, above.gather(1, digit.unsqueeze(1)).squeeze(1)


def _top_p_threshold_from_candidates(logits: torch.Tensor, top_k: _TopK, p: torch.Tensor, scale: float) -> torch.Tensor:
    """[R, 1]: the smallest kept logit when every row has a top-k: the kept tokens are ``top_k.largest``
    (already sorted) plus any further ties with the k-th value, so a cumsum over max_k values decides.

    Same fixed-point masses and totals as `_top_p_threshold`, hence the same result, without the
    vocabulary-wide passes (one count of the kept tokens aside).
    """
    largest = top_k.largest
    mass = _fixed_point_mass(largest, largest[:, :1], scale)
    kept_candidates = (largest >= top_k.kth).sum(dim=-1, keepdim=True).clamp_(min=1)  # >= 1 unless NaN
    tied_beyond = (logits >= top_k.kth).sum(dim=-1, keepdim=True) - kept_candidates
    kth_mass = mass.gather(1, kept_candidates - 1)
    total = mass.sum(dim=-1) + (tied_beyond * kth_mass).squeeze(1)
    above = mass.cumsum(dim=-1) - mass  # a tie's first member has the mass strictly above the tie
    kept = above < _mass_needed(p, total).unsqueeze(1)
    return largest.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)


def sortable_keys(logits: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered exactly as the float32 values (-0.0 equals 0.0, -inf lowest; no NaN expected)."""
    bits = (logits.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def key_to_float(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of `sortable_keys` (the flip is its own inverse)."""
    bits = keys.int()
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)


def filter_min_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Set logits whose probability is below min_p * (the row's top probability) to -inf.

    probs[i] / max(probs) = exp(logits[i] - max(logits)): no softmax (no normalizing pass) needed.
    """
    chosen = [i for i, row in enumerate(rows) if row.params.min_p > 0.0]
    if not chosen:
        return logits
    every_row = len(chosen) == len(rows)
    block = logits if every_row else logits[_long(chosen, logits)]
    relative = (block - block.amax(dim=-1, keepdim=True)).exp_()
    block = block.masked_fill(relative < _column([rows[i].params.min_p for i in chosen], logits), float("-inf"))
    if every_row:
        return block
    out = logits.clone()
    out[_long(chosen, logits)] = block
    return out


# -- logprobs (from the raw logits) --------------------------------------------------------------------


# For the rows that asked, on the device: [R] token ids, [R] their logprobs, [R] ranks, [R, K] top values, top ids
_LogprobTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _row_logprob_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> _LogprobTensors | None:
    """Logprob facts of the rows that asked for them (in row order), still on the device."""
    chosen = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not chosen:
        return None
    counts = [rows[i].params.logprobs or 0 for i in chosen]
    if len(chosen) == len(rows):
        return _logprob_tensors(logits.float(), token_ids, max(counts))
    index = _long(chosen, logits)
    return _logprob_tensors(logits[index].float(), token_ids[index], max(counts))


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int], k: int) -> list[TokenLogprobs]:
    """Logprob, rank and top-k of each prompt token under the logits of the position before it.

    `logits[j]` is the model's output at prompt position j and `next_token_ids[j]` the token at j + 1,
    so both have the same length. Works in chunks to bound memory on long prompts.
    """
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(f"logits must be [len(next_token_ids)={len(next_token_ids)}, V], got {tuple(logits.shape)}")
    result: list[TokenLogprobs] = []
    for start in range(0, logits.shape[0], PROMPT_LOGPROBS_CHUNK):
        chunk = logits[start : start + PROMPT_LOGPROBS_CHUNK].float()
        ids = _long(next_token_ids[start : start + PROMPT_LOGPROBS_CHUNK], chunk)
        result.extend(_token_logprobs(chunk, ids, [k] * chunk.shape[0]))
    return result


def _token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, counts: Sequence[int]) -> list[TokenLogprobs]:
    """Raw log_softmax facts for the given token per row; `counts[i]` top alternatives for row i."""
    return _logprob_entries([t.cpu() for t in _logprob_tensors(logits, token_ids, max(counts))], counts)


def _logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, max_count: int) -> _LogprobTensors:
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(min(max_count, logprobs.shape[1]), dim=-1)
    return token_ids, chosen, ranks, top_values, top_ids


def _logprob_entries(host: Sequence[torch.Tensor], counts: Sequence[int]) -> list[TokenLogprobs]:
    """TokenLogprobs per row from ``_logprob_tensors``' host copies."""
    token_ids, chosen, ranks, top_values, top_ids = host
    rows = zip(token_ids.tolist(), chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), strict=True)
    return [
        TokenLogprobs(token_id, logprob, rank, tuple(zip(ids[:count], values[:count], strict=True)))
        for (token_id, logprob, rank, ids, values), count in zip(rows, counts, strict=True)
    ]
