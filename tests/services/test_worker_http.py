"""A worker's HTTP side: /health always, /ready only when loaded, registered and not draining, /metrics."""

from __future__ import annotations

import httpx
import pytest

from common.metrics import WorkerMetrics
from services.worker_http import WorkerHealth, WorkerHttpServer


@pytest.fixture
def served():
    metrics, health = WorkerMetrics("m", "decode"), WorkerHealth()
    server = WorkerHttpServer("127.0.0.1", 0, metrics.registry, health).start()
    yield f"http://127.0.0.1:{server.port}", health
    server.stop()


def test_health_answers_while_ready_follows_the_lifecycle(served):
    url, health = served
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").status_code == 503  # model still loading
    health.loaded = True
    assert httpx.get(f"{url}/ready").json() == {"ready": False, "loaded": True, "registered": False, "draining": False}
    health.registered = True
    assert httpx.get(f"{url}/ready").status_code == 200
    health.draining = True
    assert httpx.get(f"{url}/ready").status_code == 503
    assert httpx.get(f"{url}/health").status_code == 200


def test_metrics_in_text_and_openmetrics_formats(served):
    url, _ = served
    text = httpx.get(f"{url}/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert 'tandem_requests_finished_total{finish_reason="stop",model="m",role="decode"} 0.0' in text.text
    open_metrics = httpx.get(f"{url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.rstrip().endswith("# EOF")
    assert httpx.get(f"{url}/metrics?x=1").status_code == 200
    assert httpx.get(f"{url}/nope").status_code == 404
