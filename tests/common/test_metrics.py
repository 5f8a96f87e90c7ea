"""Metric definitions: Prometheus naming conventions, labels, documentation, goodput grid, worker snapshots."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from common.coord.worker_info import WorkerInfo
from common.engine.stats import EngineStats, FinishedRequest, StepClock
from common.metrics import (
    LATENCY_BUCKETS,
    ROLES,
    SLO_TPOT_GRID,
    SLO_TTFT_GRID,
    TOKEN_LATENCY_BUCKETS,
    RouterMetrics,
    WorkerMetrics,
    label_value,
    prometheus_sd,
)
from common.transfer import TransferOutcome, TransferResult

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"
README_SECTION = "## Metrics, dashboards and alerts"


def worker(role: str = "decode") -> WorkerMetrics:
    metrics = WorkerMetrics("m", role)
    metrics.update(EngineStats(100, 25, 3, 2, 5, 1, 64, 32, 640, 80), [FinishedRequest("length", 0.5, 0.2, 1.5, 40, 8)])
    return metrics


def registries() -> dict[str, CollectorRegistry]:
    return {
        "router": RouterMetrics.create("m").registry,
        "prefill": worker("prefill").registry,
        "decode": worker("decode").registry,
    }


def families(registry: CollectorRegistry) -> list:
    """Tandem's own families (vLLM's names follow vLLM's conventions: tests/common/test_metrics_vllm.py)."""
    return [family for family in registry.collect() if not family.name.startswith("vllm:")]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, {"model": "m", **labels})
    assert found is not None, f"no sample {name} {labels}"
    return found


@pytest.mark.parametrize("role", ROLES)
def test_names_follow_prometheus_conventions(role):
    for family in families(registries()[role]):
        assert re.fullmatch(r"tandem_[a-z0-9_]+", family.name), family.name
        assert family.documentation.strip(), f"{family.name} has no help text"
        if family.type == "counter":
            assert all(s.name in (f"{family.name}_total", f"{family.name}_created") for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), f"histogram {family.name} is not in seconds"
        if family.type == "gauge":
            assert not family.name.endswith(("_total", "_seconds_total")), family.name
        assert not re.search(r"_(ms|milliseconds|percent|kb|mb)(_|$)", family.name), f"{family.name}: not a base unit"


@pytest.mark.parametrize("role", ROLES)
def test_every_series_is_labelled_by_model_and_role(role):
    for family in families(registries()[role]):
        assert family.samples, f"{family.name} exports nothing (label values not created at start)"
        for sample in family.samples:
            assert sample.labels["model"] == "m", sample
            expected = ("prefill", "decode") if family.name == "tandem_workers" else (role,)
            assert sample.labels["role"] in expected, sample  # tandem_workers: role = the pool counted


def test_a_name_shared_by_router_and_workers_means_the_same_thing():
    seen: dict[str, tuple[str, str]] = {}
    for registry in registries().values():
        for family in families(registry):
            kind = (family.type, family.documentation)
            assert seen.setdefault(family.name, kind) == kind, f"{family.name}: {seen[family.name]} vs {kind}"


def exported_names() -> set[str]:
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for registry in registries().values()
        for family in families(registry)
    }


def test_every_metric_is_documented_in_the_deploy_readme():
    text = README.read_text()
    assert README_SECTION in text, f"{README} has no '{README_SECTION}' section"
    section = text.split(README_SECTION, 1)[1]
    documented = set(re.findall(r"^\| `(tandem_[a-z0-9_]+)`", section, flags=re.MULTILINE))
    assert documented == exported_names(), (
        f"undocumented: {sorted(exported_names() - documented)}; gone: {sorted(documented - exported_names())}"
    )


def test_goodput_grid_is_made_of_histogram_bucket_bounds():
    assert set(SLO_TTFT_GRID) - {math.inf} <= set(LATENCY_BUCKETS)
    assert set(SLO_TPOT_GRID) - {math.inf} <= set(TOKEN_LATENCY_BUCKETS)
    assert list(SLO_TTFT_GRID) == sorted(SLO_TTFT_GRID) and list(SLO_TPOT_GRID) == sorted(SLO_TPOT_GRID)
    assert [label_value(b) for b in (1.0, 0.25, math.inf)] == ["1.0", "0.25", "+Inf"]


def slo_met(metrics: RouterMetrics, ttft_le: str, tpot_le: str) -> float:
    return value(metrics.registry, "tandem_requests_slo_met_total", role="router", ttft_le=ttft_le, tpot_le=tpot_le)


def test_finished_request_counts_towards_every_slo_pair_it_meets():
    metrics = RouterMetrics.create("m")
    metrics.finish_request("stop", ttft=0.3, tpot=0.04)
    assert slo_met(metrics, "0.5", "0.05") == 1 and slo_met(metrics, "+Inf", "+Inf") == 1
    assert slo_met(metrics, "0.25", "0.05") == 0 and slo_met(metrics, "0.5", "0.03") == 0
    metrics.finish_request("length", ttft=0.25, tpot=None)  # one token: meets any TPOT SLO; bounds are inclusive
    assert slo_met(metrics, "0.25", "0.01") == 1
    metrics.finish_request("error", ttft=0.1, tpot=0.01)
    metrics.finish_request("abort", ttft=0.1, tpot=0.01)
    assert slo_met(metrics, "+Inf", "+Inf") == 2
    finished = {
        reason: value(metrics.registry, "tandem_requests_finished_total", role="router", finish_reason=reason)
        for reason in ("stop", "length", "error", "abort")
    }
    assert finished == {"stop": 1, "length": 1, "error": 1, "abort": 1}


def test_router_counters_and_hooks():
    metrics = RouterMetrics.create("m")
    metrics.count_request("chat")
    metrics.count_error(503)
    metrics.count_error(418)  # an unexpected status still counts
    metrics.count_retry("kv_transfer_failed")
    metrics.count_retry("migration")
    metrics.set_workers("decode", 3)
    registry = metrics.registry
    assert value(registry, "tandem_requests_total", role="router", endpoint="chat") == 1
    assert value(registry, "tandem_request_errors_total", role="router", status="418") == 1
    assert value(registry, "tandem_router_retries_total", role="router", reason="kv_transfer_failed") == 1
    assert value(registry, "tandem_router_migrations_total", role="router") == 1
    assert value(registry, "tandem_workers", role="decode") == 3


def test_failure_counters_exist_at_zero_before_anything_fails():
    text = generate_latest(RouterMetrics.create("m").registry).decode() + generate_latest(worker().registry).decode()
    for line in (
        'tandem_request_errors_total{model="m",role="router",status="503"} 0.0',
        'tandem_router_retries_total{model="m",reason="decode_failed",role="router"} 0.0',
        'tandem_kv_transfer_failures_total{model="m",role="decode",transport="grpc"} 0.0',
        'tandem_kv_transfer_checksum_mismatches_total{model="m",role="decode",transport="nccl"} 0.0',
    ):
        assert line in text


def test_worker_metrics_come_from_the_engine_snapshot():
    registry = worker().registry
    expected = {
        "tandem_requests_running": 3,
        "tandem_requests_waiting": 2,
        "tandem_kv_cache_usage_ratio": 0.75,
        "tandem_kv_cache_free_blocks": 25,
        "tandem_kv_cache_blocks": 100,
        "tandem_preemptions_total": 1,
        "tandem_prefix_cache_queries_total": 64,
        "tandem_prefix_cache_hits_total": 32,
        "tandem_prefill_tokens_total": 640,
        "tandem_generation_tokens_total": 80,
    }
    assert {name: value(registry, name, role="decode") for name in expected} == expected
    assert value(registry, "tandem_requests_finished_total", role="decode", finish_reason="length") == 1
    assert value(registry, "tandem_request_prefill_time_seconds_sum", role="decode") == 0.2
    assert value(registry, "tandem_request_decode_time_seconds_count", role="decode") == 1


def test_engine_gauges_are_absent_until_the_first_snapshot():
    text = generate_latest(WorkerMetrics("m", "prefill").registry).decode()
    assert "# TYPE tandem_kv_cache_usage_ratio gauge" in text and "tandem_kv_cache_usage_ratio{" not in text


def test_a_prefill_workers_single_token_has_no_decode_time():
    metrics = WorkerMetrics("m", "prefill")
    metrics.observe_finished(FinishedRequest("length", 0.1, 0.3, 0.0, 40, 1))
    assert value(metrics.registry, "tandem_request_decode_time_seconds_count", role="prefill") == 0


def test_transfers_sent_and_received():
    sender, receiver = WorkerMetrics("m", "prefill"), WorkerMetrics("m", "decode")
    sender.observe_transfer("grpc", TransferResult(True, 1000, 0.01))
    sender.observe_transfer("grpc", TransferResult(False, 0, 0.02, "checksum mismatch"))
    receiver.observe_transfer("grpc", TransferOutcome("grpc", False, 0, 0.01, checksum_mismatch=True), True)
    labels = {"role": "prefill", "transport": "grpc"}
    assert value(sender.registry, "tandem_kv_transfer_bytes_total", **labels) == 1000
    assert value(sender.registry, "tandem_kv_transfer_failures_total", **labels) == 1
    assert value(sender.registry, "tandem_kv_transfer_duration_seconds_count", **labels) == 2
    labels["role"] = "decode"
    assert value(receiver.registry, "tandem_kv_transfer_checksum_mismatches_total", **labels) == 1


def test_prometheus_service_discovery_lists_workers_with_a_metrics_port():
    workers = [
        WorkerInfo("p0", "prefill", "m", "10.0.0.5:50051", metrics_port=9400),
        WorkerInfo("old", "decode", "m", "10.0.0.6:50051"),
    ]
    assert prometheus_sd(workers) == [{"targets": ["10.0.0.5:9400"], "labels": {"worker_id": "p0"}}]


def test_worker_exports_the_engine_step_clock():
    metrics = WorkerMetrics("m", "decode")
    clock = StepClock()
    for _ in range(4):
        clock.record(0.005, 32)
    metrics.update(EngineStats(100, 25, 3, 2, 5, 1, 64, 32, 640, 80), [], steps=clock.snapshot())
    text = generate_latest(metrics.registry).decode()
    assert 'tandem_engine_steps_total{model="m",role="decode"} 4.0' in text
    assert 'tandem_engine_step_requests_total{model="m",role="decode"} 128.0' in text
    assert re.search(r'tandem_engine_step_seconds_total\{model="m",role="decode"\} 0\.02', text)


def spec_snapshot(drafts: int, draft_tokens: int, accepted: int, emitted: int, per_position: tuple[int, ...]):
    speculation = {"spec_drafts": drafts, "spec_draft_tokens": draft_tokens, "spec_accepted_tokens": accepted}
    speculation |= {"spec_emitted_tokens": emitted, "spec_accepted_per_position": per_position}
    return EngineStats(100, 25, 3, 2, 5, 1, 64, 32, 640, 80, **speculation)


def spec_values(registry: CollectorRegistry) -> dict[str, float]:
    names = ("drafts", "draft_tokens", "accepted_tokens", "emitted_tokens")
    return {name: value(registry, f"tandem_spec_decode_num_{name}_total", role="decode") for name in names}


def accepted_per_position(registry: CollectorRegistry) -> dict[str, float]:
    return {
        sample.labels["position"]: sample.value
        for family in registry.collect()
        if family.name == "tandem_spec_decode_num_accepted_tokens_per_pos"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_speculative_decoding_counters_follow_the_engine_snapshots():
    metrics = WorkerMetrics("m", "decode", speculative_tokens=3)
    metrics.update(spec_snapshot(0, 0, 0, 0, ()), [])
    assert spec_values(metrics.registry) == {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "emitted_tokens": 0}
    assert accepted_per_position(metrics.registry) == {"0": 0, "1": 0, "2": 0}  # all configured positions, from start
    metrics.update(spec_snapshot(2, 6, 4, 6, (2, 1, 1)), [])  # drafts accepting 3 and 1 of 3 tokens
    metrics.update(spec_snapshot(5, 15, 7, 12, (4, 2, 1)), [])
    expected = {"drafts": 5, "draft_tokens": 15, "accepted_tokens": 7, "emitted_tokens": 12}
    assert spec_values(metrics.registry) == expected
    assert accepted_per_position(metrics.registry) == {"0": 4, "1": 2, "2": 1}
    text = generate_latest(metrics.registry).decode()
    assert 'tandem_spec_decode_num_accepted_tokens_per_pos_total{model="m",position="1",role="decode"} 2.0' in text


def test_accepted_per_position_lists_position_0_without_speculation_and_every_position_seen():
    assert accepted_per_position(worker().registry) == {"0": 0}  # rate() reads 0, not "no data"
    metrics = WorkerMetrics("m", "decode", speculative_tokens=2)
    metrics.update(spec_snapshot(1, 4, 4, 5, (1, 1, 1, 1)), [])  # more positions than configured: all exported
    assert accepted_per_position(metrics.registry) == {"0": 1, "1": 1, "2": 1, "3": 1}
