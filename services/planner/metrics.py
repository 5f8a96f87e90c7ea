"""What the planner exports: per pool the replicas it wants and those there, the latencies it predicted and
observed, the correction factor it applies to the predictions, its decisions by direction and the kind of the last
one's reason, and the replicas that cannot be placed.

Series carry ``model`` (``--model``) and, per pool, ``pool`` (prefill | decode). Label values are bounded: pools,
directions and ``REASON_KINDS`` are fixed and created at start-up (the reason's free text goes to the log only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.planner.decide import REASON_KINDS, Decision
from services.planner.load import ClusterLoad

POOLS = ("prefill", "decode")
DIRECTIONS = ("up", "down", "hold")


def direction(decision: Decision) -> str:
    if decision.desired > decision.current:
        return "up"
    return "down" if decision.desired < decision.current else "hold"


@dataclass
class PlacementWatch:
    """Per pool, since when its available replicas have been below the desired count (None: not short).

    ``unplaceable`` is the shortfall once it has lasted `after_s`, else 0: pods still starting are not counted.
    """

    after_s: float
    short_since: dict[str, float] = field(default_factory=dict)

    def unplaceable(self, pool: str, desired: int, available: int | None, now: float) -> int:
        if available is None or available >= desired:
            self.short_since.pop(pool, None)
            return 0
        since = self.short_since.setdefault(pool, now)
        return desired - available if now - since >= self.after_s else 0


class PlannerMetrics:
    """The planner's registry (one per planner process) and its families."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()

        def per_pool(kind, name: str, doc: str, *extra: str):
            return kind(name, doc, ("model", "pool", *extra), registry=self.registry)

        def single(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ("model",), registry=self.registry).labels(model=model)

        self.desired = per_pool(Gauge, "tandem_planner_desired_replicas", "Replicas the planner wants, by pool")
        self.actual = per_pool(Gauge, "tandem_planner_actual_replicas",
                               "Replicas available in the pool (the Deployment's, else the workers observed)")
        self.unplaceable = per_pool(Gauge, "tandem_planner_unplaceable_replicas",
                                    "Desired replicas not available for longer than the planner's bound")
        self.correction = per_pool(Gauge, "tandem_planner_correction_factor",
                                   "Observed / predicted latency (TTFT for prefill, TPOT for decode), smoothed and "
                                   "clamped; the planner multiplies the profile's predictions by it (1: none)")
        self.request_rate = per_pool(Gauge, "tandem_planner_observed_request_rate",
                                     "Requests a second the planner observed, by pool")
        self.decisions = per_pool(Counter, "tandem_planner_decisions", "Planner decisions, by pool and direction",
                                  "direction")
        self.last_reason = per_pool(Gauge, "tandem_planner_last_decision_reason",
                                    "1 for the kind of the pool's last decision's reason, 0 for the others", "kind")
        self.predicted_ttft = single("tandem_planner_predicted_ttft_seconds",
                                     "TTFT the profile predicts at the desired prefill replicas (+Inf: over capacity)")
        self.predicted_tpot = single("tandem_planner_predicted_tpot_seconds",
                                     "TPOT the profile predicts at the desired decode replicas (+Inf: over capacity)")
        self.observed_ttft = single("tandem_planner_observed_ttft_p90_seconds",
                                    "p90 TTFT the planner observed over its window (NaN: no data)")
        self.observed_tpot = single("tandem_planner_observed_tpot_p90_seconds",
                                    "p90 TPOT the planner observed over its window (NaN: no data)")
        self.prompt_tokens = single("tandem_planner_observed_prompt_tokens_per_second",
                                    "Prompt tokens a second the planner observed (prefill pool)")
        self.output_tokens = single("tandem_planner_observed_output_tokens_per_second",
                                    "Output tokens a second the planner observed (decode pool)")
        self._initialise()

    def _initialise(self) -> None:
        for pool in POOLS:
            for family in (self.desired, self.actual, self.unplaceable, self.request_rate):
                family.labels(model=self.model, pool=pool)
            self.correction.labels(model=self.model, pool=pool).set(1.0)
            for way in DIRECTIONS:
                self.decisions.labels(model=self.model, pool=pool, direction=way)
            for kind in REASON_KINDS:
                self.last_reason.labels(model=self.model, pool=pool, kind=kind)

    def record_load(self, load: ClusterLoad) -> None:
        """The inputs the planner decided on."""
        for pool in (load.prefill, load.decode):
            self.request_rate.labels(model=self.model, pool=pool.role).set(pool.request_rate)
        self.observed_ttft.set(_or_nan(load.prefill.ttft_p90_s))
        self.observed_tpot.set(_or_nan(load.decode.tpot_p90_s))
        self.prompt_tokens.set(load.prefill.prompt_tokens_per_s)
        self.output_tokens.set(load.decode.request_rate * load.decode.mean_output_tokens)

    def record_corrections(self, factors: Mapping[str, float]) -> None:
        """Each pool's correction factor after this step."""
        for pool, factor in factors.items():
            self.correction.labels(model=self.model, pool=pool).set(factor)

    def record_decisions(self, decisions: Sequence[Decision], predicted_ttft_s: float, predicted_tpot_s: float) -> None:
        for decision in decisions:
            labels = {"model": self.model, "pool": decision.role}
            self.desired.labels(**labels).set(decision.desired)
            self.decisions.labels(**labels, direction=direction(decision)).inc()
            for kind in REASON_KINDS:
                self.last_reason.labels(**labels, kind=kind).set(1 if kind == decision.kind else 0)
        self.predicted_ttft.set(predicted_ttft_s)
        self.predicted_tpot.set(predicted_tpot_s)

    def record_placement(self, pool: str, actual: int, unplaceable: int) -> None:
        self.actual.labels(model=self.model, pool=pool).set(actual)
        self.unplaceable.labels(model=self.model, pool=pool).set(unplaceable)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
