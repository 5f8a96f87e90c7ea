"""Prometheus metric definitions, one place for every service. Each process builds its own registry.

Names follow Prometheus conventions: ``tandem_`` prefix, base units, ``_total`` counters, ``_seconds``
histograms. Every series carries ``model`` and ``role`` (router | prefill | decode: the process that exports
it; on ``tandem_workers`` it is the pool counted). Latencies users feel are measured at the router; workers
measure their own phases. Label values that can be known up front are created at start-up with value 0, so a
failure counter that never fired still answers queries (``rate(...) == 0`` rather than no data).

Goodput: the router counts, for every pair of thresholds on a fixed grid (``SLO_TTFT_GRID`` x
``SLO_TPOT_GRID``), the requests that finished normally with TTFT and TPOT both within them
(``tandem_requests_slo_met_total{ttft_le, tpot_le}``). Dividing by ``tandem_requests_finished_total`` gives the
exact share meeting both SLOs for any thresholds on the grid, which two separate histograms cannot give.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from common.coord.worker_info import WorkerInfo
    from common.engine.stats import EngineStats, FinishedRequest, StepClock

# TTFT, end-to-end, queue and phase times from 1 ms to minutes; inter-token latency from 1 ms to seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TOKEN_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
    5.0,
)
# One KV transfer: sub-millisecond over NVLink for a short prompt, seconds for a long one over gRPC.
TRANSFER_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Goodput thresholds (seconds). Each is also a bucket bound of its histogram, so dashboards and alerts can
# compare percentiles and `le` buckets with the same values; +Inf means "no SLO on this one".
SLO_TTFT_GRID = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
SLO_TPOT_GRID = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, math.inf)

ROLES = ("router", "prefill", "decode")
WORKER_ROLES = ("prefill", "decode")
ROUTER_FINISH_REASONS = ("stop", "length", "abort", "error")
WORKER_FINISH_REASONS = ("stop", "length", "abort")
ERROR_STATUSES = (400, 401, 404, 429, 500, 503)  # created at start; any other status appears when first used
RETRY_REASONS = ("prefill_failed", "decode_failed", "kv_transfer_failed")
# The router's prefill placements and their reasons (services/router/policy.py place_prefill; the last three
# local ones are the orchestrator's fallbacks after a remote decision).
PLACEMENT_REASONS: dict[str, tuple[str, ...]] = {
    "local": ("no_prefill_worker", "short_prompt", "decode_cache_hit", "prefill_saturated",
              "decode_full", "prefill_unavailable", "remote_failed"),
    "remote": ("prefill_pool", "decode_busy", "local_budget", "decode_kv_full", "decode_over_tpot", "local_slower"),
}
ENDPOINTS = ("chat", "completion")
TRANSPORTS = ("grpc", "nccl")


# Help texts of the names both the router and the workers export (Prometheus keeps one per name).
SHARED_HELP = {
    "tandem_requests_running": "Requests being served (router: streaming to clients; worker: in the engine's batch)",
    "tandem_requests_waiting": "Requests waiting (router: for an admission slot; worker: in the engine's queue)",
    "tandem_request_queue_time_seconds": "Time queued before running (router: admission; worker: engine queue)",
    "tandem_requests_finished_total": "Requests finished, by reason: stop | length | abort (client gone) | error",
    "tandem_generation_tokens_total": "Tokens generated (router: delivered to clients; worker: sampled)",
}


def exposition(registry: CollectorRegistry) -> bytes:
    """The /metrics body: this process's registry, or, under prometheus_client's multiprocess mode
    (PROMETHEUS_MULTIPROC_DIR set, as for `tandem router --processes N`), every process's values combined."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)
    return generate_latest(registry)


def label_value(bound: float) -> str:
    """A threshold as Prometheus writes bucket bounds (1.0 -> "1.0", inf -> "+Inf"), so `le` and grid labels match."""
    return floatToGoString(bound)


# ---------------------------------------------------------------------------------------------------- router
@dataclass(frozen=True)
class RouterMetrics:
    """What the router exports at /metrics. One model per router, so single-series metrics are bound children."""

    registry: CollectorRegistry
    model: str
    running: Gauge
    waiting: Gauge
    ttft: Histogram
    itl: Histogram
    tpot: Histogram
    e2e: Histogram
    queue_time: Histogram
    router_overhead: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    migrations: Counter
    requests: Counter  # families below: labelled by endpoint / status / reason / pool
    errors: Counter
    finished: Counter
    retries: Counter
    placements: Counter
    workers: Gauge
    slo_met: Counter
    slo_cells: tuple[tuple[Counter, ...], ...]  # [ttft index][tpot index] -> bound child of slo_met

    @classmethod
    def create(cls, model: str) -> RouterMetrics:
        registry = CollectorRegistry()
        labels = {"model": model, "role": "router"}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, tuple(labels), buckets=buckets, registry=registry).labels(**labels)

        def single(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, tuple(labels), registry=registry, **kwargs).labels(**labels)

        def family(kind, name: str, doc: str, *extra: str):
            return kind(name, doc, (*labels, *extra), registry=registry)

        slo_met = family(
            Counter,
            "tandem_requests_slo_met_total",
            "Requests finished normally with TTFT <= ttft_le and TPOT <= tpot_le (goodput)",
            "ttft_le",
            "tpot_le",
        )
        cells = tuple(
            tuple(
                slo_met.labels(**labels, ttft_le=label_value(ttft), tpot_le=label_value(tpot)) for tpot in SLO_TPOT_GRID
            )
            for ttft in SLO_TTFT_GRID
        )
        metrics = cls(
            registry=registry,
            model=model,
            # multiprocess_mode: how `tandem router --processes N` adds up its processes' values.
            running=single(Gauge, "tandem_requests_running", SHARED_HELP["tandem_requests_running"],
                           multiprocess_mode="livesum"),
            waiting=single(Gauge, "tandem_requests_waiting", SHARED_HELP["tandem_requests_waiting"],
                           multiprocess_mode="livesum"),
            ttft=histogram("tandem_time_to_first_token_seconds", "Time to first token, at the router", LATENCY_BUCKETS),
            itl=histogram(
                "tandem_inter_token_latency_seconds",
                "Time between streamed tokens, at the router",
                TOKEN_LATENCY_BUCKETS,
            ),
            tpot=histogram(
                "tandem_time_per_output_token_seconds",
                "Mean time per output token after the first, per request, at the router",
                TOKEN_LATENCY_BUCKETS,
            ),
            e2e=histogram(
                "tandem_e2e_request_latency_seconds", "End-to-end request latency, at the router", LATENCY_BUCKETS
            ),
            queue_time=histogram(
                "tandem_request_queue_time_seconds",
                SHARED_HELP["tandem_request_queue_time_seconds"],
                LATENCY_BUCKETS,
            ),
            router_overhead=histogram(
                "tandem_router_added_latency_seconds",
                "Router time in a streamed request's TTFT: parse, tokenize, route and "
                "dispatch, plus first-event-to-first-byte (admission wait excluded)",
                OVERHEAD_BUCKETS,
            ),
            prompt_tokens=single(Counter, "tandem_prompt_tokens_total", "Prompt tokens of admitted requests"),
            generation_tokens=single(
                Counter,
                "tandem_generation_tokens_total",
                SHARED_HELP["tandem_generation_tokens_total"],
            ),
            migrations=single(
                Counter, "tandem_router_migrations_total", "Streams moved to another decode worker mid-generation"
            ),
            requests=family(Counter, "tandem_requests_total", "Requests received by the OpenAI API", "endpoint"),
            errors=family(
                Counter,
                "tandem_request_errors_total",
                "Requests answered with an error, by HTTP status (before or during the stream)",
                "status",
            ),
            finished=family(
                Counter,
                "tandem_requests_finished_total",
                SHARED_HELP["tandem_requests_finished_total"],
                "finish_reason",
            ),
            retries=family(
                Counter, "tandem_router_retries_total", "Failures the router retried around, by what failed", "reason"
            ),
            placements=family(
                Counter,
                "tandem_router_prefill_placements_total",
                "Prompts prefilled on a prefill worker (remote) or on their decode worker (local), by the reason "
                "the router placed them there",
                "placement",
                "reason",
            ),
            workers=Gauge(
                "tandem_workers",
                "Live workers the router sees, by pool (role = the pool counted)",
                ("model", "role"),
                registry=registry,
                multiprocess_mode="livemax",  # every process watches the same registry
            ),
            slo_met=slo_met,
            slo_cells=cells,
        )
        metrics._initialise()
        return metrics

    def _initialise(self) -> None:
        """Create every known label value at 0 (absent series make rate() queries and alerts go blind)."""
        labels = {"model": self.model, "role": "router"}
        for endpoint in ENDPOINTS:
            self.requests.labels(**labels, endpoint=endpoint)
        for status in ERROR_STATUSES:
            self.errors.labels(**labels, status=str(status))
        for reason in ROUTER_FINISH_REASONS:
            self.finished.labels(**labels, finish_reason=reason)
        for reason in RETRY_REASONS:
            self.retries.labels(**labels, reason=reason)
        for placement, reasons in PLACEMENT_REASONS.items():
            for reason in reasons:
                self.placements.labels(**labels, placement=placement, reason=reason)
        for role in WORKER_ROLES:
            self.workers.labels(model=self.model, role=role)

    def _labels(self) -> dict[str, str]:
        return {"model": self.model, "role": "router"}

    def count_request(self, endpoint: str) -> None:
        self.requests.labels(**self._labels(), endpoint=endpoint).inc()

    def count_error(self, status: int) -> None:
        self.errors.labels(**self._labels(), status=str(status)).inc()

    def count_retry(self, reason: str) -> None:
        """The orchestrator's retry hook: ``migration``, or one of RETRY_REASONS."""
        if reason == "migration":
            self.migrations.inc()
        else:
            self.retries.labels(**self._labels(), reason=reason).inc()

    def count_placement(self, placement: str, reason: str) -> None:
        """The orchestrator's placement hook: one try's prefill went ``placement`` (local | remote) for ``reason``."""
        self.placements.labels(**self._labels(), placement=placement, reason=reason).inc()

    def set_workers(self, role: str, count: int) -> None:
        self.workers.labels(model=self.model, role=role).set(count)

    def finish_request(self, reason: str, ttft: float | None, tpot: float | None) -> None:
        """Count a finished request; one that ended normally also counts towards every SLO pair it met.

        ``tpot`` is None for a one-token answer, which meets any TPOT SLO.
        """
        self.finished.labels(**self._labels(), finish_reason=reason).inc()
        if reason not in ("stop", "length") or ttft is None:
            return
        first_tpot = bisect.bisect_left(SLO_TPOT_GRID, tpot or 0.0)
        for row in self.slo_cells[bisect.bisect_left(SLO_TTFT_GRID, ttft) :]:
            for cell in row[first_tpot:]:
                cell.inc()


# ---------------------------------------------------------------------------------------------------- workers
class TransferOutcome(Protocol):
    """One KV transfer as one side saw it (``common.transfer.TransferOutcome`` or the sender's result)."""

    ok: bool
    bytes: int
    seconds: float


class WorkerMetrics:
    """What a prefill or decode worker exports at its metrics port.

    Engine gauges and counters are read from the latest ``EngineStats`` snapshot at scrape time (the engine
    keeps the cumulative counts, so nothing is double counted or lost); phase-time histograms are fed with
    finished-request records; KV transfers are observed as they happen. ``speculative_tokens``: the draft
    positions the per-position acceptance counter lists at 0 from the first snapshot (0: speculation off).
    """

    def __init__(self, model: str, role: str, speculative_tokens: int = 0) -> None:
        if role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {WORKER_ROLES}, got {role!r}")
        self.model, self.role = model, role
        self.registry = CollectorRegistry()
        self.engine = EngineCollector(model, role, speculative_tokens)
        self.registry.register(self.engine)
        labels = {"model": model, "role": role}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, tuple(labels), buckets=buckets, registry=self.registry).labels(**labels)

        def by_transport(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, (*labels, "transport"), registry=self.registry, **kwargs)

        self.queue_time = histogram(
            "tandem_request_queue_time_seconds",
            SHARED_HELP["tandem_request_queue_time_seconds"],
            LATENCY_BUCKETS,
        )
        self.prefill_time = histogram(
            "tandem_request_prefill_time_seconds",
            "Worker: first scheduled to first token sampled here",
            LATENCY_BUCKETS,
        )
        self.decode_time = histogram(
            "tandem_request_decode_time_seconds", "Worker: first token sampled here to finish", LATENCY_BUCKETS
        )
        self.finished = Counter(
            "tandem_requests_finished_total",
            SHARED_HELP["tandem_requests_finished_total"],
            (*labels, "finish_reason"),
            registry=self.registry,
        )
        self.transfer_bytes = by_transport(
            Counter,
            "tandem_kv_transfer_bytes_total",
            "KV bytes delivered (prefill: sent and acknowledged; decode: received and verified)",
        )
        self.transfer_seconds = by_transport(
            Histogram,
            "tandem_kv_transfer_duration_seconds",
            "One KV transfer attempt, ok or not (prefill: send to ack; decode: receive, verify and import)",
            buckets=TRANSFER_BUCKETS,
        )
        self.transfer_failures = by_transport(
            Counter, "tandem_kv_transfer_failures_total", "KV transfers that failed or were rejected"
        )
        self.checksum_mismatches = by_transport(
            Counter,
            "tandem_kv_transfer_checksum_mismatches_total",
            "KV transfers whose bytes failed checksum verification (decode)",
        )
        self._initialise()

    def _labels(self) -> dict[str, str]:
        return {"model": self.model, "role": self.role}

    def _initialise(self) -> None:
        for reason in WORKER_FINISH_REASONS:
            self.finished.labels(**self._labels(), finish_reason=reason)
        for transport in TRANSPORTS:
            for family in (
                self.transfer_bytes,
                self.transfer_seconds,
                self.transfer_failures,
                self.checksum_mismatches,
            ):
                family.labels(**self._labels(), transport=transport)

    def update(self, stats: EngineStats, finished: Iterable[FinishedRequest], reservations: int = 0,
               steps: StepClock | None = None) -> None:
        """A fresh engine snapshot (and its step clock) and the sequences finished since the last one."""
        self.engine.latest = (stats, reservations, steps)
        for record in finished:
            self.observe_finished(record)

    def observe_finished(self, record: FinishedRequest) -> None:
        self.finished.labels(**self._labels(), finish_reason=record.finish_reason).inc()
        self.queue_time.observe(record.queue_s)
        if record.prefill_s is not None:
            self.prefill_time.observe(record.prefill_s)
        if record.decode_s is not None and record.num_output_tokens > 1:  # a prefill worker's one token: no decode
            self.decode_time.observe(record.decode_s)

    def observe_transfer(self, transport: str, outcome: TransferOutcome, checksum_mismatch: bool = False) -> None:
        labels = {**self._labels(), "transport": transport}
        self.transfer_seconds.labels(**labels).observe(outcome.seconds)
        if outcome.ok:
            self.transfer_bytes.labels(**labels).inc(outcome.bytes)
        else:
            self.transfer_failures.labels(**labels).inc()
        if checksum_mismatch:
            self.checksum_mismatches.labels(**labels).inc()


class EngineCollector(Collector):
    """Engine gauges and counters from the latest snapshot, written at scrape time (none before the first).

    The per-position acceptance counter lists positions 0 .. max(1, ``speculative_tokens``, positions seen) - 1:
    position 0 always, so its rate reads 0 rather than no data on a worker that does not speculate.
    """

    def __init__(self, model: str, role: str, speculative_tokens: int = 0) -> None:
        self.model, self.role = model, role
        self.speculative_tokens = speculative_tokens
        self.latest: tuple[EngineStats, int, StepClock | None] | None = None  # (snapshot, reservations, steps)

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(None))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.latest))

    def _families(self, latest: tuple[EngineStats, int, StepClock | None] | None) -> list[Metric]:
        series = self._series(*latest) if latest is not None else {}
        families: list[Metric] = []
        for name, (kind, doc) in ENGINE_METRICS.items():
            labels = ("model", "role", *ENGINE_EXTRA_LABELS.get(name, ()))
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=labels)
            for extra_values, value in series.get(name, ()):
                family.add_metric((self.model, self.role, *extra_values), value)
            families.append(family)
        return families

    def _series(self, stats: EngineStats, reservations: int, steps: StepClock | None) -> dict[str, list[tuple]]:
        """Metric name -> [(values of its extra labels, value)]."""
        series: dict[str, list[tuple]] = {
            name: [((), value)] for name, value in _engine_values(stats, reservations, steps).items()
        }
        accepted = list(stats.spec_accepted_per_position)
        accepted += [0] * (max(1, self.speculative_tokens) - len(accepted))
        series[SPEC_ACCEPTED_PER_POSITION] = [((str(position),), count) for position, count in enumerate(accepted)]
        return series


SPEC_ACCEPTED_PER_POSITION = "tandem_spec_decode_num_accepted_tokens_per_pos_total"
# Engine metrics with labels besides model and role.
ENGINE_EXTRA_LABELS: dict[str, tuple[str, ...]] = {SPEC_ACCEPTED_PER_POSITION: ("position",)}
ENGINE_METRICS: dict[str, tuple[str, str]] = {
    "tandem_requests_running": ("gauge", SHARED_HELP["tandem_requests_running"]),
    "tandem_requests_waiting": ("gauge", SHARED_HELP["tandem_requests_waiting"]),
    "tandem_kv_cache_usage_ratio": ("gauge", "Fraction of KV-cache blocks in use (free cached blocks count as free)"),
    "tandem_kv_cache_free_blocks": ("gauge", "Free KV-cache blocks"),
    "tandem_kv_cache_blocks": ("gauge", "KV-cache blocks in all"),
    "tandem_kv_reservations": ("gauge", "Open KV reservations awaiting a transfer (decode)"),
    "tandem_preemptions_total": ("counter", "Requests preempted (freed and recomputed later) for lack of KV blocks"),
    "tandem_prefix_cache_queries_total": ("counter", "Prompt tokens looked up in the prefix cache"),
    "tandem_prefix_cache_hits_total": ("counter", "Prompt tokens found in the prefix cache"),
    "tandem_prefill_tokens_total": ("counter", "Tokens computed by prefill here (prefix-cache hits excluded)"),
    "tandem_generation_tokens_total": ("counter", SHARED_HELP["tandem_generation_tokens_total"]),
    "tandem_engine_steps_total": ("counter", "Engine steps that produced output"),
    "tandem_engine_step_seconds_total": ("counter", "Wall time of those steps on the engine thread (schedule, run, "
                                                    "outputs); per step, compare with the TPOT clients see"),
    "tandem_engine_step_requests_total": ("counter", "Requests with output, summed over steps (/ steps = mean batch)"),
    # Speculative decoding (vLLM's names): a "draft" is one sequence's verification of its draft tokens in a step.
    "tandem_spec_decode_num_drafts_total": ("counter", "Speculative decoding: verifications of one sequence's drafts"),
    "tandem_spec_decode_num_draft_tokens_total": ("counter", "Speculative decoding: draft tokens verified"),
    "tandem_spec_decode_num_accepted_tokens_total": ("counter", "Speculative decoding: draft tokens accepted"),
    "tandem_spec_decode_num_emitted_tokens_total": ("counter", "Speculative decoding: tokens the verifications emitted "
                                                               "(accepted drafts plus the target's own token)"),
    SPEC_ACCEPTED_PER_POSITION: ("counter", "Speculative decoding: drafts whose token at `position` (0-based) was "
                                            "accepted"),
}


def _engine_values(stats: EngineStats, reservations: int, steps: StepClock | None = None) -> dict[str, float]:
    return {
        "tandem_engine_steps_total": steps.steps if steps else 0,
        "tandem_engine_step_seconds_total": steps.seconds if steps else 0.0,
        "tandem_engine_step_requests_total": steps.requests if steps else 0,
        "tandem_requests_running": stats.running,
        "tandem_requests_waiting": stats.waiting,
        "tandem_kv_cache_usage_ratio": stats.kv_cache_usage,
        "tandem_kv_cache_free_blocks": stats.free_blocks,
        "tandem_kv_cache_blocks": stats.total_blocks,
        "tandem_kv_reservations": reservations,
        "tandem_preemptions_total": stats.num_preemptions,
        "tandem_prefix_cache_queries_total": stats.prefix_cache_queries,
        "tandem_prefix_cache_hits_total": stats.prefix_cache_hits,
        "tandem_prefill_tokens_total": stats.prefill_tokens,
        "tandem_generation_tokens_total": stats.generation_tokens,
        "tandem_spec_decode_num_drafts_total": stats.spec_drafts,
        "tandem_spec_decode_num_draft_tokens_total": stats.spec_draft_tokens,
        "tandem_spec_decode_num_accepted_tokens_total": stats.spec_accepted_tokens,
        "tandem_spec_decode_num_emitted_tokens_total": stats.spec_emitted_tokens,
    }


# ---------------------------------------------------------------------------------------------------- discovery
def prometheus_sd(workers: Sequence[WorkerInfo]) -> list[dict]:
    """Prometheus HTTP service discovery: one target group per worker that serves metrics."""
    groups = []
    for worker in workers:
        if worker.metrics_port:
            host = worker.grpc_address.rsplit(":", 1)[0]
            groups.append({"targets": [f"{host}:{worker.metrics_port}"], "labels": {"worker_id": worker.worker_id}})
    return groups
