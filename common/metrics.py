"""Prometheus metric definitions, one place for every service. Each process builds its own registry.

Names follow Prometheus conventions: ``tandem_`` prefix, base units, ``_total`` counters, ``_seconds``
histograms. Latencies users feel are measured at the router; workers measure their own phases.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# TTFT and end-to-end from 1 ms to minutes; inter-token latency from 1 ms to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
                         2.5, 5.0)


@dataclass(frozen=True)
class RouterMetrics:
    """What the router exports at /metrics."""

    registry: CollectorRegistry
    requests: Counter
    request_errors: Counter
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
    retries: Counter
    migrations: Counter
    workers: Gauge

    @classmethod
    def create(cls, model: str) -> RouterMetrics:
        registry = CollectorRegistry()
        labels = ("model",)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        metrics = cls(
            registry=registry,
            requests=Counter("tandem_requests_total", "Requests finished, by finish reason or error status",
                             ("model", "endpoint", "outcome"), registry=registry),
            request_errors=Counter("tandem_request_errors_total", "Requests answered with an HTTP error",
                                   ("model", "status"), registry=registry),
            running=Gauge("tandem_router_requests_running", "Requests this router is serving", labels,
                          registry=registry),
            waiting=Gauge("tandem_router_requests_waiting", "Requests queued for admission at this router", labels,
                          registry=registry),
            ttft=histogram("tandem_time_to_first_token_seconds", "Time to first token, at the router",
                           LATENCY_BUCKETS),
            itl=histogram("tandem_inter_token_latency_seconds", "Time between streamed tokens, at the router",
                          TOKEN_LATENCY_BUCKETS),
            tpot=histogram("tandem_time_per_output_token_seconds", "Mean time per output token after the first",
                           TOKEN_LATENCY_BUCKETS),
            e2e=histogram("tandem_e2e_request_latency_seconds", "End-to-end request latency, at the router",
                          LATENCY_BUCKETS),
            queue_time=histogram("tandem_request_queue_time_seconds", "Time waiting for admission at the router",
                                 LATENCY_BUCKETS),
            router_overhead=histogram("tandem_router_added_latency_seconds",
                                      "Router time in a streamed request's TTFT: parse, tokenize, route and "
                                      "dispatch, plus first-event-to-first-byte (admission wait excluded)",
                                      OVERHEAD_BUCKETS),
            prompt_tokens=Counter("tandem_prompt_tokens_total", "Prompt tokens of admitted requests", labels,
                                  registry=registry),
            generation_tokens=Counter("tandem_generation_tokens_total", "Tokens generated and delivered", labels,
                                      registry=registry),
            retries=Counter("tandem_router_retries_total", "Worker failures the router retried around", labels,
                            registry=registry),
            migrations=Counter("tandem_router_migrations_total", "Streams moved to another decode worker", labels,
                               registry=registry),
            workers=Gauge("tandem_workers", "Workers the router sees alive", ("model", "role"), registry=registry),
        )
        return metrics
