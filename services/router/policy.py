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

    def prefill_locally(self, request: RoutingRequest, decode_worker: WorkerInfo, prefill_available: bool) -> bool:
        """``should_prefill_locally`` with this policy's ``local_prefill_max_tokens``."""
        return should_prefill_locally(request, prefill_available, self.config.local_prefill_max_tokens, decode_worker)


def should_prefill_locally(
    request: RoutingRequest, prefill_available: bool, local_prefill_max_tokens: int, decode_worker: WorkerInfo
) -> bool:
    """True when the decode worker should prefill the prompt itself instead of a prefill worker.

    That is when no prefill worker is available, or when the uncached part of the prompt (prompt tokens minus
    the tokens of the leading blocks cached on ``decode_worker``, never below 0) is at most
    ``local_prefill_max_tokens``.
    """
    if not prefill_available:
        return True
    return request.uncached_on(decode_worker) <= local_prefill_max_tokens


def prefill_pool_saturated(predicted_waits_s: Sequence[float | None], target_ms: float, local_tokens_in_flight: int,
                           uncached_local: int, local_budget_tokens: int) -> bool:
    """Automatic placement: True when the decode worker should prefill this prompt although prefill workers exist.

    That is when the mode is on (``target_ms`` > 0), every prefill worker's predicted wait is known and above
    ``target_ms``, and the decode worker's own prefill work stays within ``local_budget_tokens`` with this prompt
    (so its running streams lose at most that much to prefill at once).
    """
    if target_ms <= 0 or not predicted_waits_s or any(wait is None for wait in predicted_waits_s):
        return False
    if min(predicted_waits_s) * 1e3 <= target_ms:
        return False
    return local_tokens_in_flight + uncached_local <= local_budget_tokens
