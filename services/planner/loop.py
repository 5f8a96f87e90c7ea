"""The planner loop: observe -> decide -> actuate, every ``interval_s``, from a ``PlannerConfig``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client import start_http_server

from common.config import PlannerConfig
from services.planner.actuate import Actuator, DryRun, KubernetesScaler, ScaleError, scale_changed
from services.planner.decide import (
    Decision,
    PlannerState,
    Policy,
    PoolLimits,
    Reaction,
    Slo,
    decide,
    predicted_s,
)
from services.planner.load import ClusterLoad
from services.planner.metrics import PlacementWatch, PlannerMetrics
from services.planner.observe import LoadSource, PrometheusSource, ScrapeSource
from services.planner.profile import Profile, profile_from_file

log = logging.getLogger("tandem.planner")


@dataclass
class Planner:
    """One planner: its models, where it looks, what it moves, and its state between steps.

    The count each pool starts from (and is re-synced to when someone else changes it) is what the actuator
    reports (a Deployment's spec.replicas), else the replicas observed.
    """

    profile: Profile
    policy: Policy
    source: LoadSource
    actuator: Actuator
    clock: Callable[[], float] = time.monotonic
    state: PlannerState | None = field(default=None)
    metrics: PlannerMetrics | None = None
    placement: PlacementWatch = field(default_factory=lambda: PlacementWatch(120.0))

    def step(self) -> tuple[Decision, Decision] | None:
        """One decision per pool, applied where it changes the count; None while the source has no load yet."""
        load = self.source.observe(self.clock())
        if load is None:
            return None
        decisions, self.state = decide(self.profile, self.policy, load, self._synced(load))
        scale_changed(self.actuator, decisions)
        if self.metrics is not None:
            self._record(load, decisions)
        return decisions

    def _record(self, load: ClusterLoad, decisions: tuple[Decision, Decision]) -> None:
        """Export what this step saw and decided; placement is read back from the actuator after scaling."""
        prefill, decode = decisions
        slo = self.policy.slo
        self.metrics.record_load(load)
        self.metrics.record_corrections({"prefill": self.state.prefill.correction,
                                         "decode": self.state.decode.correction})
        self.metrics.record_decisions(decisions,
                                      predicted_s(self.profile, "prefill", load.prefill, prefill.desired, slo.ttft_s),
                                      predicted_s(self.profile, "decode", load.decode, decode.desired, slo.tpot_s))
        for decision, observed in ((prefill, load.prefill.replicas), (decode, load.decode.replicas)):
            available = self._available(decision.role)
            unplaceable = self.placement.unplaceable(decision.role, decision.desired, available, load.at)
            self.metrics.record_placement(decision.role, observed if available is None else available, unplaceable)

    def _available(self, role: str) -> int | None:
        """The actuator's available replicas; one it cannot read (e.g. no RBAC on deployments/status) is unknown,
        so metrics never stop the planner."""
        try:
            return self.actuator.available(role)
        except ScaleError as exc:
            log.warning("planner: cannot read %s availability: %s", role, exc)
            return None

    def _synced(self, load: ClusterLoad) -> PlannerState:
        state = self.state or PlannerState.from_load(load)
        pools = {}
        for role in ("prefill", "decode"):
            pool, actual = getattr(state, role), self.actuator.replicas(role)
            pools[role] = pool if actual is None or actual == pool.replicas else pool.moved_to(actual, load.at)
        return PlannerState(**pools)


def policy_from(config: PlannerConfig) -> Policy:
    return Policy(Slo(config.slo_ttft_ms / 1e3, config.slo_tpot_ms / 1e3),
                  PoolLimits(config.min_prefill, config.max_prefill), PoolLimits(config.min_decode, config.max_decode),
                  config.cooldown_s, config.band,
                  Reaction(config.correction, config.correction_min, config.correction_max, config.correction_alpha,
                           config.settle_s, config.queue_intervals))


def source_from(config: PlannerConfig, client: httpx.Client) -> LoadSource:
    if config.prometheus_url:
        return PrometheusSource(client, config.prometheus_url, config.window_s)
    return ScrapeSource(client, config.router_url)


def actuator_from(config: PlannerConfig) -> Actuator:
    if config.dry_run:
        return DryRun()  # logs what it would do; the loop prints every decision
    deployments = {"prefill": config.prefill_deployment, "decode": config.decode_deployment}
    return KubernetesScaler.from_cluster(config.k8s_namespace, deployments)


def metrics_from(config: PlannerConfig) -> PlannerMetrics | None:
    """The planner's metrics, served on ``config.metrics_port`` for the process's life (None: port 0, off)."""
    if not config.metrics_port:
        return None
    metrics = PlannerMetrics(config.model)
    start_http_server(config.metrics_port, registry=metrics.registry)
    return metrics


def describe(decision: Decision) -> str:
    return f"{decision.role}: {decision.current} -> {decision.desired}: {decision.reason}"


def run_planner(config: PlannerConfig, report: Callable[[str], None],
                sleep: Callable[[float], None] = time.sleep, actuator: Actuator | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> int:
    """Plan until ``should_stop()`` (or for ``config.iterations`` decisions); with ``dry_run`` every decision is
    reported. ``actuator`` replaces the one the config names (``tandem serve --autoscale`` passes its own)."""
    if not config.profile:
        raise ValueError("tandem planner needs --profile (a profile JSON or a pd_goodput --result-json)")
    with httpx.Client(timeout=min(10.0, max(config.interval_s, 1.0))) as client:
        planner = Planner(profile_from_file(config.profile), policy_from(config), source_from(config, client),
                          actuator or actuator_from(config), metrics=metrics_from(config),
                          placement=PlacementWatch(config.unplaceable_after_s))
        decided = 0
        while (not config.iterations or decided < config.iterations) and not should_stop():
            decisions = _step_logged(planner)
            decided += decisions is not None
            for decision in decisions or ():
                if config.dry_run or decision.changed:
                    report(describe(decision))
            if not config.iterations or decided < config.iterations:
                sleep(config.interval_s)
    return 0


def _step_logged(planner: Planner) -> tuple[Decision, Decision] | None:
    """A step; an unreachable source is logged and skipped (the next interval tries again)."""
    try:
        return planner.step()
    except httpx.HTTPError as exc:
        log.warning("planner: cannot read the load: %s", exc)
        return None
