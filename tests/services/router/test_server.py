"""The router app's own surface (services/router/server.py): which paths need a key, readiness, unknown routes.

The app is built in-process around test_generate_route's fakes (a character tokenizer, an orchestrator that
spells out a fixed answer) and driven through httpx's ASGI transport.
"""

from __future__ import annotations

import pytest

from common.coord.worker_info import WorkerInfo
from tests.services.router.test_generate_route import API_KEY, MODEL, make_router

GUARDED = [("GET", "/workers"), ("GET", "/v1/models"), ("POST", "/generate"), ("POST", "/v1/completions"),
           ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")]
OPEN = ["/health", "/metrics", "/openapi.json"]


class OneDecodeWorker:
    """A watcher that sees one decode worker (its gRPC address is what /workers must not show to strangers)."""

    def alive(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        worker = WorkerInfo("decode-0", "decode", MODEL, "10.0.0.7:50051", max_model_len=64)
        return [worker] if role in (None, "decode") else []


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "path"), GUARDED)
async def test_with_keys_set_every_path_but_probes_and_scrapes_needs_the_key(method, path):
    http, gateway = make_router(keys=(API_KEY,), watcher=OneDecodeWorker())
    async with http:
        refused = await http.request(method, path, json={"prompt": "Hi", "max_tokens": 2})
        allowed = await http.request(method, path, json={"prompt": "Hi", "max_tokens": 2},
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 401, (path, refused.text)
    assert refused.json()["error"]["code"] == "invalid_api_key" and "10.0.0.7" not in refused.text
    assert refused.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code != 401, (path, allowed.text)
    assert gateway.orchestrator.requests == [] or path in ("/generate", "/v1/completions")


@pytest.mark.asyncio
@pytest.mark.parametrize("path", OPEN)
async def test_probes_scrapes_and_the_schema_answer_without_a_key(path):
    http, _ = make_router(keys=(API_KEY,), watcher=OneDecodeWorker())
    async with http:
        response = await http.get(path)
    assert response.status_code == 200, response.text


@pytest.mark.asyncio
async def test_refused_keys_are_counted_as_401s():
    http, _ = make_router(keys=(API_KEY,))
    async with http:
        await http.get("/workers")
        text = (await http.get("/metrics")).text
    assert f'tandem_request_errors_total{{model="{MODEL}",role="router",status="401"}} 1.0' in text


async def call_with_partial_body(app, path: str) -> list[dict]:
    """Drive the ASGI app as a server would for a client that sends half its body, then hangs up."""
    messages = iter([{"type": "http.request", "body": b'{"prompt": "Hi", "max_', "more_body": True},
                     {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"400")],
             "client": ("127.0.0.1", 5000), "server": ("router", 80)}
    await app(scope, receive, send)
    return sent


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
async def test_a_client_gone_before_its_body_ended_is_an_abort_not_a_500(path):
    http, gateway = make_router()
    app = http._transport.app
    sent = await call_with_partial_body(app, path)
    statuses = [message["status"] for message in sent if message["type"] == "http.response.start"]
    assert statuses and statuses[0] < 500, sent
    async with http:
        text = (await http.get("/metrics")).text
    labels = f'model="{MODEL}",role="router"'
    assert f'tandem_request_errors_total{{{labels},status="500"}} 0.0' in text
    assert f'tandem_requests_finished_total{{finish_reason="abort",{labels}}} 1.0' in text
    assert gateway.orchestrator.requests == []
