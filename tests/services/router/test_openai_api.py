"""The OpenAI surface against a real local cluster on CPU, through the official `openai` client.

One module-scoped cluster (Redis + router + 1 prefill + 1 decode, SmolLM2) with an API key configured;
extra router processes on the same Redis cover rate limits, a full queue and "no workers".
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import hypothesis
import jsonschema
import openai
import pytest
import schemathesis

from common.engine.llm import LLM
from common.engine.sampling_params import SamplingParams
from services.cluster import LocalCluster, parse_ready_line
from tests.services.test_cluster_e2e import WORKER_ARGS, assert_no_leak, wait_ready

pytestmark = pytest.mark.timeout(600)

API_KEY = "test-key-123"
MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("openai-cluster")
    router_args = ["--heartbeat-s", "0.5", "--ttl-s", "3", "--api-keys", API_KEY, "--local-prefill-max-tokens", "4"]
    with LocalCluster(MODEL, 1, 1, router_port=0, worker_args=WORKER_ARGS, router_args=router_args,
                      run_dir=run_dir) as running:
        wait_ready(running.router_url, 1, 1)
        yield running


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.router_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.router_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_answers_with_usage_counts(client, cluster):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert response.usage.prompt_tokens == 37  # SmolLM2's chat template around this question
    assert response.usage.completion_tokens >= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


@pytest.mark.asyncio
async def test_chat_streaming_sends_role_first_then_deltas_then_usage(aclient):
    stream = await aclient.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs))
    assert whole.id.startswith("cmpl-") and whole.choices[0].text == streamed
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12


def test_n_choices_and_prompt_lists(client):
    response = client.completions.create(model=MODEL, prompt=["1, 2, 3,", "The capital of France is"], max_tokens=4,
                                         temperature=0.8, seed=3, n=2)
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 16


def test_stop_strings_end_the_text_before_them(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                              stop=["Paris"])
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and "Paris" not in choice.message.content
    assert choice.message.content.startswith("The capital")


def test_seed_reproduces_sampled_output(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
                  temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    again = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == again


def test_logprobs_in_the_openai_layouts(client):
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert entries[0].token == entries[0].top_logprobs[0].token  # greedy picks the most likely
    legacy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                       temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == 4 and len(legacy.choices[0].logprobs.token_logprobs) == 4


# ------------------------------------------------------------------------------------------------ prompt logprobs
# lm-evaluation-harness's loglikelihood request (echo with logprobs, one generated token) and vLLM's prompt_logprobs,
# against the single-process engine's prompt logprobs. The router's --local-prefill-max-tokens 4 decides who computes
# them: a prompt of at most 4 tokens is prefilled by the decode worker itself, a longer (uncached) one remotely.
ECHO_PROMPTS = {"remote": "A loglikelihood prompt for the prefill worker to score, token by token.",
                "local": "Score me"}


@pytest.fixture(scope="module")
def single_process():
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
    yield llm
    llm.close()


def placements(cluster) -> dict[str, float]:
    """The router's prefill placements so far, by where they ran (local | remote)."""
    counts = {"local": 0.0, "remote": 0.0}
    for line in httpx.get(f"{cluster.router_url}/metrics").text.splitlines():
        if line.startswith("tandem_router_prefill_placements_total{"):
            counts[re.search(r'placement="(\w+)"', line).group(1)] += float(line.rsplit(" ", 1)[1])
    return counts


def reference_prompt_logprobs(llm: LLM, prompt, k: int):
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k))[0]


@pytest.mark.parametrize("placement", ["remote", "local"])
def test_echo_logprobs_equal_the_engines_prompt_logprobs(client, cluster, single_process, placement):
    prompt = ECHO_PROMPTS[placement]
    before = placements(cluster)
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                         temperature=0)
    after = placements(cluster)
    assert {where: after[where] - before[where] for where in after} == {
        where: float(where == placement) for where in after}, "the prompt was not prefilled where intended"
    reference = reference_prompt_logprobs(single_process, prompt, 1)
    ids, expected = reference.prompt_token_ids, reference.prompt_logprobs
    assert (placement == "local") == (len(ids) <= 4)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert choice.text == prompt + reference.outputs[0].text
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    assert logprobs.tokens[1:len(ids)] == [expected[i][ids[i]].decoded_token for i in range(1, len(ids))]
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(expected[i][ids[i]].logprob, abs=1e-4)
        want = {entry.decoded_token: entry.logprob for entry in expected[i].values()}
        assert logprobs.top_logprobs[i] == pytest.approx(want, abs=1e-4)
    vllm_layout = choice.model_extra["prompt_logprobs"]
    assert vllm_layout[0] is None and len(vllm_layout) == len(ids)
    for entry, want in zip(vllm_layout[1:], expected[1:], strict=True):
        assert {int(t): (e["logprob"], e["rank"], e["decoded_token"]) for t, e in entry.items()} == {
            t: (pytest.approx(lp.logprob, abs=1e-4), lp.rank, lp.decoded_token) for t, lp in want.items()}


def test_chat_prompt_logprobs_equal_the_engines(client, cluster, single_process):
    tokenized = httpx.post(f"{cluster.router_url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": MODEL, "messages": QUESTION}).json()["tokens"]
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0,
                                              extra_body={"prompt_logprobs": 2})
    reference = reference_prompt_logprobs(single_process, {"prompt_token_ids": tokenized}, 2)
    got = response.model_extra["prompt_logprobs"]
    assert len(got) == response.usage.prompt_tokens == len(tokenized) and got[0] is None
    for entry, want in zip(got[1:], reference.prompt_logprobs[1:], strict=True):
        assert {int(t): (e["logprob"], e["rank"]) for t, e in entry.items()} == {
            t: (pytest.approx(lp.logprob, abs=1e-4), lp.rank) for t, lp in want.items()}


def test_request_id_is_echoed(cluster):
    response = httpx.post(f"{cluster.router_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}",
                          "X-Request-Id": "trace-42"}, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": QUESTION, "temperature": 5}, 400, "temperature"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"messages": QUESTION, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"messages": QUESTION, "model": "gpt-9"}, 404, "model"),
    ],
)
def test_invalid_requests_get_openai_errors(cluster, body, status, param):
    payload = {"model": MODEL, **body}
    response = httpx.post(f"{cluster.router_url}/v1/chat/completions", json=payload,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and param in (error["param"] or error["message"])
    assert "Traceback" not in response.text


def test_prompt_longer_than_the_context_names_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[1] * 9000, max_tokens=4)
    error = caught.value.body
    assert "9000" in error["message"] and "maximum context length" in error["message"]
    assert error["code"] == "context_length_exceeded"  # what clients trim on


def test_missing_or_wrong_api_key_is_401(cluster):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.post(f"{cluster.router_url}/v1/completions", headers=headers,
                              json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def start_router(cluster: LocalCluster, *flags: str, namespace: str = "tandem") -> tuple[subprocess.Popen, str]:
    """One more router process on the cluster's Redis (a second replica, or one with other limits)."""
    argv = [sys.executable, "-m", "services.launch", "router", "--model", MODEL, "--redis-url", cluster.redis_url,
            "--namespace", namespace, "--port", "0", "--heartbeat-s", "0.5", "--ttl-s", "3", *flags]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        info = parse_ready_line(line)
        if info is not None:
            return process, info["address"]
        assert time.monotonic() < deadline
    raise AssertionError(f"router exited with {process.wait()}")


def stop_router(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)


def test_rate_limit_is_shared_by_router_replicas_and_says_retry_after(cluster):
    first, first_url = start_router(cluster, "--rate-limit-rpm", "3", "--local-prefill-max-tokens", "4")
    second, second_url = start_router(cluster, "--rate-limit-rpm", "3", "--local-prefill-max-tokens", "4")
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        statuses = [httpx.post(f"{url}/v1/completions", json=body, timeout=60)
                    for url in (first_url, second_url, first_url, second_url)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        assert int(statuses[-1].headers["retry-after"]) >= 1
        assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        stop_router(first)
        stop_router(second)


@pytest.mark.asyncio
async def test_full_admission_queue_is_429(cluster):
    process, url = start_router(cluster, "--max-running", "1", "--max-waiting", "0", "--local-prefill-max-tokens", "4")
    try:
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 24, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=120) as http:
            responses = await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(3)))
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200 and 429 in codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "queue_full"
    finally:
        stop_router(process)


def test_no_workers_is_503_and_not_ready(cluster):
    process, url = start_router(cluster, namespace="empty-pool")
    try:
        assert httpx.get(f"{url}/ready").status_code == 503
        response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    finally:
        stop_router(process)


@pytest.mark.asyncio
async def test_200_streams_complete_and_50_disconnects_leak_nothing(cluster):
    url = f"{cluster.router_url}/v1/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)

    async def one(index: int, http: httpx.AsyncClient) -> str:
        body = {"model": MODEL, "prompt": f"Story number {index}:", "max_tokens": 12, "ignore_eos": True,
                "stream": True, "temperature": 0}
        async with http.stream("POST", url, json=body, headers=headers) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return "done"
                assert '"error"' not in line, line
                seen += line.startswith("data: ")
                if index < 50 and seen >= 3:
                    return "left"  # leaving the context closes the connection mid-stream
        return "truncated"

    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        results = await asyncio.gather(*(one(i, http) for i in range(200)))
    assert results.count("done") == 150 and results.count("left") == 50
    assert_no_leak(cluster, timeout=60)


def test_openapi_schema_is_served(cluster):
    schema = httpx.get(f"{cluster.router_url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(
        schema["paths"])


def test_metrics_count_requests(cluster, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    text = httpx.get(f"{cluster.router_url}/metrics").text
    assert "tandem_time_to_first_token_seconds_bucket" in text and 'endpoint="completion"' in text
    assert 'tandem_requests_finished_total{finish_reason="length",model="smollm2",role="router"} 0.0' not in text


# ------------------------------------------------------------------------------------------------ fuzzing
FUZZED_OPERATIONS = [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
                     ("/generate", "POST"), ("/health", "GET"), ("/ready", "GET"), ("/metrics", "GET")]


def bounded(body: object) -> object:
    """Keep generated requests cheap on a CPU worker: few tokens and few choices; every other field is fuzzed."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = max(-1, min(body[key], 4))
        if isinstance(body.get("n"), int):
            body["n"] = max(-1, min(body["n"], 2))
    return body


@pytest.mark.parametrize(("path", "method"), FUZZED_OPERATIONS)
def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(cluster, path, method):
    """Property-based requests generated from the router's own /openapi.json (schemathesis + hypothesis)."""
    schema = schemathesis.openapi.from_url(f"{cluster.router_url}/openapi.json")
    operation = schema[path][method]

    @hypothesis.given(case=operation.as_strategy())
    @hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
                         database=None)
    def check(case) -> None:
        case.body = bounded(case.body)
        response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        assert "Traceback" not in response.text

    check()


def test_after_fuzzing_every_block_is_back(cluster):
    assert_no_leak(cluster, timeout=60)


# ------------------------------------------------------------------------------------------------ tool calls
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


@pytest.fixture(scope="module")
def tool_client(cluster):
    """A router started for tool_choice "auto" with the Hermes parser, on the module's workers."""
    process, url = start_router(cluster, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                "--local-prefill-max-tokens", "4")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    stop_router(process)


def assert_well_formed_tool_answer(choice) -> None:
    """Whatever the model chose: calls with known names and JSON object arguments (finish "tool_calls"), or
    plain content."""
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.function.name == "get_weather"
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")


def test_auto_tool_choice_on_smollm2_is_well_formed_and_streams_the_same(tool_client):
    kwargs = dict(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], max_tokens=48, temperature=0)
    whole = tool_client.chat.completions.create(**kwargs)
    assert_well_formed_tool_answer(whole.choices[0])
    chunks = list(tool_client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [item for c in chunks if c.choices for item in c.choices[0].delta.tool_calls or []]
    assert content == (whole.choices[0].message.content or "")
    assert [item.function.name for item in calls if item.id] == [
        call.function.name for call in whole.choices[0].message.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_follow_up_with_a_tool_call_and_its_result_answers(tool_client):
    messages = [*WEATHER_QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees Celsius"}]
    response = tool_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                   max_tokens=24, temperature=0)
    assert_well_formed_tool_answer(response.choices[0])
    assert response.usage.prompt_tokens > 150  # the tools block and the tool turns are in the prompt


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_always_give_valid_calls(tool_client, stream):
    schema = WEATHER_TOOL["function"]["parameters"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        kwargs = dict(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice=choice,
                      max_tokens=64, temperature=0.8, seed=5)
        if stream:
            chunks = list(tool_client.chat.completions.create(stream=True, **kwargs))
            items = [item for c in chunks if c.choices for item in c.choices[0].delta.tool_calls or []]
            names = [item.function.name for item in items if item.id]
            arguments = ["".join(i.function.arguments for i in items if i.index == k) for k in range(len(names))]
        else:
            calls = tool_client.chat.completions.create(**kwargs).choices[0].message.tool_calls
            names = [call.function.name for call in calls]
            arguments = [call.function.arguments for call in calls]
        assert names and set(names) == {"get_weather"}
        for text in arguments:
            jsonschema.validate(json.loads(text), schema)
