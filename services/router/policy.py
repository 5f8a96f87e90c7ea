"""Worker selection for the router: filter -> score (0..1) -> pick.

Everything here is pure: no I/O, no Redis, no clocks. The router passes in its registry snapshot (a worker
is alive iff it is in the snapshot) and the prefix-cache hit counts it looked up, and gets back a worker or
``None``. The only state is the picker's tie-break counter, held by the ``Picker`` instance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from common.config import RouterConfig
from common.coord.worker_info import Role, WorkerInfo

_TIE_TOLERANCE = 1e-9  # totals closer than this are equal (float sums depend on the order of terms)


@dataclass(frozen=True)
class RoutingRequest:
    """What the policy needs to know about one request; counts are in the workers' KV blocks.

    Invariants (checked): every count is >= 0; ``prefix_hits`` values are >= 0.
    ``prefix_hits[worker_id]`` is the number of leading prompt blocks already cached on that worker
    (absent = 0). ``exclude`` holds workers that already failed this request; they are never picked again.
    """

    model: str
    num_prompt_tokens: int
    num_blocks_needed: int  # prompt + expected new tokens, in blocks (what a decode worker must reserve)
    num_prompt_blocks: int  # the prompt alone, in blocks (what a prefill worker needs)
    prefix_hits: Mapping[str, int] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        counts = (self.num_prompt_tokens, self.num_blocks_needed, self.num_prompt_blocks)
        if min(counts) < 0 or any(hits < 0 for hits in self.prefix_hits.values()):
            raise ValueError(f"RoutingRequest counts must be >= 0: {self}")

    def hits_on(self, worker: WorkerInfo) -> int:
        """Leading prompt blocks cached on ``worker``, capped at the prompt's length in blocks."""
        return min(self.prefix_hits.get(worker.worker_id, 0), self.num_prompt_blocks)

    def uncached_on(self, worker: WorkerInfo) -> int:
        """Prompt tokens ``worker`` would compute: the prompt minus its cached leading blocks, never below 0."""
        return max(self.num_prompt_tokens - self.hits_on(worker) * worker.block_size, 0)


# ---------------------------------------------------------------------------------------------- filters


class WorkerFilter(Protocol):
    """A yes/no test on one worker. Pure: the same worker and request always give the same answer."""

    @property
    def name(self) -> str: ...

    def __call__(self, worker: WorkerInfo, request: RoutingRequest) -> bool: ...


@dataclass(frozen=True)
class AcceptingWork:
    """Alive and not draining. Alive means present in the snapshot, so only ``draining`` is checked here."""

    name: str = "accepting"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest) -> bool:
        return not worker.draining


@dataclass(frozen=True)
class SameModel:
    """Serves exactly the requested model id (no alias resolution)."""

    name: str = "same_model"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest) -> bool:
        return worker.model == request.model


@dataclass(frozen=True)
class HasRole:
    """Belongs to the pool being picked from."""

    role: Role
    name: str = "role"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest) -> bool:
        return worker.role == self.role


@dataclass(frozen=True)
class HasRoom:
    """Enough free KV blocks: a decode worker must hold prompt + new tokens, a prefill worker only the prompt.

    Cached prefix blocks are not subtracted: a cached block with no users already counts as free, so
    subtracting it would count it twice.
    """

    role: Role
    name: str = "has_room"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest) -> bool:
        needed = request.num_blocks_needed if self.role == "decode" else request.num_prompt_blocks
        return worker.free_blocks >= needed


@dataclass(frozen=True)
class NotExcluded:
    """Has not already failed this request."""

    name: str = "not_excluded"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest) -> bool:
        return worker.worker_id not in request.exclude


def default_filters(role: Role) -> tuple[WorkerFilter, ...]:
    """The filters every candidate of ``role`` must pass, cheapest and most telling first."""
    return (HasRole(role), AcceptingWork(), SameModel(), NotExcluded(), HasRoom(role))


def passes_all(filters: Sequence[WorkerFilter], worker: WorkerInfo, request: RoutingRequest) -> bool:
    """True iff ``worker`` passes every filter."""
    return all(check(worker, request) for check in filters)


# ---------------------------------------------------------------------------------------------- scorers


class WorkerScorer(Protocol):
    """A preference for one worker among ``candidates``. Invariant: returns a value in [0, 1], higher = better."""

    @property
    def name(self) -> str: ...

    def __call__(self, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]) -> float: ...


@dataclass(frozen=True)
class LoadScorer:
    """1 - load / busiest load, where load = running + waiting and busiest covers ``worker`` and ``candidates``.

    All idle -> 1 for everyone; the busiest worker scores 0. ``worker`` need not be among ``candidates``
    (it is counted in the maximum), so the value stays in [0, 1] even for empty ``candidates``.
    """

    name: str = "load"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]) -> float:
        busiest = max((c.load for c in candidates), default=0)
        busiest = max(busiest, worker.load)
        return 1.0 if busiest <= 0 else 1.0 - max(worker.load, 0) / busiest


@dataclass(frozen=True)
class FreeBlocksScorer:
    """free_blocks / total_blocks, clamped to [0, 1]; 0 for a worker that reports no blocks at all."""

    name: str = "free_blocks"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]) -> float:
        if worker.total_blocks <= 0:
            return 0.0
        return min(max(worker.free_blocks / worker.total_blocks, 0.0), 1.0)


@dataclass(frozen=True)
class PrefixHitScorer:
    """Cached leading prompt blocks / prompt blocks (hits capped at the prompt); 0 when the prompt has no blocks."""

    name: str = "prefix_hits"

    def __call__(self, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]) -> float:
        if request.num_prompt_blocks <= 0:
            return 0.0
        return request.hits_on(worker) / request.num_prompt_blocks


def weighted_scorers(config: RouterConfig) -> tuple[tuple[WorkerScorer, float], ...]:
    """The scorers and their weights from ``config``."""
    return (
        (LoadScorer(), config.weight_load),
        (FreeBlocksScorer(), config.weight_free_blocks),
        (PrefixHitScorer(), config.weight_prefix_hits),
    )


# ---------------------------------------------------------------------------------------------- picker


class Picker:
    """Picks the candidate with the highest weighted sum of scores.

    Ties (totals within 1e-9) go round robin over the tied workers sorted by id, driven by a counter this
    instance owns: the same sequence of calls always gives the same picks, and equal workers take turns.
    Weights must be >= 0 and finite, so a higher score never hurts. Not thread safe (one per event loop).
    """

    def __init__(self, scorers: Sequence[tuple[WorkerScorer, float]]) -> None:
        if any(not math.isfinite(weight) or weight < 0 for _, weight in scorers):
            raise ValueError(f"scorer weights must be finite and >= 0: {[w for _, w in scorers]}")
        self._scorers = tuple(scorers)
        self._turn = 0

    def scores(self, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]) -> dict[str, float]:
        """Each scorer's unweighted value for ``worker``, by scorer name."""
        return {scorer.name: scorer(worker, request, candidates) for scorer, _ in self._scorers}

    def total(self, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]) -> float:
        """The weighted sum of the scorers' values for ``worker``."""
        return sum(weight * scorer(worker, request, candidates) for scorer, weight in self._scorers)

    def pick(self, candidates: Sequence[WorkerInfo], request: RoutingRequest) -> WorkerInfo | None:
        """The best of ``candidates`` (all assumed to have passed the filters), or None when there are none."""
        if not candidates:
            return None
        totals = [(self.total(w, request, candidates), w) for w in candidates]
        best = max(total for total, _ in totals)
        tied = sorted((w for total, w in totals if best - total <= _TIE_TOLERANCE), key=lambda w: w.worker_id)
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen


# ---------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class WorkerVerdict:
    """Why one worker was or was not chosen: each filter's answer, and scores when it passed them all."""

    worker_id: str
    filters: dict[str, bool]
    scores: dict[str, float] | None = None  # unweighted, by scorer name; None when a filter failed
    total: float | None = None  # weighted sum; None when a filter failed

    @property
    def eligible(self) -> bool:
        return all(self.filters.values())


class RoutingPolicy:
    """Chooses decode and prefill workers from a registry snapshot. Pure apart from the pickers' counters.

    Invariant: a picked worker passed every filter for its role (right role, not draining, same model, not
    excluded, enough free blocks); ``None`` means no worker qualifies.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._filters: dict[Role, tuple[WorkerFilter, ...]] = {r: default_filters(r) for r in ("decode", "prefill")}
        self._pickers: dict[Role, Picker] = {r: Picker(weighted_scorers(config)) for r in ("decode", "prefill")}

    def candidates(self, role: Role, workers: Iterable[WorkerInfo], request: RoutingRequest) -> list[WorkerInfo]:
        """Workers of the snapshot that pass every filter for ``role``, in snapshot order."""
        return [w for w in workers if passes_all(self._filters[role], w, request)]

    def pick(self, role: Role, workers: Iterable[WorkerInfo], request: RoutingRequest) -> WorkerInfo | None:
        """The best worker of ``role`` for ``request``, or None when none qualifies."""
        return self._pickers[role].pick(self.candidates(role, workers, request), request)

    def pick_decode(self, workers: Iterable[WorkerInfo], request: RoutingRequest) -> WorkerInfo | None:
        """The decode worker that will reserve blocks and stream tokens, or None."""
        return self.pick("decode", workers, request)

    def pick_prefill(self, workers: Iterable[WorkerInfo], request: RoutingRequest) -> WorkerInfo | None:
        """The prefill worker that will run the prompt, or None."""
        return self.pick("prefill", workers, request)

    def explain(self, role: Role, workers: Iterable[WorkerInfo], request: RoutingRequest) -> list[WorkerVerdict]:
        """Per-worker filter results and scores, for logs. Does not advance the tie-break counter."""
        workers = list(workers)
        candidates = self.candidates(role, workers, request)
        return [self._verdict(role, w, request, candidates) for w in workers]

    def _verdict(
        self, role: Role, worker: WorkerInfo, request: RoutingRequest, candidates: Sequence[WorkerInfo]
    ) -> WorkerVerdict:
        filters = {check.name: check(worker, request) for check in self._filters[role]}
        if not all(filters.values()):
            return WorkerVerdict(worker.worker_id, filters)
        picker = self._pickers[role]
        scores = picker.scores(worker, request, candidates)
        return WorkerVerdict(worker.worker_id, filters, scores, picker.total(worker, request, candidates))

    def place(self, signals: PlacementSignals) -> Placement:
        """``place_prefill`` with this policy's config."""
        return place_prefill(signals, self.config)


# ---------------------------------------------------------------------------------------------- placement
#
# Where one attempt's prompt is prefilled: on a prefill worker (remote) or on the decode worker already picked
# (local). ``place_prefill`` applies the rules below in order; each is a small pure function tested on its own.


@dataclass(frozen=True)
class Placement:
    """Where a prompt is prefilled and why. ``reason`` is a metric label: one of common.metrics.PLACEMENT_REASONS
    for its placement (the orchestrator's fallbacks after a decision included)."""

    local: bool
    reason: str

    @property
    def placement(self) -> str:
        return "local" if self.local else "remote"


@dataclass(frozen=True)
class DecodeLoad:
    """The picked decode worker as the placement sees it.

    ``running``: streams in its batch (heartbeat count plus this router's requests in flight, this one excluded);
    ``tpot_ms``: its recent time per token (0 = unknown); ``local_tokens_in_flight``: prompt tokens it is prefilling
    for this router now; ``local_rate``: its prefill tokens/s as this router measured them (None = not yet).
    """

    running: int
    free_blocks: int
    tpot_ms: float
    local_tokens_in_flight: int
    local_rate: float | None


@dataclass(frozen=True)
class PlacementSignals:
    """Everything one placement decision reads; counts are tokens unless named blocks.

    ``prefill_waits_s``: each candidate prefill worker's predicted wait for this prompt (None = its rate is not
    measured yet); ``prefill_idle``: some candidate has nothing queued; ``prefill_rate``: the best measured prefill
    worker rate (None = none measured).
    """

    prompt_tokens: int
    uncached_local: int  # what the decode worker would compute: the prompt minus its cached leading blocks
    blocks_needed: int  # KV blocks the request needs on the decode worker (prompt + expected output)
    prefill_available: bool
    prefill_waits_s: tuple[float | None, ...]
    prefill_idle: bool
    prefill_rate: float | None
    decode: DecodeLoad


def waits_exceed(predicted_waits_s: Sequence[float | None], target_ms: float) -> bool:
    """The prefill pool is saturated: the mode is on (``target_ms`` > 0) and every candidate's predicted wait is
    known and above ``target_ms``. No candidate, or one not yet measured: not saturated."""
    if target_ms <= 0 or not predicted_waits_s or any(wait is None for wait in predicted_waits_s):
        return False
    return min(w for w in predicted_waits_s if w is not None) * 1e3 > target_ms


def within_token_budget(local_tokens_in_flight: int, uncached_local: int, budget_tokens: int) -> bool:
    """The decode worker's prefill work with this prompt stays within ``budget_tokens``."""
    return local_tokens_in_flight + uncached_local <= budget_tokens


def has_kv_headroom(decode: DecodeLoad, blocks_needed: int) -> bool:
    """The request fits in the decode worker's free blocks, so prefilling it there preempts no running stream."""
    return decode.free_blocks >= blocks_needed


def local_prefill_rate(decode: DecodeLoad, configured: float, prefill_rate: float | None) -> float | None:
    """The decode worker's prefill rate: measured, else ``configured`` (> 0), else the prefill pool's (None when
    nothing is known)."""
    if decode.local_rate is not None and decode.local_rate > 0:
        return decode.local_rate
    return configured if configured > 0 else prefill_rate


def predicted_tpot_ms(base_tpot_ms: float, prefill_tokens: int, rate: float, spread_steps: int) -> float:
    """A decode worker's TPOT while it prefills ``prefill_tokens``: its recent TPOT plus the prefill's time
    (tokens / ``rate``) spread over ``spread_steps`` of its streams' tokens. A request's TPOT is the mean over its
    output, so a stall of S seconds adds S / (output tokens) to the TPOT of every stream it lands in."""
    return base_tpot_ms + 1e3 * prefill_tokens / rate / max(spread_steps, 1)


def within_tpot_budget(decode: DecodeLoad, prefill_tokens: int, rate: float | None, target_ms: float,
                       spread_steps: int) -> bool:
    """Prefilling ``prefill_tokens`` more (besides what it already prefills) keeps the decode worker's predicted
    TPOT within ``target_ms``. True without a target (0) or without a stream to slow; False when the rate is
    unknown (the streams' TPOT cannot be predicted, so they are kept safe). The recent TPOT may already hold part
    of the prefills in flight, which are counted again: the error is on the side of the streams."""
    if target_ms <= 0 or decode.running <= 0:
        return True
    if rate is None or rate <= 0:
        return False
    tokens = decode.local_tokens_in_flight + prefill_tokens
    return predicted_tpot_ms(decode.tpot_ms, tokens, rate, spread_steps) <= target_ms


def over_tpot_target(decode: DecodeLoad, target_ms: float) -> bool:
    """The decode worker is busy: it has streams and its recent TPOT already exceeds a known ``target_ms``."""
    return target_ms > 0 and decode.running > 0 and decode.tpot_ms > target_ms


def local_not_slower(signals: PlacementSignals, rate: float | None) -> bool:
    """The prompt's predicted wait on the decode worker (its prefill queue plus the prompt, over ``rate``) is no
    longer than on the fastest prefill worker. True when either is unknown (the other rules decide)."""
    waits = [w for w in signals.prefill_waits_s if w is not None]
    if rate is None or rate <= 0 or not waits:
        return True
    return (signals.decode.local_tokens_in_flight + signals.uncached_local) / rate <= min(waits)


def place_saturated(signals: PlacementSignals, config: RouterConfig) -> Placement:
    """The prefill pool is saturated: the decode worker takes the prompt if it has the room, keeps its streams
    within the TPOT target (or, without one, within the local token budget) and would not be slower itself."""
    decode, uncached = signals.decode, signals.uncached_local
    if config.slo_tpot_ms <= 0 and not within_token_budget(decode.local_tokens_in_flight, uncached,
                                                           config.local_prefill_budget_tokens):
        return Placement(False, "local_budget")
    if not has_kv_headroom(decode, signals.blocks_needed):
        return Placement(False, "decode_kv_full")
    rate = local_prefill_rate(decode, config.local_prefill_tokens_per_s, signals.prefill_rate)
    if not within_tpot_budget(decode, uncached, rate, config.slo_tpot_ms, config.local_prefill_spread_tokens):
        return Placement(False, "decode_over_tpot")
    if not local_not_slower(signals, rate):
        return Placement(False, "local_slower")
    return Placement(True, "prefill_saturated")


def place_prefill(signals: PlacementSignals, config: RouterConfig) -> Placement:
    """Where to prefill this attempt's prompt, by the first rule that applies:

    1. no prefill worker -> local; 2. a short prompt (<= local_prefill_max_tokens) -> local; 3. a prompt whose
    uncached part on the decode worker is that short (its prefix cache holds the rest) -> local, unless the
    decode worker is over its TPOT target while a prefill worker is idle -> remote; 4. every prefill worker's
    predicted wait above auto_prefill_ttft_ms -> ``place_saturated``; 5. otherwise remote.
    """
    limit = config.local_prefill_max_tokens
    if not signals.prefill_available:
        return Placement(True, "no_prefill_worker")
    if signals.prompt_tokens <= limit:
        return Placement(True, "short_prompt")
    if signals.uncached_local <= limit:
        if signals.prefill_idle and over_tpot_target(signals.decode, config.slo_tpot_ms):
            return Placement(False, "decode_busy")
        return Placement(True, "decode_cache_hit")
    if waits_exceed(signals.prefill_waits_s, config.auto_prefill_ttft_ms):
        return place_saturated(signals, config)
    return Placement(False, "prefill_pool")
