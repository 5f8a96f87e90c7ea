"""vLLM's metric names beside Tandem's: the names vLLM's Grafana dashboard queries are exported, with the same
values as Tandem's own series, vLLM's labels (``model_name``, ``engine``) and the registry's per-worker gauges.

The router runs in-process (fakes from test_generate_route) and its /metrics text is read back with
prometheus_client's parser; the worker's text likewise from WorkerMetrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.coord.worker_info import WorkerInfo
from common.engine.stats import EngineStats, EngineStatsRecorder, FinishedRequest
from common.metrics import VLLM_ITERATION_TOKEN_BUCKETS, RouterMetrics, WorkerMetrics
from services.router.admission import AdmissionQueue, ApiKeys
from services.router.openai_api import Gateway
from services.router.server import RouterState, build_app
from tests.services.router.test_generate_route import MODEL, CharTokenizer, FakeOrchestrator

# The series vLLM's own Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json in vLLM's repository)
# queries, taken from its panel expressions (it still reads the pre-0.11 names time_per_output_token_seconds and
# gpu_cache_usage_perc), plus the newer names and the ones issue 18 lists (prefix-cache hits and queries, iteration
# tokens, preemptions). Its "max generation tokens in sequence group" panel (vllm:request_max_num_generation_tokens,
# a V0 n > 1 measure) is not served.
DASHBOARD_SERIES = {
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:inter_token_latency_seconds_bucket", "vllm:inter_token_latency_seconds_sum",
    "vllm:inter_token_latency_seconds_count",
    "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum",
    "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
    "vllm:iteration_tokens_total_bucket",
    "vllm:time_per_output_token_seconds_bucket", "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count", "vllm:gpu_cache_usage_perc",
}
ROUTER_ONLY = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:gpu_cache_usage_perc"}
WORKERS = [WorkerInfo("decode-a", "decode", MODEL, "127.0.0.1:1", total_blocks=100, free_blocks=25, running=3,
                      waiting=1),
           WorkerInfo("prefill-b", "prefill", MODEL, "127.0.0.1:2", total_blocks=40, free_blocks=40, running=0,
                      waiting=2)]


class TwoWorkers:
    def alive(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in WORKERS if role in (None, w.role) and model in (None, w.model)]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


async def router_metrics_text(requests: int) -> str:
    tokenizer, orchestrator = CharTokenizer(), FakeOrchestrator()
    gateway = Gateway(model_id=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, keys=ApiKeys(()),
                      limiter=None, queue=AdmissionQueue(8, 8), metrics=RouterMetrics.create(MODEL))
    state = RouterState(model=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, watcher=TwoWorkers(),
                        gateway=gateway)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://r") as http:
        for i in range(requests):
            body = {"model": MODEL, "prompt": "Capital of France?", "max_tokens": 4 + i, "stream": i % 2 == 1}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        return (await http.get("/metrics")).text


def worker_metrics_text() -> str:
    recorder = EngineStatsRecorder()
    for size in STEP_SIZES:
        recorder._count_step_tokens(size)
    stats = EngineStats(100, 25, 3, 2, 5, num_preemptions=4, prefix_cache_queries=64, prefix_cache_hits=32,
                        step_tokens_log2=tuple(recorder.step_tokens_log2), step_tokens_sum=recorder.step_tokens_sum)
    metrics = WorkerMetrics(MODEL, "decode")
    metrics.update(stats, [FinishedRequest("length", 0.5, 0.2, 1.5, 40, 8)])
    return generate_latest(metrics.registry).decode()


STEP_SIZES = [1, 2, 3, 8, 9, 16, 17, 100, 512, 513, 5000, 20000]


@pytest.mark.asyncio
async def test_the_dashboards_series_are_exported_by_router_and_workers():
    router = {name for name, _ in samples(await router_metrics_text(2))}
    worker = {name for name, _ in samples(worker_metrics_text())}
    assert DASHBOARD_SERIES - (router | worker) == set()
    assert router >= ROUTER_ONLY and not ({n for n in router if n.startswith("vllm:")}
                                          & {n for n in worker if n.startswith("vllm:")})  # never counted twice


@pytest.mark.asyncio
async def test_vllm_series_carry_vllms_labels_and_tandems_values():
    found = samples(await router_metrics_text(3))
    for (name, labels), _ in found.items():
        if name.startswith("vllm:"):
            assert dict(labels).keys() >= {"model_name", "engine"} and dict(labels)["model_name"] == MODEL, name
    tandem = {"model": MODEL, "role": "router"}
    vllm = {"model_name": MODEL, "engine": "router"}
    for tandem_name, vllm_name in [("tandem_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
                                   ("tandem_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
                                   ("tandem_inter_token_latency_seconds", "vllm:inter_token_latency_seconds"),
                                   ("tandem_inter_token_latency_seconds", "vllm:time_per_output_token_seconds")]:
        for suffix in ("_count", "_sum"):
            assert value(found, vllm_name + suffix, **vllm) == value(found, tandem_name + suffix, **tandem)
    assert value(found, "vllm:time_to_first_token_seconds_count", **vllm) == 3
    for name in ("prompt_tokens_total", "generation_tokens_total"):
        assert value(found, f"vllm:{name}", **vllm) == value(found, f"tandem_{name}", **tandem)
    assert value(found, "vllm:request_prompt_tokens_sum", **vllm) == value(
        found, "tandem_prompt_tokens_total", **tandem)
    assert value(found, "vllm:request_generation_tokens_sum", **vllm) == value(
        found, "tandem_generation_tokens_total", **tandem)
    for reason in ("stop", "length", "abort", "error"):
        assert value(found, "vllm:request_success_total", **vllm, finished_reason=reason) == value(
            found, "tandem_requests_finished_total", **tandem, finish_reason=reason)


@pytest.mark.asyncio
async def test_the_gateway_carries_each_workers_load_and_kv_usage_from_the_registry():
    found = samples(await router_metrics_text(0))
    for worker in WORKERS:
        labels = {"model_name": MODEL, "engine": worker.worker_id}
        assert value(found, "vllm:kv_cache_usage_perc", **labels) == 1 - worker.free_blocks / worker.total_blocks
        assert value(found, "vllm:num_requests_running", **labels) == worker.running
        assert value(found, "vllm:num_requests_waiting", **labels) == worker.waiting


def test_worker_counters_and_tokens_per_step_match_tandems_and_a_prometheus_histogram():
    found = samples(worker_metrics_text())
    vllm = {"model_name": MODEL, "engine": "0"}
    tandem = {"model": MODEL, "role": "decode"}
    for name in ("preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total"):
        vllm_name = "vllm:num_preemptions_total" if name == "preemptions_total" else f"vllm:{name}"
        assert value(found, vllm_name, **vllm) == value(found, f"tandem_{name}", **tandem)
    assert value(found, "vllm:request_queue_time_seconds_sum", **vllm) == value(
        found, "tandem_request_queue_time_seconds_sum", **tandem)
    reference_registry = CollectorRegistry()
    reference = Histogram("ref", "", buckets=VLLM_ITERATION_TOKEN_BUCKETS, registry=reference_registry)
    for size in STEP_SIZES:
        reference.observe(size)
    expected = samples(generate_latest(reference_registry).decode())
    for (name, labels), count in expected.items():
        if name in ("ref_bucket", "ref_sum", "ref_count"):
            got = value(found, name.replace("ref", "vllm:iteration_tokens_total"), **vllm, **dict(labels))
            assert got == count, (name, labels)
