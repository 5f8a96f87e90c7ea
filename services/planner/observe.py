"""The planner's eyes: a ``ClusterLoad`` (one ``PoolLoad`` per pool) from the cluster's metrics.

Two sources behind one interface (``LoadSource.observe(now)``):
  ``PrometheusSource``: PromQL over the Prometheus HTTP API (``rate(...[window])``, ``histogram_quantile``);
  ``ScrapeSource``:     the workers' /metrics found through the router's /prometheus/targets, plus the router's
                        own /metrics (TTFT / TPOT are measured there); rates are the differences of two scrapes,
                        so its first call only takes the first scrape and returns None.
Per pool: requests a second = rate of its workers' ``tandem_requests_finished_total``; mean prompt tokens =
prefill workers' ``tandem_prefill_tokens_total`` rate over it (what prefill computes: prefix-cache hits are
excluded); mean output tokens = decode workers' ``tandem_generation_tokens_total`` rate over theirs; running /
waiting summed; TTFT / TPOT quantiles from the router's histograms over the window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.planner.load import ClusterLoad, PoolLoad

ROLES = ("prefill", "decode")
TTFT = "tandem_time_to_first_token_seconds"
TPOT = "tandem_time_per_output_token_seconds"
TOKENS_BY_ROLE = {"prefill": "tandem_prefill_tokens_total", "decode": "tandem_generation_tokens_total"}
# A sample's identity: (metric name, sorted label pairs)
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class LoadSource(Protocol):
    def observe(self, now: float) -> ClusterLoad | None:
        """The load over the last window at `now` (None: not enough data yet)."""


@dataclass(frozen=True)
class PoolFigures:
    """One pool's raw figures, before they become a ``PoolLoad``."""

    replicas: int
    finished_per_s: float
    tokens_per_s: float
    running: float
    waiting: float


def pool_load(role: str, figures: PoolFigures, ttft: Sequence[float | None], tpot: Sequence[float | None]) -> PoolLoad:
    """A pool's load from its figures and the router's (p50, p90) TTFT and TPOT (each filed under its pool)."""
    rate = figures.finished_per_s
    per_request = figures.tokens_per_s / rate if rate > 0 else 0.0
    prompt, output = (per_request, 0.0) if role == "prefill" else (0.0, per_request)
    return PoolLoad(role, figures.replicas, rate, prompt, output, figures.running, figures.waiting,
                    *(ttft if role == "prefill" else (None, None)), *(tpot if role == "decode" else (None, None)))


def cluster_load(now: float, figures: Mapping[str, PoolFigures], ttft: Sequence[float | None],
                 tpot: Sequence[float | None]) -> ClusterLoad:
    """Both pools; each prefill-pool request's prompt and each decode-pool request's output, paired up."""
    prefill, decode = (pool_load(role, figures[role], ttft, tpot) for role in ROLES)
    return ClusterLoad(now, _with(prefill, output=decode.mean_output_tokens),
                       _with(decode, prompt=prefill.mean_prompt_tokens))


def _with(load: PoolLoad, prompt: float | None = None, output: float | None = None) -> PoolLoad:
    return replace(load, mean_prompt_tokens=load.mean_prompt_tokens if prompt is None else prompt,
                   mean_output_tokens=load.mean_output_tokens if output is None else output)


def bucket_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile on cumulative (le, count) buckets: linear inside the bucket holding the
    rank; the highest finite bound when it falls in +Inf; None without observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


# ---------------------------------------------------------------------------------------------------- scraping


def parse_samples(text: str) -> dict[SampleKey, float]:
    """A /metrics body as {(name, labels): value} (histogram buckets, sums and counts as their own names)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: Mapping[SampleKey, float], name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and match.items() <= dict(labels).items())


def _role_of(samples: Mapping[SampleKey, float]) -> str | None:
    return next((dict(labels).get("role") for (n, labels) in samples if n == "tandem_requests_running"), None)


def _buckets(before: Mapping[SampleKey, float], after: Mapping[SampleKey, float],
             name: str) -> list[tuple[float, float]]:
    """Per `le`, the bucket count added between two scrapes (summed over other labels)."""
    added: dict[float, float] = {}
    for (n, labels), value in after.items():
        if n == name + "_bucket":
            le = float(dict(labels)["le"])
            added[le] = added.get(le, 0.0) + value - before.get((n, labels), 0.0)
    return list(added.items())


@dataclass(frozen=True)
class Scrape:
    """One look at every worker's samples (by target) and the router's, at `at` seconds."""

    at: float
    workers: Mapping[str, Mapping[SampleKey, float]]
    router: Mapping[SampleKey, float]


class ScrapeSource:
    """The workers' /metrics from the router's /prometheus/targets, and the router's /metrics, via `client`."""

    def __init__(self, client: httpx.Client, router_url: str) -> None:
        self.client, self.router_url = client, router_url.rstrip("/")
        self.previous: Scrape | None = None

    def scrape(self, now: float) -> Scrape:
        groups = self.client.get(f"{self.router_url}/prometheus/targets").raise_for_status().json()
        workers = {}
        for target in (t for group in groups for t in group["targets"]):
            try:
                workers[target] = parse_samples(self.client.get(f"http://{target}/metrics").raise_for_status().text)
            except httpx.HTTPError:
                continue  # a worker going away between the listing and the scrape: counted as gone
        router = parse_samples(self.client.get(f"{self.router_url}/metrics").raise_for_status().text)
        return Scrape(now, workers, router)

    def observe(self, now: float) -> ClusterLoad | None:
        current, previous = self.scrape(now), self.previous
        self.previous = current
        if previous is None or current.at <= previous.at:
            return None
        return load_between(previous, current)


def load_between(before: Scrape, after: Scrape) -> ClusterLoad:
    """The load from two scrapes: counters' differences over the time between them (a worker that restarted,
    its counters lower than before, counts from zero)."""
    elapsed = after.at - before.at
    figures = {role: PoolFigures(0, 0.0, 0.0, 0.0, 0.0) for role in ROLES}
    for target, now in after.workers.items():
        role = _role_of(now)
        if role in figures:
            figures[role] = _plus(figures[role], _worker_figures(role, before.workers.get(target, {}), now, elapsed))
    ttft = _buckets(before.router, after.router, TTFT)
    tpot = _buckets(before.router, after.router, TPOT)
    return cluster_load(after.at, figures, [bucket_quantile(q, ttft) for q in (0.5, 0.9)],
                        [bucket_quantile(q, tpot) for q in (0.5, 0.9)])


def _worker_figures(role: str, then: Mapping[SampleKey, float], now: Mapping[SampleKey, float],
                    elapsed: float) -> PoolFigures:
    def per_s(name: str) -> float:
        new, old = _total(now, name), _total(then, name)
        return (new - old if new >= old else new) / elapsed

    return PoolFigures(1, per_s("tandem_requests_finished_total"), per_s(TOKENS_BY_ROLE[role]),
                       _total(now, "tandem_requests_running"), _total(now, "tandem_requests_waiting"))


def _plus(a: PoolFigures, b: PoolFigures) -> PoolFigures:
    return PoolFigures(a.replicas + b.replicas, a.finished_per_s + b.finished_per_s, a.tokens_per_s + b.tokens_per_s,
                       a.running + b.running, a.waiting + b.waiting)


# ---------------------------------------------------------------------------------------------------- Prometheus


def promql(window_s: float) -> dict[str, str]:
    """The queries, by what they give; each answers one series per role (or one series)."""
    w = f"[{window_s:g}s]"
    workers = 'role=~"prefill|decode"'
    return {
        "replicas": f"count by (role) (tandem_requests_running{{{workers}}})",
        "finished": f"sum by (role) (rate(tandem_requests_finished_total{{{workers}}}{w}))",
        "prefill_tokens": f'sum by (role) (rate(tandem_prefill_tokens_total{{role="prefill"}}{w}))',
        "decode_tokens": f'sum by (role) (rate(tandem_generation_tokens_total{{role="decode"}}{w}))',
        "running": f"sum by (role) (tandem_requests_running{{{workers}}})",
        "waiting": f"sum by (role) (tandem_requests_waiting{{{workers}}})",
        **{f"{name}_p{q}": f'histogram_quantile(0.{q}, sum by (le) (rate({metric}_bucket{{role="router"}}{w})))'
           for name, metric in (("ttft", TTFT), ("tpot", TPOT)) for q in (5, 9)},
    }


class PrometheusSource:
    """The load from the Prometheus HTTP API at `url` (GET /api/v1/query), over `window_s`."""

    def __init__(self, client: httpx.Client, url: str, window_s: float) -> None:
        self.client, self.url, self.queries = client, url.rstrip("/"), promql(window_s)

    def query(self, promql_text: str) -> dict[str, float]:
        """An instant query's vector as {role or "": value} (NaN values, as from an empty histogram, left out)."""
        body = self.client.get(f"{self.url}/api/v1/query", params={"query": promql_text}).raise_for_status().json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus: {body.get('error', body)} for {promql_text}")
        return {item["metric"].get("role", ""): float(item["value"][1]) for item in body["data"]["result"]
                if not math.isnan(float(item["value"][1]))}

    def observe(self, now: float) -> ClusterLoad:
        got = {name: self.query(text) for name, text in self.queries.items()}
        tokens = {"prefill": got["prefill_tokens"], "decode": got["decode_tokens"]}
        figures = {role: PoolFigures(int(got["replicas"].get(role, 0)), got["finished"].get(role, 0.0),
                                     tokens[role].get(role, 0.0), got["running"].get(role, 0.0),
                                     got["waiting"].get(role, 0.0)) for role in ROLES}
        ttft = [got[f"ttft_p{q}"].get("") for q in (5, 9)]
        tpot = [got[f"tpot_p{q}"].get("") for q in (5, 9)]
        return cluster_load(now, figures, ttft, tpot)
