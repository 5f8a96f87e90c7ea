"""vLLM's extra endpoints and chat fields on the router: /tokenize, /detokenize, /version, /v1/models/{id},
``--chat-template``, ``chat_template_kwargs``, ``add_generation_prompt`` and ``continue_final_message``.

The router app runs in-process around SmolLM2's real tokenizer and the fake orchestrator of test_generate_route
(which records the prompt ids it is sent); references are the HF tokenizer's own ``encode`` /
``apply_chat_template`` / ``decode`` and jinja2 rendering the template directly.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import AsyncIterator

import httpx
import jinja2
import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from common.coord.worker_info import WorkerInfo
from common.engine.outputs import Logprob
from common.metrics import RouterMetrics
from common.models.loader import resolve_model_path
from services.router.admission import AdmissionQueue, ApiKeys
from services.router.openai_api import Gateway
from services.router.orchestrator import TokenEvent
from services.router.server import RouterState, build_app
from services.router.vllm_api import load_chat_template
from tests.services.router.test_generate_route import FakeOrchestrator, fake_prompt_logprobs

MODEL = "smollm2"
API_KEY = "sk-vllm-api-test"
MAX_MODEL_LEN = 2048
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
CONTINUED = [*MESSAGES, {"role": "assistant", "content": "The capital of"}]
KWARGS_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                   "{% if add_generation_prompt %}<assistant{{ persona | default('') }}>{% endif %}")


class OneDecodeWorker:
    """A registry snapshot with one decode worker of MAX_MODEL_LEN."""

    def alive(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        worker = WorkerInfo("decode-0", "decode", MODEL, "127.0.0.1:1", max_model_len=MAX_MODEL_LEN)
        return [worker] if role in (None, "decode") and model in (None, MODEL) else []


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(MODEL, None))


def make_router(tokenizer, keys: tuple[str, ...] = (), orchestrator=None) -> tuple[httpx.AsyncClient, FakeOrchestrator]:
    orchestrator = orchestrator or FakeOrchestrator()
    gateway = Gateway(model_id=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, keys=ApiKeys(keys),
                      limiter=None, queue=AdmissionQueue(8, 8), metrics=RouterMetrics.create(MODEL))
    state = RouterState(model=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, watcher=OneDecodeWorker(),
                        gateway=gateway)
    transport = httpx.ASGITransport(app=build_app(state))
    return httpx.AsyncClient(transport=transport, base_url="http://router", timeout=30), orchestrator


@pytest_asyncio.fixture
async def router(hf_tokenizer) -> AsyncIterator[tuple[httpx.AsyncClient, FakeOrchestrator]]:
    http, orchestrator = make_router(hf_tokenizer)
    async with http:
        yield http, orchestrator


# ---------------------------------------------------------------------------------------------- /tokenize
@pytest.mark.asyncio
async def test_tokenize_a_prompt_as_the_tokenizer_does(router, hf_tokenizer):
    http, _ = router
    prompt = "The capital of France is"
    reply = await http.post("/tokenize", json={"model": MODEL, "prompt": prompt, "return_token_strs": True})
    assert reply.status_code == 200
    expected = hf_tokenizer(prompt)["input_ids"]
    assert reply.json() == {"count": len(expected), "max_model_len": MAX_MODEL_LEN, "tokens": expected,
                            "token_strs": hf_tokenizer.convert_ids_to_tokens(expected)}
    bare = (await http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False})).json()
    assert bare["tokens"] == hf_tokenizer(prompt, add_special_tokens=False)["input_ids"] and bare["token_strs"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize("messages, extra", [
    (MESSAGES, {}),
    (MESSAGES, {"add_generation_prompt": False}),
    (CONTINUED, {"add_generation_prompt": False, "continue_final_message": True}),
])
async def test_tokenize_messages_as_the_chat_template_does(router, hf_tokenizer, messages, extra):
    http, _ = router
    reply = await http.post("/tokenize", json={"model": MODEL, "messages": messages, **extra})
    assert reply.status_code == 200, reply.text
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=extra.get("add_generation_prompt", True),
        continue_final_message=extra.get("continue_final_message", False))
    assert reply.json()["tokens"] == list(expected) and reply.json()["count"] == len(expected)


@pytest.mark.asyncio
@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/tokenize", {"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
async def test_bad_input_is_an_openai_error_naming_the_field(router, path, body, status, param):
    http, _ = router
    reply = await http.post(path, json=body)
    assert reply.status_code == status
    assert reply.json()["error"]["param"] == param


@pytest.mark.asyncio
async def test_not_json_is_a_400(router):
    http, _ = router
    reply = await http.post("/tokenize", content=b"{nope")
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- /detokenize, /version
@pytest.mark.asyncio
async def test_detokenize_inverts_tokenize(router, hf_tokenizer):
    http, _ = router
    tokens = hf_tokenizer("Paris is lovely in spring.", add_special_tokens=False)["input_ids"]
    reply = await http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert reply.json() == {"prompt": hf_tokenizer.decode(tokens)}


@pytest.mark.asyncio
async def test_version_is_the_installed_package_version(router):
    http, _ = router
    reply = await http.get("/version")
    assert reply.json() == {"version": importlib.metadata.version("tandem")}


# ---------------------------------------------------------------------------------------------- /v1/models/{id}
@pytest.mark.asyncio
async def test_the_openai_client_retrieves_the_model(router):
    http, _ = router
    client = openai.AsyncOpenAI(base_url="http://router/v1", api_key="none", http_client=http, max_retries=0)
    card = await client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4")


# ---------------------------------------------------------------------------------------------- API keys
@pytest.mark.asyncio
@pytest.mark.parametrize("method, path, body", [
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
    ("GET", "/version", None),
    ("GET", f"/v1/models/{MODEL}", None),
])
async def test_the_endpoints_need_the_key_when_keys_are_set(hf_tokenizer, method, path, body):
    http, _ = make_router(hf_tokenizer, keys=(API_KEY,))
    async with http:
        refused = await http.request(method, path, json=body)
        allowed = await http.request(method, path, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200


# ---------------------------------------------------------------------------------------------- chat fields
@pytest.mark.asyncio
async def test_chat_template_kwargs_and_add_generation_prompt_reach_the_template(hf_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MODEL, None))
    tokenizer.chat_template = load_chat_template(KWARGS_TEMPLATE)
    http, orchestrator = make_router(tokenizer)
    template = jinja2.Environment().from_string(KWARGS_TEMPLATE)
    async with http:
        for extra, variables in [({}, {"add_generation_prompt": True}),
                                 ({"chat_template_kwargs": {"persona": "-pirate"}},
                                  {"add_generation_prompt": True, "persona": "-pirate"}),
                                 ({"add_generation_prompt": False}, {"add_generation_prompt": False})]:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}
            reply = await http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            expected = template.render(messages=MESSAGES, **variables)
            assert orchestrator.requests[-1][0] == tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.asyncio
async def test_continue_final_message_continues_the_assistant_turn(router, hf_tokenizer):
    http, orchestrator = router
    body = {"model": MODEL, "messages": CONTINUED, "max_tokens": 2, "add_generation_prompt": False,
            "continue_final_message": True}
    reply = await http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    expected = hf_tokenizer.apply_chat_template(CONTINUED, tokenize=False, continue_final_message=True)
    assert expected.endswith("The capital of")
    assert orchestrator.requests[-1][0] == hf_tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.asyncio
@pytest.mark.parametrize("extra, param", [
    ({"messages": CONTINUED, "continue_final_message": True}, "continue_final_message"),  # generation prompt too
    ({"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": False},
     "continue_final_message"),  # the last message is the user's
    ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"messages": MESSAGES, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ({"messages": MESSAGES, "add_generation_prompt": 1}, "add_generation_prompt"),
])
async def test_bad_rendering_fields_are_400s(router, extra, param):
    http, _ = router
    reply = await http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, **extra})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


# ---------------------------------------------------------------------------------------------- --chat-template
def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "llama3.jinja"
    path.write_text(KWARGS_TEMPLATE)
    assert load_chat_template(str(path)) == KWARGS_TEMPLATE
    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"  # shell-escaped


@pytest.mark.parametrize("value, words", [
    ("templates/missing.jinja", "looks like a file path"),
    ("{% for m in messages %}", "not a valid Jinja template"),
])
def test_a_bad_chat_template_is_refused_with_the_reason(value, words):
    with pytest.raises(ValueError, match=words):
        load_chat_template(value)


# ---------------------------------------------------------------------------------------------- request_id, priority
@pytest.mark.asyncio
@pytest.mark.parametrize("path, body, prefix", [
    ("/v1/chat/completions", {"messages": MESSAGES}, "chatcmpl-"),
    ("/v1/completions", {"prompt": "The capital of France is"}, "cmpl-"),
])
async def test_request_id_names_the_response_and_x_request_id_wins(router, path, body, prefix):
    http, _ = router
    body = {"model": MODEL, "max_tokens": 2, **body}
    named = await http.post(path, json={**body, "request_id": "abc-123"})
    assert named.json()["id"] == f"{prefix}abc-123"
    both = await http.post(path, json={**body, "request_id": "abc-123"}, headers={"X-Request-Id": "hdr-9"})
    assert both.json()["id"] == f"{prefix}hdr-9" and both.headers["x-request-id"] == "hdr-9"
    streamed = await http.post(path, json={**body, "request_id": "s-1", "stream": True})
    ids = {json.loads(line[6:])["id"] for line in streamed.text.splitlines() if line.startswith("data: {")}
    assert ids == {f"{prefix}s-1"}
    anonymous = (await http.post(path, json=body)).json()["id"]
    assert anonymous.startswith(prefix) and len(anonymous) == len(prefix) + 32
    bad = await http.post(path, json={**body, "request_id": "has space"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"


@pytest.mark.asyncio
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "Hi"}),
])
async def test_priority_zero_is_served_and_others_are_refused_as_vllm_does_without_priority_scheduling(
        router, path, body):
    http, _ = router
    body = {"model": MODEL, "max_tokens": 2, **body}
    assert (await http.post(path, json={**body, "priority": 0})).status_code == 200
    refused = await http.post(path, json={**body, "priority": -5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
    assert "priority scheduling is not enabled" in refused.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- stop_reason
class EndsWith:
    """Answers "ab" and ends it with the wire's stop_reason text (what the workers send: a stop string, a stop token
    id as digits, or nothing for EOS)."""

    def __init__(self, wire_reason: str | None) -> None:
        self.wire_reason = wire_reason

    async def generate(self, prompt, params, request_id):
        yield TokenEvent((97,), (), worker_id="decode-0")
        yield TokenEvent((98,), (), finish_reason="stop", stop_reason=self.wire_reason, worker_id="decode-0")

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
@pytest.mark.parametrize("wire, sampling, expected", [
    ("7", {"stop_token_ids": [7]}, 7),  # a stop token id comes back as an int
    ("7", {"stop": ["7"], "stop_token_ids": [7]}, "7"),  # a stop string that reads like a number stays text
    ("\n\n", {"stop": ["\n\n"]}, "\n\n"),
    (None, {}, None),  # EOS
])
@pytest.mark.parametrize("stream", [False, True])
async def test_stop_reason_is_the_stop_string_or_token_id(hf_tokenizer, wire, sampling, expected, stream):
    http, _ = make_router(hf_tokenizer, orchestrator=EndsWith(wire))
    async with http:
        for path, body in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})]:
            reply = await http.post(path, json={"model": MODEL, "max_tokens": 4, "stream": stream, **sampling, **body})
            assert reply.status_code == 200, reply.text
            if stream:
                finals = [json.loads(line[6:])["choices"][0] for line in reply.text.splitlines()
                          if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["finish_reason"]]
                assert [choice["stop_reason"] for choice in finals] == [expected]
            else:
                assert reply.json()["choices"][0]["stop_reason"] == expected


# ---------------------------------------------------------------------------------------------- prompt logprobs
# The fake orchestrator reports ``fake_prompt_logprobs`` for a prompt (and -0.5 for each generated token); the
# references below build vLLM's and OpenAI's layouts from those numbers and the HF tokenizer's own decode.
ECHO_PROMPT = "The capital of France is"


def vllm_prompt_logprobs(tokenizer, prompt_ids: list[int], k: int) -> list:
    """vLLM's ``prompt_logprobs``: null, then {"<id>": {logprob, rank, decoded_token}}, the prompt token first."""
    return [None if entry is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": tokenizer.decode([t])}
             for t, lp in entry.items()}
            for entry in fake_prompt_logprobs(prompt_ids, k)]


def legacy_echo_logprobs(tokenizer, prompt_ids: list[int], answer_ids: list[int], k: int) -> dict:
    """OpenAI's legacy layout for echo with ``logprobs: k``: the prompt's positions (null first), then the answer's;
    ``top_logprobs`` maps the chosen token and then its k alternatives by text."""
    tokens, token_logprobs, tops = [], [], []
    prompt_entries = fake_prompt_logprobs(prompt_ids, k)
    for position, token in enumerate(prompt_ids + answer_ids):
        tokens.append(tokenizer.decode([token]))
        if position == 0:
            token_logprobs.append(None)
            tops.append(None)
            continue
        entry = prompt_entries[position] if position < len(prompt_ids) else {token: Logprob(-0.5, 1)}
        token_logprobs.append(entry[token].logprob)
        top = {tokenizer.decode([token]): entry[token].logprob}
        for alternative, lp in sorted(entry.items(), key=lambda item: item[1].rank):
            if lp.rank <= k:
                top.setdefault(tokenizer.decode([alternative]), lp.logprob)
        tops.append(top)
    offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": tops}


def stream_chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.asyncio
@pytest.mark.parametrize("k", [0, 2])
async def test_completion_echo_with_logprobs_starts_with_the_prompt(router, hf_tokenizer, k):
    http, orchestrator = router
    reply = await http.post("/v1/completions", json={"model": MODEL, "prompt": ECHO_PROMPT, "max_tokens": 3,
                                                     "echo": True, "logprobs": k})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    prompt_ids, params = orchestrator.requests[-1][0], orchestrator.requests[-1][1]
    answer_ids = [ord(ch) for ch in " Paris."][:3]
    assert params.prompt_logprobs == k and params.logprobs == k
    assert choice["text"] == ECHO_PROMPT + hf_tokenizer.decode(answer_ids)
    assert choice["logprobs"] == legacy_echo_logprobs(hf_tokenizer, prompt_ids, answer_ids, k)
    assert choice["prompt_logprobs"] == vllm_prompt_logprobs(hf_tokenizer, prompt_ids, k)  # vLLM adds them too
    parsed = openai.types.Completion.construct(**reply.json())
    assert parsed.choices[0].logprobs is not None


@pytest.mark.asyncio
async def test_streamed_echo_sends_the_prompt_and_its_logprobs_in_the_first_chunk(router, hf_tokenizer):
    http, _ = router
    body = {"model": MODEL, "prompt": ECHO_PROMPT, "max_tokens": 4, "echo": True, "logprobs": 1}
    whole = (await http.post("/v1/completions", json=body)).json()["choices"][0]
    reply = await http.post("/v1/completions", json={**body, "stream": True})
    assert reply.status_code == 200, reply.text
    chunks = [chunk["choices"][0] for chunk in stream_chunks(reply.text)]
    num_prompt = len(hf_tokenizer.encode(ECHO_PROMPT))
    assert chunks[0]["text"].startswith(ECHO_PROMPT)
    assert len(chunks[0]["logprobs"]["tokens"]) == num_prompt + 1 and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(chunk["text"] for chunk in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for chunk in chunks if chunk["logprobs"] for v in chunk["logprobs"][key]] == whole["logprobs"][key]


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_echo_with_max_tokens_0_answers_the_prompt_alone(router, hf_tokenizer, stream):
    http, orchestrator = router
    reply = await http.post("/v1/completions", json={"model": MODEL, "prompt": ECHO_PROMPT, "max_tokens": 0,
                                                     "echo": True, "logprobs": 1, "stream": stream,
                                                     **({"stream_options": {"include_usage": True}} if stream else {})})
    assert reply.status_code == 200, reply.text
    prompt_ids = orchestrator.requests[-1][0]
    assert orchestrator.requests[-1][1].max_tokens == 1  # the prefill samples one token anyway; it is dropped
    if stream:
        chunks = stream_chunks(reply.text)
        choices, usage = [c["choices"][0] for c in chunks if c["choices"]], chunks[-1]["usage"]
        assert len(choices) == 1
        choice = choices[0]
    else:
        choice, usage = reply.json()["choices"][0], reply.json()["usage"]
    assert choice["text"] == ECHO_PROMPT and choice["finish_reason"] == "length"
    assert choice["logprobs"] == legacy_echo_logprobs(hf_tokenizer, prompt_ids, [], 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt_ids), 0)


@pytest.mark.asyncio
async def test_completion_prompt_logprobs_without_echo(router, hf_tokenizer):
    http, orchestrator = router
    reply = await http.post("/v1/completions", json={"model": MODEL, "prompt": [ECHO_PROMPT, "Hi there"],
                                                     "max_tokens": 2, "prompt_logprobs": 3, "n": 2})
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    prompts = {request[2]: request[0] for request in orchestrator.requests}
    assert len(choices) == 4
    for choice in choices:
        prompt_ids = prompts[next(rid for rid in prompts if rid.endswith(f"-{choice['index']}"))]
        assert choice["prompt_logprobs"] == vllm_prompt_logprobs(hf_tokenizer, prompt_ids, 3)
        assert choice["logprobs"] is None and choice["text"] == hf_tokenizer.decode([ord(" "), ord("P")])


@pytest.mark.asyncio
async def test_chat_prompt_logprobs_sit_at_the_top_level(router, hf_tokenizer):
    http, orchestrator = router
    reply = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2,
                                                          "prompt_logprobs": 1})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["prompt_logprobs"] == vllm_prompt_logprobs(hf_tokenizer, orchestrator.requests[-1][0], 1)
    assert "prompt_logprobs" not in body["choices"][0] and body["choices"][0]["logprobs"] is None
    plain = (await http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})).json()
    assert "prompt_logprobs" not in plain and orchestrator.requests[-1][1].prompt_logprobs is None


@pytest.mark.asyncio
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
])
async def test_prompt_logprobs_bad_requests_are_400s_naming_the_field(router, path, body, param):
    http, _ = router
    reply = await http.post(path, json={"model": MODEL, "max_tokens": 2, **body})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
