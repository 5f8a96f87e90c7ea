"""The router app's own surface (services/router/server.py): which paths need a key, readiness, unknown routes.

The app is built in-process around test_generate_route's fakes (a character tokenizer, an orchestrator that
spells out a fixed answer) and driven through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from transformers import AutoTokenizer

from common.coord.worker_info import WorkerInfo
from common.models.loader import resolve_model_path
from services.router.orchestrator import NoWorkersError
from tests.services.router.test_generate_route import API_KEY, MODEL, CharTokenizer, NoWorkers, make_router

GUARDED = [("GET", "/workers"), ("GET", "/v1/models"), ("POST", "/generate"), ("POST", "/v1/completions"),
           ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")]
OPEN = ["/health", "/metrics", "/openapi.json"]


class OneDecodeWorker:
    """A watcher that sees one decode worker (its gRPC address is what /workers must not show to strangers)."""

    def __init__(self, redis_reachable: bool = True) -> None:
        self.redis_reachable = redis_reachable

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


# ------------------------------------------------------------------------------------------------ large bodies
BODY_LIMIT = 4096
LARGE_BODIES = [("/generate", {"prompt": "x" * BODY_LIMIT}),
                ("/v1/completions", {"model": MODEL, "prompt": "x" * BODY_LIMIT}),
                ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]})]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body"), LARGE_BODIES)
async def test_a_body_past_the_limit_is_a_413_in_openai_shape(path, body):
    http, gateway = make_router(max_body_bytes=BODY_LIMIT)
    async with http:
        response = await http.post(path, json=body)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert gateway.orchestrator.requests == []


@pytest.mark.asyncio
async def test_a_streamed_body_is_refused_once_past_the_limit_not_read_to_its_end():
    """No Content-Length (chunked): the router stops reading after the limit instead of buffering everything."""
    http, _ = make_router(max_body_bytes=BODY_LIMIT)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(100_000):  # 100 MB if read to the end
            sent += 1024
            yield b"x" * 1024

    async with http:
        response = await http.post("/generate", content=endless())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert response.headers["connection"] == "close"
    assert sent <= BODY_LIMIT + 2 * 1024


class CountingTokenizer(CharTokenizer):
    """Characters as tokens; counts the characters it was asked to tokenize or template."""

    def __init__(self) -> None:
        self.chars_seen = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.chars_seen += len(text)
        return super().encode(text, add_special_tokens)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs) -> str:
        self.chars_seen += sum(len(message["content"]) for message in messages)
        return "".join(message["content"] for message in messages)


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "y" * 300}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "y" * 300]}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "y" * 150},
                                                           {"role": "user", "content": "y" * 150}]}, "messages"),
])
async def test_text_longer_than_any_context_is_refused_before_it_is_tokenized(path, body, param):
    """max_model_len 64 and at most 4 characters a token: 300 characters cannot fit, whatever they tokenize to."""
    tokenizer = CountingTokenizer()
    http, gateway = make_router(tokenizer=tokenizer, context_limit=lambda: 64, max_chars_per_token=4)
    async with http:
        response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert "64" in error["message"] and "300" in error["message"]
    assert tokenizer.chars_seen <= 2 and gateway.orchestrator.requests == []


def test_the_chars_per_token_bound_holds_for_the_real_vocabulary(smollm2_tokenizer):
    """The bound the cheap check uses is never below what a real text needs (here: runs of '#' and spaces,
    which SmolLM2 packs into its longest tokens)."""
    from services.router.openai_api import max_chars_per_token

    bound = max_chars_per_token(smollm2_tokenizer)
    for text in ("#" * 5000, " " * 5000, "\n" + " " * 5000, "word " * 1000):
        assert len(text) <= bound * len(smollm2_tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2", None))


@pytest.fixture
def served_app(smollm2_tokenizer) -> Iterator[str]:
    """The router app (real tokenizer, fake workers) under uvicorn on its own thread and event loop."""
    http, _ = make_router(tokenizer=smollm2_tokenizer)
    server = uvicorn.Server(uvicorn.Config(http._transport.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_health_answers_while_a_large_prompt_is_tokenized(served_app, smollm2_tokenizer):
    """Tokenizing runs off the event loop: /health keeps answering meanwhile. Bounds are relative to the measured
    tokenization time, so a slow, loaded machine slows both sides alike."""
    prompt = "hello world " * 150_000
    started = time.perf_counter()
    smollm2_tokenizer.encode(prompt)
    tokenize_s = time.perf_counter() - started
    async with httpx.AsyncClient(base_url=served_app, timeout=60) as http:
        large = asyncio.create_task(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                                       "max_tokens": 2}))
        await asyncio.sleep(tokenize_s / 10)  # the body is up and being tokenized
        latencies = []
        while not large.done():
            sent = time.perf_counter()
            assert (await http.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - sent)
        assert (await large).status_code == 200
    assert len(latencies) >= 3, (latencies, tokenize_s)
    assert max(latencies) < tokenize_s / 3, (max(latencies), tokenize_s)


# ------------------------------------------------------------------------------------------------ readiness, 503s
@pytest.mark.asyncio
@pytest.mark.parametrize(("watcher", "status"), [(OneDecodeWorker(), 200),
                                                 (OneDecodeWorker(redis_reachable=False), 503), (NoWorkers(), 503)])
async def test_ready_needs_redis_and_a_decode_worker(watcher, status):
    http, _ = make_router(watcher=watcher)
    async with http:
        response = await http.get("/ready")
    assert response.status_code == status, response.text
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1 and response.json()["error"]["type"] == "server_error"


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_no_worker_can_take_is_a_503_with_retry_after(stream):
    http, gateway = make_router()

    async def no_workers(prompt, params, request_id):
        raise NoWorkersError("no decode worker could serve the request")
        yield  # an async generator, as Orchestrator.generate is

    gateway.orchestrator.generate = no_workers
    async with http:
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "stream": stream})
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1


# ------------------------------------------------------------------------------------------------ small ones
@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
])
async def test_created_is_when_the_request_was_answered_not_when_the_router_started(path, body):
    http, gateway = make_router(tokenizer=CountingTokenizer())
    gateway.created = 1_000_000  # the router started long ago
    async with http:
        whole = (await http.post(path, json=body)).json()
        streamed = (await http.post(path, json={**body, "stream": True})).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    now = time.time()
    assert abs(whole["created"] - now) < 60, whole
    assert chunks and all(abs(chunk["created"] - now) < 60 for chunk in chunks), chunks


CONTEXT_REQUESTS = [
    ("/generate", {"prompt": "x" * 30}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "x" * 30]}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 30}]}, "messages"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body", "param"), CONTEXT_REQUESTS)
async def test_a_prompt_past_the_context_is_context_length_exceeded(path, body, param):
    """30 tokens for a 20-token context: OpenAI's code, which clients trim on, and both lengths."""
    http, gateway = make_router(tokenizer=CountingTokenizer(), context_limit=lambda: 20)
    async with http:
        response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert "20" in error["message"] and "30" in error["message"]
    assert gateway.orchestrator.requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "x" * 10, "max_tokens": 11}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 10, "max_tokens": 11}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 10}],
                              "max_completion_tokens": 11}, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 10}],
                              "max_tokens": 11}, "max_tokens"),
])
async def test_an_explicit_max_tokens_past_the_context_is_a_400_not_cut(path, body, param):
    http, gateway = make_router(tokenizer=CountingTokenizer(), context_limit=lambda: 20)
    async with http:
        refused = await http.post(path, json=body)
        fits = await http.post(path, json={**body, param: 10})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert "21 tokens (10 in the" in error["message"]
    assert fits.status_code == 200, fits.text
    assert [params.max_tokens for _, params, _ in gateway.orchestrator.requests] == [10]


@pytest.mark.asyncio
async def test_the_default_max_tokens_of_completions_is_not_an_explicit_one():
    """/v1/completions defaults to 16 tokens; a prompt that leaves fewer is served (the worker stops at the end)."""
    http, _ = make_router(tokenizer=CountingTokenizer(), context_limit=lambda: 20)
    async with http:
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10})
    assert response.status_code == 200, response.text


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "Hi"}),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
])
@pytest.mark.parametrize(("field", "value"), [("stop_token_ids", [5, 999]), ("logit_bias", {"999": 1.0})])
async def test_an_out_of_vocabulary_token_id_names_its_field(path, body, field, value):
    http, gateway = make_router(tokenizer=CountingTokenizer())
    async with http:
        response = await http.post(path, json={**body, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "999" in error["message"]
    assert gateway.orchestrator.requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nothing"), ("POST", "/v2/chat/completions"),
                                              ("DELETE", "/v1/completions")])
async def test_an_unknown_route_is_invalid_url_not_model_not_found(method, path):
    http, _ = make_router()
    async with http:
        response = await http.request(method, path)
    assert response.status_code in (404, 405), response.text
    error = response.json()["error"]
    assert error["code"] is None and error["message"] == f"Invalid URL ({method} {path})"
    assert error["type"] == "invalid_request_error"
