"""``POST /generate`` on the same path as /v1: keys, rate limits, admission queue, validation and metrics.

The router app is built in-process around fakes (a character tokenizer, an orchestrator that spells out a fixed
answer, a watcher with no workers); the rate limiter is the real one on a local redis-server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio

from common.config import CoordConfig
from common.coord import RedisServer, connect
from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams
from common.metrics import RouterMetrics
from services.router.admission import AdmissionQueue, ApiKeys, RateLimiter
from services.router.openai_api import Gateway
from services.router.orchestrator import TokenEvent
from services.router.server import RouterState, build_app

MODEL = "fake-model"
ANSWER = " Paris."
API_KEY = "sk-generate-test"
VOCAB = 256


class CharTokenizer:
    """One token per character (code points below 256), so texts and token counts are easy to predict."""

    is_fast = True

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(i) for i in ids)


def fake_prompt_logprobs(prompt: list[int], k: int) -> tuple[dict[int, Logprob] | None, ...]:
    """What FakeOrchestrator reports as a prompt's logprobs: position i's token at -i/8 with rank i + 1, then its
    k alternatives (the next token ids, below VOCAB) at ranks 1..k with -rank/16; None for the first token."""
    entries: list[dict[int, Logprob] | None] = [None]
    for i, token in enumerate(prompt[1:], start=1):
        entry = {token: Logprob(-i / 8, i + 1)}
        for rank in range(1, k + 1):
            entry.setdefault((token + rank) % VOCAB, Logprob(-rank / 16, rank))
        entries.append(entry)
    return tuple(entries)


class FakeOrchestrator:
    """Answers every request with ANSWER, one token per event (the first with ``fake_prompt_logprobs`` when asked
    for); ``gate`` (when set) holds each stream at its start."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.requests: list[tuple[list[int], SamplingParams, str]] = []

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        self.requests.append((prompt, params, request_id))
        if self.gate is not None:
            await self.gate.wait()
        tokens = [ord(ch) for ch in ANSWER][: params.max_tokens]
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            finish = ("length" if len(tokens) == params.max_tokens else "stop") if last else None
            logprobs = ({token: Logprob(-0.5, 1)},) if params.logprobs is not None else ()
            prompt_logprobs = None
            if i == 0 and params.prompt_logprobs is not None:
                prompt_logprobs = fake_prompt_logprobs(prompt, params.prompt_logprobs)
            yield TokenEvent((token,), logprobs, finish_reason=finish, worker_id="decode-0",
                             prompt_logprobs=prompt_logprobs)

    async def close(self) -> None:
        return None


class NoWorkers:
    redis_reachable = True

    def alive(self, role: str | None = None, model: str | None = None) -> list:
        return []


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def make_router(keys: tuple[str, ...] = (), limiter: RateLimiter | None = None, max_running: int = 8,
                max_waiting: int = 8, watcher: object | None = None, tokenizer: object | None = None,
                **gateway_options) -> tuple[httpx.AsyncClient, Gateway]:
    """The app around the fakes; ``gateway_options`` are further Gateway fields (body limit, context limit)."""
    tokenizer, orchestrator = tokenizer or CharTokenizer(), FakeOrchestrator()
    gateway = Gateway(model_id=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, keys=ApiKeys(keys),
                      limiter=limiter, queue=AdmissionQueue(max_running, max_waiting),
                      metrics=RouterMetrics.create(MODEL), **gateway_options)
    state = RouterState(model=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, watcher=watcher or NoWorkers(),
                        gateway=gateway)
    transport = httpx.ASGITransport(app=build_app(state))
    return httpx.AsyncClient(transport=transport, base_url="http://router", timeout=30), gateway


@pytest_asyncio.fixture
async def router() -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    http, gateway = make_router()
    async with http:
        yield http, gateway


def sse_events(text: str) -> list:
    payloads = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


# ------------------------------------------------------------------------------------------------ shape
@pytest.mark.asyncio
async def test_generate_answers_in_its_own_shape(router):
    http, gateway = router
    response = await http.post("/generate", content=b'{"prompt": "The capital of France is", "max_tokens": 16, '
                                                    b'"temperature": 0, "logprobs": 0}')
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "text", "token_ids", "finish_reason", "stop_reason", "logprobs", "usage"}
    assert body["request_id"].startswith("gen-") and response.headers["x-request-id"] == body["request_id"]
    assert body["text"] == ANSWER and body["token_ids"] == [ord(ch) for ch in ANSWER]
    assert body["finish_reason"] == "stop" and len(body["logprobs"]) == len(ANSWER)
    assert body["usage"] == {"prompt_tokens": len("The capital of France is"), "completion_tokens": len(ANSWER)}
    prompt, params, _ = gateway.orchestrator.requests[0]
    assert params.is_greedy and params.max_tokens == 16 and prompt == CharTokenizer().encode("The capital of France is")


@pytest.mark.asyncio
async def test_generate_streams_one_event_per_step_then_done(router):
    http, _ = router
    body = {"prompt_token_ids": [72, 105], "max_tokens": 3, "stream": True}
    response = await http.post("/generate", json=body, headers={"X-Request-Id": "trace-7"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [e["text"] for e in events] == [" ", "P", "a"] and {e["request_id"] for e in events} == {"trace-7"}
    assert [e["finish_reason"] for e in events] == [None, None, "length"]
    assert set(events[0]) == {"request_id", "text", "token_ids", "finish_reason", "stop_reason", "worker_id",
                              "logprobs"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "temperature": -1}, "temperature"),
        ({"prompt": "Hi", "n": 2}, "n"),
        ({"prompt": "Hi", "logit_bias": {"999": 5}}, "logit_bias"),
        ({"prompt_token_ids": [300]}, "prompt_token_ids"),
        ({"max_tokens": 4}, "prompt"),
    ],
)
@pytest.mark.asyncio
async def test_generate_validates_like_v1(router, body, param):
    http, gateway = router
    response = await http.post("/generate", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert gateway.orchestrator.requests == []


# ------------------------------------------------------------------------------------------------ admission
@pytest.mark.asyncio
async def test_generate_needs_an_api_key_when_keys_are_set():
    http, _ = make_router(keys=(API_KEY,))
    async with http:
        body = {"prompt": "Hi", "max_tokens": 2}
        missing = await http.post("/generate", json=body)
        wrong = await http.post("/generate", json=body, headers={"Authorization": "Bearer nope"})
        good = await http.post("/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert good.status_code == 200 and good.json()["text"] == ANSWER[:2]


@pytest.mark.asyncio
async def test_generate_counts_against_the_same_rate_limit_as_v1(redis_server):
    client = connect(CoordConfig(redis_url=redis_server.url, ttl_s=5.0))
    limiter = RateLimiter(client, f"generate-limit-{id(client)}", requests_per_minute=2, tokens_per_minute=None)
    http, _ = make_router(limiter=limiter)
    try:
        async with http:
            first = await http.post("/generate", json={"prompt": "Hi", "max_tokens": 2})
            second = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            third = await http.post("/generate", json={"prompt": "Hi", "max_tokens": 2})
    finally:
        await client.aclose()
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert third.json()["error"]["code"] == "rate_limit_exceeded" and int(third.headers["retry-after"]) >= 1


@pytest.mark.asyncio
async def test_generate_with_the_admission_queue_full_is_429():
    http, gateway = make_router(max_running=1, max_waiting=0)
    gateway.orchestrator.gate = asyncio.Event()
    async with http:
        held = asyncio.create_task(http.post("/generate", json={"prompt": "Hi", "max_tokens": 2}))
        try:
            for _ in range(500):  # the held request takes the only slot (or the test fails below, not hangs)
                if gateway.queue.stats().running == 1:
                    break
                await asyncio.sleep(0.01)
            second = http.post("/generate", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
            refused = await asyncio.wait_for(second, 10)
        finally:
            gateway.orchestrator.gate.set()
        admitted = await held
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"
    assert admitted.status_code == 200 and gateway.queue.stats().running == 0


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.asyncio
async def test_metrics_count_generate_requests_under_their_endpoint(router):
    http, _ = router
    for stream in (False, True):
        response = await http.post("/generate", json={"prompt": "Hi", "max_tokens": 3, "stream": stream})
        assert response.status_code == 200
    assert (await http.post("/generate", json={"prompt": "Hi", "top_p": 0})).status_code == 400
    text = (await http.get("/metrics")).text
    labels = f'model="{MODEL}",role="router"'
    assert f'tandem_requests_total{{endpoint="generate",{labels}}} 3.0' in text
    assert f'tandem_requests_finished_total{{finish_reason="length",{labels}}} 2.0' in text
    assert f"tandem_time_to_first_token_seconds_count{{{labels}}} 2.0" in text
    assert f"tandem_generation_tokens_total{{{labels}}} 6.0" in text
    assert f'tandem_request_errors_total{{{labels},status="400"}} 1.0' in text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/generate", {"prompt": "hi", "max_tokens": 2**31}, "max_tokens"),
        ("/generate", {"prompt": "hi", "top_k": 2**31}, "top_k"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, "seed"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2**31}, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "max_completion_tokens": 2**40}, "max_completion_tokens"),
    ],
)
async def test_integers_beyond_the_wire_types_are_400s_naming_the_field(router, path, body, param):
    """int32 / int64 on the way to the workers: a larger value is the client's error, never a 500."""
    http, gateway = router
    response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param or param in error["message"], error
    assert gateway.orchestrator.requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/generate", b'{"prompt": "a\\ud800b", "max_tokens": 4}', "prompt"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": ["ok", "a\\ud800b"], "max_tokens": 4}', "prompt[1]"),
        ("/v1/chat/completions",
         b'{"model": "fake-model", "messages": [{"role": "user", "content": "x\\udc00"}]}', "messages[0].content"),
        ("/v1/completions", b'{"model": "fake-model", "prompt": "ab", "stop": ["\\ud800"]}', "stop[0]"),
    ],
)
async def test_a_lone_surrogate_is_a_400_naming_where_it_is(router, path, body, param):
    http, gateway = router
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert gateway.orchestrator.requests == []


@pytest.mark.asyncio
async def test_a_surrogate_pair_is_ordinary_text(router):
    http, _ = router
    body = b'{"model": "fake-model", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    response = await http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
