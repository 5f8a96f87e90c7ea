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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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

# ---------------------------------------------------------------------------------------------- vLLM's names
# Every measurement a vLLM dashboard reads is also exported under vLLM's name (``vllm:...``), labelled as vLLM
# labels it (``model_name``, ``engine``) with vLLM's buckets, so vLLM's Grafana dashboard and a Prometheus config
# that keeps ``vllm:.*`` work unchanged. Who exports which (no name from two places, so sums never double):
# the router: request latencies and token counts (what clients see), plus per-worker ``num_requests_running``,
# ``num_requests_waiting`` and ``kv_cache_usage_perc`` from the registry (``engine`` = worker id), so one
# scrape of the gateway fills the main panels; each worker: engine internals (preemptions, prefix cache,
# tokens per step, queue/prefill/decode phase times; ``engine="0"``: one engine per worker process).
VLLM_ROUTER_ENGINE = "router"  # the ``engine`` label of what the router measures
VLLM_WORKER_ENGINE = "0"
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                              10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's 1-2-5 series up to its max_model_len; the router serves whatever context its workers have, so up to 1M.
VLLM_TOKEN_COUNT_BUCKETS = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000)
# vLLM's tokens-per-step buckets without CUDA graphs; all powers of two (or 1), which the engine's power-of-two
# step-size counts (EngineStats.step_tokens_log2) give exactly.
VLLM_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
VLLM_LABELS = ("model_name", "engine")


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Incrementer(Protocol):
    def inc(self, amount: float = 1) -> None: ...


@dataclass(frozen=True)
class Twin:
    """One measurement under two names (Tandem's and vLLM's): every observation or increment goes to both."""

    tandem: Observer | Incrementer
    vllm: Observer | Incrementer

    def observe(self, amount: float) -> None:
        self.tandem.observe(amount)
        self.vllm.observe(amount)

    def inc(self, amount: float = 1) -> None:
        self.tandem.inc(amount)
        self.vllm.inc(amount)


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
    ttft: Twin  # Tandem's histogram and vLLM's
    itl: Twin
    tpot: Twin
    e2e: Twin
    queue_time: Histogram
    router_overhead: Histogram
    prompt_tokens: Twin
    generation_tokens: Twin
    migrations: Counter
    requests: Counter  # families below: labelled by endpoint / status / reason / pool
    errors: Counter
    finished: Counter
    retries: Counter
    placements: Counter
    workers: Gauge
    slo_met: Counter
    slo_cells: tuple[tuple[Counter, ...], ...]  # [ttft index][tpot index] -> bound child of slo_met
    vllm_success: Counter  # vllm:request_success_total, by finished_reason
    vllm_prompt_tokens: Histogram  # per request
    vllm_generation_tokens: Histogram

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

        vllm_labels = {"model_name": model, "engine": VLLM_ROUTER_ENGINE}

        def vllm(kind, name: str, doc: str, *extra: str, **kwargs):
            metric = kind(name, doc, (*VLLM_LABELS, *extra), registry=registry, **kwargs)
            return metric if extra else metric.labels(**vllm_labels)

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
            ttft=Twin(
                histogram("tandem_time_to_first_token_seconds", "Time to first token, at the router", LATENCY_BUCKETS),
                vllm(Histogram, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                     buckets=VLLM_TTFT_BUCKETS)),
            itl=Twin(
                histogram("tandem_inter_token_latency_seconds", "Time between streamed tokens, at the router",
                          TOKEN_LATENCY_BUCKETS),
                Twin(vllm(Histogram, "vllm:inter_token_latency_seconds",
                          "Histogram of inter-token latency in seconds.", buckets=VLLM_TOKEN_LATENCY_BUCKETS),
                     # the same latencies under the name vLLM's example dashboard still queries (before 0.11)
                     vllm(Histogram, "vllm:time_per_output_token_seconds",
                          "Histogram of time per output token in seconds.", buckets=VLLM_TOKEN_LATENCY_BUCKETS))),
            tpot=Twin(
                histogram("tandem_time_per_output_token_seconds",
                          "Mean time per output token after the first, per request, at the router",
                          TOKEN_LATENCY_BUCKETS),
                vllm(Histogram, "vllm:request_time_per_output_token_seconds",
                     "Histogram of time_per_output_token_seconds per request.", buckets=VLLM_TOKEN_LATENCY_BUCKETS)),
            e2e=Twin(
                histogram("tandem_e2e_request_latency_seconds", "End-to-end request latency, at the router",
                          LATENCY_BUCKETS),
                vllm(Histogram, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                     buckets=VLLM_REQUEST_LATENCY_BUCKETS)),
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
            prompt_tokens=Twin(
                single(Counter, "tandem_prompt_tokens_total", "Prompt tokens of admitted requests"),
                vllm(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")),
            generation_tokens=Twin(
                single(Counter, "tandem_generation_tokens_total", SHARED_HELP["tandem_generation_tokens_total"]),
                vllm(Counter, "vllm:generation_tokens", "Number of generation tokens processed.")),
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
            vllm_success=vllm(Counter, "vllm:request_success", "Count of successfully processed requests.",
                              "finished_reason"),
            vllm_prompt_tokens=vllm(Histogram, "vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                    buckets=VLLM_TOKEN_COUNT_BUCKETS),
            vllm_generation_tokens=vllm(Histogram, "vllm:request_generation_tokens",
                                        "Number of generation tokens processed.", buckets=VLLM_TOKEN_COUNT_BUCKETS),
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
            self.vllm_success.labels(model_name=self.model, engine=VLLM_ROUTER_ENGINE, finished_reason=reason)
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

    def observe_request_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        """A request that finished normally: its prompt and generated token counts (vLLM's per-request histograms)."""
        self.vllm_prompt_tokens.observe(prompt_tokens)
        self.vllm_generation_tokens.observe(generation_tokens)

    def finish_request(self, reason: str, ttft: float | None, tpot: float | None) -> None:
        """Count a finished request; one that ended normally also counts towards every SLO pair it met.

        ``tpot`` is None for a one-token answer, which meets any TPOT SLO.
        """
        self.finished.labels(**self._labels(), finish_reason=reason).inc()
        self.vllm_success.labels(model_name=self.model, engine=VLLM_ROUTER_ENGINE, finished_reason=reason).inc()
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

        def twin(name: str, doc: str, vllm_name: str, vllm_doc: str) -> Twin:
            vllm = Histogram(vllm_name, vllm_doc, VLLM_LABELS, buckets=VLLM_REQUEST_LATENCY_BUCKETS,
                             registry=self.registry)
            return Twin(histogram(name, doc, LATENCY_BUCKETS),
                        vllm.labels(model_name=model, engine=VLLM_WORKER_ENGINE))

        def by_transport(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, (*labels, "transport"), registry=self.registry, **kwargs)

        self.queue_time = twin("tandem_request_queue_time_seconds", SHARED_HELP["tandem_request_queue_time_seconds"],
                               "vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.")
        self.prefill_time = twin("tandem_request_prefill_time_seconds",
                                 "Worker: first scheduled to first token sampled here",
                                 "vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.")
        self.decode_time = twin("tandem_request_decode_time_seconds", "Worker: first token sampled here to finish",
                                "vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.")
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
        return families + self._vllm_families(series, latest[0] if latest is not None else None)

    def _vllm_families(self, series: dict[str, list[tuple]], stats: EngineStats | None) -> list[Metric]:
        """vLLM's names for the engine counters (``VLLM_ENGINE_ALIASES``) and its tokens-per-step histogram."""
        labels = (self.model, VLLM_WORKER_ENGINE)
        families: list[Metric] = []
        for name, (source, doc) in VLLM_ENGINE_ALIASES.items():
            family = CounterMetricFamily(name, doc, labels=VLLM_LABELS)
            for _, value in series.get(source, ()):
                family.add_metric(labels, value)
            families.append(family)
        iteration = HistogramMetricFamily(VLLM_ITERATION_TOKENS, "Histogram of number of tokens per engine_step.",
                                          labels=VLLM_LABELS)
        if stats is not None:
            iteration.add_metric(labels, iteration_token_buckets(stats.step_tokens_log2), stats.step_tokens_sum)
        return [*families, iteration]

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


VLLM_ITERATION_TOKENS = "vllm:iteration_tokens_total"
VLLM_ENGINE_ALIASES: dict[str, tuple[str, str]] = {
    "vllm:num_preemptions": ("tandem_preemptions_total", "Cumulative number of preemption from the engine."),
    "vllm:prefix_cache_queries": ("tandem_prefix_cache_queries_total",
                                  "Prefix cache queries, in terms of number of queried tokens."),
    "vllm:prefix_cache_hits": ("tandem_prefix_cache_hits_total",
                               "Prefix cache hits, in terms of number of cached tokens."),
}
"""Worker counters under vLLM's names (``_total`` is added on exposition): vLLM name -> (Tandem series, help)."""


def iteration_token_buckets(step_tokens_log2: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs on ``VLLM_ITERATION_TOKEN_BUCKETS`` (+Inf last) from power-of-two counts
    (``[k]``: steps of n tokens, n in (2^(k-1), 2^k]); exact, since every bound is a power of two."""
    buckets, total = [], 0
    for bound in VLLM_ITERATION_TOKEN_BUCKETS:
        power = (bound - 1).bit_length()
        total = sum(step_tokens_log2[: power + 1])
        buckets.append((label_value(bound), total))
    buckets.append(("+Inf", sum(step_tokens_log2)))
    return buckets


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


# ---------------------------------------------------------------------------------------------------- cluster
CLUSTER_GAUGES: dict[str, str] = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:gpu_cache_usage_perc": "GPU KV-cache usage. 1 means 100 percent usage (vLLM's name before 0.11).",
}
"""What the router exports per worker from its registry snapshot (``engine`` = the worker id)."""


class ClusterCollector(Collector):
    """Per-worker load and KV usage of ``model``'s workers, as the registry's last heartbeats say, at scrape time."""

    def __init__(self, model: str, workers: Sequence[WorkerInfo]) -> None:
        self.model, self.workers = model, workers

    def collect(self) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(name, doc, labels=VLLM_LABELS) for name, doc in CLUSTER_GAUGES.items()}
        for worker in self.workers:
            labels = (self.model, worker.worker_id)
            families["vllm:num_requests_running"].add_metric(labels, worker.running)
            families["vllm:num_requests_waiting"].add_metric(labels, worker.waiting)
            usage = 1.0 - worker.free_blocks / worker.total_blocks if worker.total_blocks else 0.0
            families["vllm:kv_cache_usage_perc"].add_metric(labels, usage)
            families["vllm:gpu_cache_usage_perc"].add_metric(labels, usage)
        return iter(families.values())


def cluster_exposition(model: str, workers: Sequence[WorkerInfo]) -> bytes:
    """The router's /metrics tail: ``CLUSTER_GAUGES`` for these workers (built per scrape, so a worker that left
    leaves no stale series, and the same under the router's multiprocess mode)."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(model, workers))
    return generate_latest(registry)


# ---------------------------------------------------------------------------------------------------- discovery
def prometheus_sd(workers: Sequence[WorkerInfo]) -> list[dict]:
    """Prometheus HTTP service discovery: one target group per worker that serves metrics."""
    groups = []
    for worker in workers:
        if worker.metrics_port:
            host = worker.grpc_address.rsplit(":", 1)[0]
            groups.append({"targets": [f"{host}:{worker.metrics_port}"], "labels": {"worker_id": worker.worker_id}})
    return groups
