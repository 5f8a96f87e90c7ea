"""The planner's load snapshot, from scraped /metrics (bodies written by the real exporters) and from a fake
Prometheus HTTP API, both served on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client import generate_latest

from common.engine.stats import EngineStats
from common.metrics import RouterMetrics, WorkerMetrics
from services.planner.observe import PrometheusSource, ScrapeSource, bucket_quantile, promql
from tests.services.planner.fake_servers import routes_handler, serve


class FakeCluster:
    """A router and two workers whose exporters the test drives; bodies are rendered at each request."""

    def __init__(self) -> None:
        self.router = RouterMetrics.create("m")
        self.workers = {"prefill": WorkerMetrics("m", "prefill"), "decode": WorkerMetrics("m", "decode")}
        self.set_engine("prefill", running=2, waiting=3, prefill_tokens=0, generation_tokens=0)
        self.set_engine("decode", running=40, waiting=0, prefill_tokens=0, generation_tokens=0)

    def set_engine(self, role: str, running: int, waiting: int, prefill_tokens: int, generation_tokens: int) -> None:
        stats = EngineStats(100, 50, running, waiting, running + waiting, prefill_tokens=prefill_tokens,
                            generation_tokens=generation_tokens)
        self.workers[role].update(stats, [])

    def finish(self, role: str, count: int) -> None:
        self.workers[role].finished.labels(model="m", role=role, finish_reason="length").inc(count)

    def routes(self, ports: dict[str, int]) -> dict:
        def text(registry):
            return lambda _query: (200, "text/plain; version=0.0.4", generate_latest(registry).decode())

        targets = [{"targets": [f"127.0.0.1:{ports[role]}"], "labels": {"worker_id": f"{role}-0"}}
                   for role in ("prefill", "decode")]
        return {"/metrics": text(self.router.registry),
                "/prometheus/targets": lambda _query: (200, "application/json", json.dumps(targets))}


def test_bucket_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.1)
    assert bucket_quantile(0.9, buckets) == pytest.approx(0.5 + 0.5 * 6 / 10)
    assert bucket_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1  # in +Inf: the highest finite bound
    assert bucket_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_the_scrape_source_turns_two_scrapes_into_per_pool_rates_and_router_quantiles():
    cluster = FakeCluster()
    with serve(routes_handler({"/metrics": lambda q: (200, "text/plain", generate_latest(
            cluster.workers["prefill"].registry).decode())})) as prefill_url, \
         serve(routes_handler({"/metrics": lambda q: (200, "text/plain", generate_latest(
             cluster.workers["decode"].registry).decode())})) as decode_url:
        ports = {"prefill": int(prefill_url.rsplit(":", 1)[1]), "decode": int(decode_url.rsplit(":", 1)[1])}
        with serve(routes_handler(cluster.routes(ports))) as router_url, httpx.Client(timeout=5) as client:
            source = ScrapeSource(client, router_url)
            assert source.observe(100.0) is None  # one scrape: no rates yet
            cluster.finish("prefill", 40)  # over 10 s: 4 req/s of 500-token prompts
            cluster.set_engine("prefill", running=2, waiting=3, prefill_tokens=20_000, generation_tokens=40)
            cluster.finish("decode", 20)  # 2 req/s of 200 output tokens
            cluster.set_engine("decode", running=40, waiting=0, prefill_tokens=0, generation_tokens=4000)
            for ttft in (0.2,) * 5 + (0.7,) * 5:
                cluster.router.ttft.observe(ttft)
            for tpot in (0.02,) * 10:
                cluster.router.tpot.observe(tpot)
            load = source.observe(110.0)
    assert (load.prefill.replicas, load.decode.replicas) == (1, 1)
    assert load.prefill.request_rate == pytest.approx(4.0) and load.prefill.mean_prompt_tokens == pytest.approx(500)
    assert load.decode.request_rate == pytest.approx(2.0) and load.decode.mean_output_tokens == pytest.approx(200)
    assert load.decode.mean_prompt_tokens == pytest.approx(500) and load.prefill.mean_output_tokens == 200
    assert (load.prefill.running, load.prefill.waiting, load.decode.running) == (2, 3, 40)
    assert load.prefill.ttft_p50_s == pytest.approx(0.25) and 0.5 < load.prefill.ttft_p90_s <= 1.0
    assert 0.015 < load.decode.tpot_p50_s <= 0.02 and load.decode.ttft_p50_s is None


def test_the_prometheus_source_asks_promql_and_reads_vectors_by_role():
    answers = {
        "replicas": [("prefill", 2), ("decode", 3)],
        "finished": [("prefill", 8.0), ("decode", 7.5)],
        "prefill_tokens": [("prefill", 8000.0)],
        "decode_tokens": [("decode", 1500.0)],
        "running": [("prefill", 4), ("decode", 90)],
        "waiting": [("prefill", 1), ("decode", 0)],
        "ttft_p5": [(None, 0.3)], "ttft_p9": [(None, 0.9)], "tpot_p5": [(None, 0.02)], "tpot_p9": [(None, "NaN")],
    }
    by_text = {text: answers[name] for name, text in promql(60).items()}

    def query(params):
        vector = [{"metric": {"role": role} if role else {}, "value": [1.0, str(value)]}
                  for role, value in by_text[params["query"][0]]]
        return 200, "application/json", json.dumps({"status": "success", "data": {"resultType": "vector",
                                                                                  "result": vector}})

    handler = routes_handler({"/api/v1/query": query})
    with serve(handler) as url, httpx.Client(timeout=5) as client:
        load = PrometheusSource(client, url, 60).observe(5.0)
    assert load.at == 5.0
    assert (load.prefill.replicas, load.decode.replicas) == (2, 3)
    assert load.prefill.request_rate == 8.0 and load.prefill.mean_prompt_tokens == 1000
    assert load.decode.request_rate == 7.5 and load.decode.mean_output_tokens == 200
    assert (load.prefill.ttft_p50_s, load.prefill.ttft_p90_s) == (0.3, 0.9)
    assert (load.decode.tpot_p50_s, load.decode.tpot_p90_s) == (0.02, None)  # NaN: no data
    assert len(handler.seen) == len(by_text)
    assert "rate(tandem_time_to_first_token_seconds_bucket{role=\"router\"}[60s])" in promql(60)["ttft_p9"]
