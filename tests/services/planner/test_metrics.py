"""The planner's metrics: what one step records (fake load source, dry-run and Kubernetes actuators), the placement
watch, and `tandem planner --metrics-port` serving them."""

from __future__ import annotations

import math
import socket

import httpx
from kubernetes import client
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.planner.actuate import DryRun, KubernetesScaler, ScaleError
from services.planner.decide import REASON_KINDS
from services.planner.loop import Planner, metrics_from
from services.planner.metrics import PlacementWatch, PlannerMetrics
from tests.services.planner.fake_servers import FakeScaleApi, serve
from tests.services.planner.test_decide import PROFILE
from tests.services.planner.test_loop import POLICY, TraceSource, ticking


def samples(metrics: PlannerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The served text parsed back (so the exposition itself is checked, not only the objects)."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted({"model": "m", **labels}.items())))]


def test_one_step_records_desired_actual_predictions_inputs_and_the_decision():
    metrics = PlannerMetrics("m")
    planner = Planner(PROFILE, POLICY, TraceSource([(20.0, 1000, 50)]), DryRun(), clock=ticking(), metrics=metrics)
    prefill, decode = planner.step()
    found = samples(metrics)
    assert (prefill.current, prefill.desired, decode.desired) == (1, 3, 1)
    assert value(found, "tandem_planner_desired_replicas", pool="prefill") == 3
    assert value(found, "tandem_planner_actual_replicas", pool="prefill") == 1  # a dry run places nothing
    assert value(found, "tandem_planner_unplaceable_replicas", pool="prefill") == 0
    assert value(found, "tandem_planner_decisions_total", pool="prefill", direction="up") == 1
    assert value(found, "tandem_planner_decisions_total", pool="decode", direction="hold") == 1
    assert value(found, "tandem_planner_decisions_total", pool="decode", direction="up") == 0
    reasons = {kind: value(found, "tandem_planner_last_decision_reason", pool="prefill", kind=kind)
               for kind in REASON_KINDS}
    assert reasons == {kind: float(kind == "up") for kind in REASON_KINDS}
    assert 0 < value(found, "tandem_planner_predicted_ttft_seconds") <= POLICY.slo.ttft_s
    assert 0 < value(found, "tandem_planner_predicted_tpot_seconds") <= POLICY.slo.tpot_s
    assert value(found, "tandem_planner_observed_request_rate", pool="decode") == 20.0
    assert value(found, "tandem_planner_observed_prompt_tokens_per_second") == 20_000.0
    assert value(found, "tandem_planner_observed_output_tokens_per_second") == 1000.0
    assert math.isnan(value(found, "tandem_planner_observed_ttft_p90_seconds"))  # the trace has no latencies


def test_the_last_reason_kind_moves_with_the_decisions():
    metrics = PlannerMetrics("m")
    planner = Planner(PROFILE, POLICY, TraceSource([(20.0, 1000, 50), (0.1, 1000, 50)]), DryRun(), clock=ticking(),
                      metrics=metrics)
    planner.step()
    planner.step()  # the load is gone: prefill would go down, but waits out the cool-down first
    found = samples(metrics)
    assert value(found, "tandem_planner_last_decision_reason", pool="prefill", kind="hold_cooldown") == 1
    assert value(found, "tandem_planner_last_decision_reason", pool="prefill", kind="up") == 0
    assert value(found, "tandem_planner_decisions_total", pool="prefill", direction="hold") == 1


def test_replicas_the_cluster_cannot_place_are_reported_after_the_bound():
    fake = FakeScaleApi({("serving", "tandem-prefill"): 1, ("serving", "tandem-decode"): 1})
    fake.available[("serving", "tandem-prefill")] = 1  # scaled to 3, only one pod ever becomes available
    with serve(fake.handler()) as url:
        api = client.AppsV1Api(client.ApiClient(client.Configuration(host=url)))
        scaler = KubernetesScaler(api, "serving", {"prefill": "tandem-prefill", "decode": "tandem-decode"})
        metrics = PlannerMetrics("m")
        planner = Planner(PROFILE, POLICY, TraceSource([(20.0, 1000, 50)] * 3), scaler, clock=ticking(),
                          metrics=metrics, placement=PlacementWatch(after_s=15.0))
        planner.step()  # t = 0: short by two, but pods may still be starting
        assert value(samples(metrics), "tandem_planner_unplaceable_replicas", pool="prefill") == 0
        assert value(samples(metrics), "tandem_planner_actual_replicas", pool="prefill") == 1
        planner.step()  # t = 10
        assert value(samples(metrics), "tandem_planner_unplaceable_replicas", pool="prefill") == 0
        planner.step()  # t = 20: short for 20 s > 15 s
        found = samples(metrics)
    assert value(found, "tandem_planner_unplaceable_replicas", pool="prefill") == 2
    assert value(found, "tandem_planner_unplaceable_replicas", pool="decode") == 0


def test_an_unreadable_deployment_status_leaves_placement_unknown_and_the_planner_running():
    fake = FakeScaleApi({("serving", "tandem-prefill"): 1, ("serving", "tandem-decode"): 1})
    with serve(fake.handler()) as url:
        configuration = client.Configuration(host=url)
        configuration.retries = 0
        scaler = KubernetesScaler(client.AppsV1Api(client.ApiClient(configuration)), "serving",
                                  {"prefill": "tandem-prefill", "decode": "tandem-decode"})
        scaler.available = lambda role: (_ for _ in ()).throw(ScaleError("cannot read: HTTP 403 Forbidden"))
        metrics = PlannerMetrics("m")
        planner = Planner(PROFILE, POLICY, TraceSource([(20.0, 1000, 50)]), scaler, clock=ticking(), metrics=metrics)
        assert planner.step() is not None
    found = samples(metrics)
    assert value(found, "tandem_planner_actual_replicas", pool="prefill") == 1  # the workers observed
    assert value(found, "tandem_planner_unplaceable_replicas", pool="prefill") == 0


def test_the_placement_watch_forgets_a_shortfall_once_placed():
    watch = PlacementWatch(after_s=60.0)
    assert watch.unplaceable("decode", 4, 2, now=0.0) == 0
    assert watch.unplaceable("decode", 4, 2, now=60.0) == 2
    assert watch.unplaceable("decode", 4, 4, now=61.0) == 0
    assert watch.unplaceable("decode", 4, 3, now=100.0) == 0  # short again: the bound starts over
    assert watch.unplaceable("decode", 4, None, now=500.0) == 0  # unknown counts as placed


def test_metrics_are_served_on_the_metrics_port_and_off_at_zero():
    from common.config import PlannerConfig

    assert metrics_from(PlannerConfig(metrics_port=0)) is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = metrics_from(PlannerConfig(metrics_port=port, model="m"))
    metrics.record_placement("decode", 2, 1)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = {(s.name, s.labels.get("pool")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert found[("tandem_planner_unplaceable_replicas", "decode")] == 1
    assert found[("tandem_planner_desired_replicas", "prefill")] == 0  # created at start-up
