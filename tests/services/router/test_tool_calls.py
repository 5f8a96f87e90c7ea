"""Tool calling on /v1/chat/completions: validation, tool_choice plans, the output constraint, prompts, and whole and
streamed answers through the router app (a scripted orchestrator stands in for the model) read by the `openai`
client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from common.config import CoordConfig, RouterConfig, TransferConfig
from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams
from common.metrics import RouterMetrics
from common.models.loader import resolve_model_path
from services.router.admission import AdmissionQueue, ApiKeys
from services.router.openai_api import Gateway
from services.router.orchestrator import TokenEvent
from services.router.protocol import ChoiceResult, ProtocolError, ToolCall, chat_completion, parse_chat, usage
from services.router.server import RouterState, build_app, main_router
from services.router.tool_calls import (
    ToolCallConfig,
    constrained_params,
    default_tool_messages,
    plan_tools,
    render_chat,
    template_renders_tools,
    tool_constraint,
)
from tests.services.router.test_generate_route import CharTokenizer, NoWorkers

MODEL = "fake-model"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
AUTO = ToolCallConfig(parser="hermes", enable_auto=True)
CALL_TEXT = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def chat(**fields):
    return parse_chat({"model": "m", "messages": USER, **fields})


def refused(**fields) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        chat(**fields)
    return info.value


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "pattern"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "pattern"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters", "type 'object'"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", "function"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "duplicate"),
        ({"tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
        ({"tool_choice": "required", "tools": []}, "tool_choice", "only allowed when 'tools'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
         "tool_choice", "get_time"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
        ({"messages": [*USER, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id", "required"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[0].tool_calls", "assistant"),
        ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}]},
         "messages[1].tool_calls[0].function.arguments", ""),
    ],
)
def test_bad_tool_fields_are_400_naming_them(fields, param, words):
    error = refused(**fields)
    assert error.status == 400 and error.param == param and words in error.message


def test_tool_fields_parse_and_default_as_openai_does():
    request = chat(tools=[WEATHER, {"type": "function", "function": {"name": "no-args_1"}}])
    assert request.effective_tool_choice == "auto" and request.parallel_tool_calls is True
    assert request.tools[1].function.parameters == {"type": "object", "properties": {}}
    assert chat(tool_choice="none").effective_tool_choice == "none" and chat().effective_tool_choice == "none"
    assert chat(tools=[WEATHER], tool_choice="none", parallel_tool_calls=False).parallel_tool_calls is False


def test_auto_needs_the_router_flags():
    for config in (ToolCallConfig(), ToolCallConfig(parser="hermes"), ToolCallConfig(enable_auto=True)):
        with pytest.raises(ProtocolError) as info:
            plan_tools(chat(tools=[WEATHER]), config)
        assert info.value.param == "tools" and "--enable-auto-tool-choice" in info.value.message
    with pytest.raises(ProtocolError) as info:
        plan_tools(chat(tools=[WEATHER], tool_choice="auto"), ToolCallConfig())
    assert info.value.param == "tool_choice"
    assert plan_tools(chat(tools=[WEATHER], tool_choice="required"), ToolCallConfig()).choice == "required"
    assert plan_tools(chat(tools=[WEATHER], tool_choice="none"), ToolCallConfig()).scanner() is None
    assert plan_tools(chat(), AUTO) is None


# ---------------------------------------------------------------------------------------------- constraint
def test_required_constraint_is_an_array_of_calls_to_the_tools():
    schema = tool_constraint(plan_tools(chat(tools=[WEATHER, TIME], tool_choice="required"), ToolCallConfig()))
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}],
                [{"name": "get_time", "parameters": {"zone": "mars"}}], {"name": "get_time", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tool_constraint(plan_tools(chat(tools=[WEATHER, TIME], tool_choice="required",
                                             parallel_tool_calls=False), ToolCallConfig()))
    jsonschema.validate(good[:1], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)


def test_named_constraint_is_that_functions_parameters_and_auto_has_none():
    named = {"type": "function", "function": {"name": "get_time"}}
    plan = plan_tools(chat(tools=[WEATHER, TIME], tool_choice=named), ToolCallConfig())
    assert tool_constraint(plan) == TIME["function"]["parameters"] and plan.named == "get_time"
    assert tool_constraint(plan_tools(chat(tools=[WEATHER]), AUTO)) is None
    assert tool_constraint(None) is None


# ---------------------------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2", None))


FOLLOW_UP = [
    {"role": "system", "content": "Be brief."},
    *USER,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


def test_smollm2_gets_the_default_tool_prompt(smollm2_tokenizer):
    assert not template_renders_tools(smollm2_tokenizer)
    request = parse_chat({"model": "m", "messages": FOLLOW_UP, "tools": [WEATHER, TIME]})
    prompt = render_chat(smollm2_tokenizer, request, plan_tools(request, AUTO), "hermes")
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and "<tools>\n" in system
    assert json.dumps(WEATHER) in system and "<tool_call>" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call>\n<tool_call>\n") in prompt
    assert ("<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\n12:00\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in prompt


@pytest.mark.parametrize(("call_format", "expected"), [
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]'),
])
def test_default_prompt_writes_calls_in_the_parsers_format(call_format, expected):
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]
    assert default_tool_messages(messages, (), call_format) == [{"role": "assistant", "content": expected}]


class ToolTemplateTokenizer(CharTokenizer):
    """A tokenizer whose template renders tools itself: it records what it was given."""

    chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m | tojson }}{% endfor %}"

    def __init__(self) -> None:
        self.rendered: list[tuple[list, dict]] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs) -> str:
        self.rendered.append((messages, kwargs))
        return json.dumps({"messages": messages, **kwargs})


def test_a_template_that_knows_tools_gets_them_and_calls_as_objects():
    tokenizer = ToolTemplateTokenizer()
    assert template_renders_tools(tokenizer)
    request = parse_chat({"model": "m", "messages": FOLLOW_UP, "tools": [WEATHER]})
    render_chat(tokenizer, request, plan_tools(request, AUTO), "hermes")
    messages, kwargs = tokenizer.rendered[0]
    assert kwargs["tools"] == [WEATHER]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}


# ---------------------------------------------------------------------------------------------- through the app
class PromptTokenizer(CharTokenizer):
    """Characters as tokens; the chat template just joins the contents (prompts stay short and printable)."""

    chat_template = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs) -> str:
        return "|".join(message["content"][-20:] for message in messages)


class ScriptedOrchestrator:
    """Answers every request with ``answer``, a few characters per event; records the params it was given."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.params: list[SamplingParams] = []

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        self.params.append(params)
        tokens = [ord(ch) for ch in self.answer]
        for start in range(0, len(tokens), 3):
            last = start + 3 >= len(tokens)
            step = tuple(tokens[start : start + 3])
            logprobs = tuple({token: Logprob(-0.5, 1)} for token in step) if params.logprobs is not None else ()
            yield TokenEvent(step, logprobs, finish_reason="stop" if last else None)

    async def close(self) -> None:
        return None


def app_client(answer: str, config: ToolCallConfig = AUTO) -> tuple[openai.AsyncOpenAI, ScriptedOrchestrator]:
    tokenizer, orchestrator = PromptTokenizer(), ScriptedOrchestrator(answer)
    gateway = Gateway(model_id=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, keys=ApiKeys(()),
                      limiter=None, queue=AdmissionQueue(8, 8), metrics=RouterMetrics.create(MODEL),
                      tool_calls=config)
    state = RouterState(model=MODEL, tokenizer=tokenizer, orchestrator=orchestrator, watcher=NoWorkers(),
                        gateway=gateway)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://router/v1")
    return openai.AsyncOpenAI(base_url="http://router/v1", api_key="x", http_client=http, max_retries=0), orchestrator


@pytest.mark.asyncio
async def test_auto_answer_with_a_call_reads_as_tool_calls():
    client, _ = app_client(CALL_TEXT)
    response = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], n=2)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert response.choices[0].message.tool_calls[0].id != response.choices[1].message.tool_calls[0].id


@pytest.mark.asyncio
async def test_auto_stream_sends_content_then_the_call_in_the_chunk_shape():
    client, _ = app_client(CALL_TEXT)
    stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], stream=True, n=2)
    chunks = [chunk async for chunk in stream]
    for index in (0, 1):
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == "Checking."
        calls = [item for c in mine for item in c.delta.tool_calls or []]
        assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
        assert "".join(item.function.arguments for item in calls) == '{"city": "Paris"}'
        assert [c.finish_reason for c in mine if c.finish_reason] == ["tool_calls"]


@pytest.mark.asyncio
async def test_the_openai_stream_helper_accumulates_the_call():
    client, _ = app_client(CALL_TEXT)
    async with client.beta.chat.completions.stream(model=MODEL, messages=USER, tools=[WEATHER]) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.asyncio
async def test_auto_answer_without_a_call_is_plain_content():
    client, _ = app_client(" Paris is sunny. ")
    response = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    choice = response.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("Paris is sunny.", None,
                                                                                           "stop")


@pytest.mark.asyncio
async def test_tool_choice_none_leaves_markup_as_content():
    client, _ = app_client(CALL_TEXT, ToolCallConfig())
    response = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none")
    assert response.choices[0].message.content == CALL_TEXT and response.choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_named_choice_reads_the_answer_as_that_functions_arguments():
    client, _ = app_client('{"zone": "utc"}', ToolCallConfig())
    named = {"type": "function", "function": {"name": "get_time"}}
    response = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                                    tool_choice=named)
    message = response.choices[0].message
    # OpenAI (and vLLM since #25054) finish a forced named call with "stop", auto and required ones "tool_calls".
    assert message.content is None and response.choices[0].finish_reason == "stop"
    assert (message.tool_calls[0].function.name, message.tool_calls[0].function.arguments) == ("get_time",
                                                                                               '{"zone": "utc"}')
    stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                                  tool_choice=named, stream=True)
    chunks = [chunk async for chunk in stream]
    items = [item for chunk in chunks for item in chunk.choices[0].delta.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert items[0].function.name == "get_time" and len(items) > 2
    assert "".join(item.function.arguments for item in items) == '{"zone": "utc"}'


@pytest.mark.asyncio
async def test_required_choice_reads_the_array_of_calls():
    answer = '[{"name": "get_time", "parameters": {"zone": "local"}}, {"name": "get_weather", "parameters": ' \
             '{"city": "Oslo"}}]'
    client, _ = app_client(answer, ToolCallConfig())
    response = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME],
                                                    tool_choice="required")
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_time", {"zone": "local"}), ("get_weather", {"city": "Oslo"})]


@pytest.mark.asyncio
async def test_auto_without_the_flags_is_400():
    client, _ = app_client(CALL_TEXT, ToolCallConfig())
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    assert caught.value.body["param"] == "tools" and "--enable-auto-tool-choice" in caught.value.body["message"]


def test_chat_completion_with_calls_has_null_content():
    body = chat_completion("chatcmpl-1", "m", 1, [ChoiceResult(0, None, "tool_calls", (), None,
                                                               (ToolCall("f", "{}", "call_x"),))], usage(1, 1))
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"] == [
        {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert openai.types.chat.ChatCompletion.model_validate(body).choices[0].message.tool_calls[0].id == "call_x"


def test_mistral_format_names_calls_as_mistral_templates_require():
    plan = plan_tools(chat(tools=[WEATHER]), ToolCallConfig(parser="mistral", enable_auto=True))
    stream = plan.stream()
    stream.feed('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', final=True)
    (call,) = stream.calls
    assert len(call.id) == 9 and call.id.isalnum()


def test_router_refuses_auto_tool_choice_without_a_parser():
    with pytest.raises(SystemExit, match="--tool-call-parser"):
        main_router(MODEL, RouterConfig(enable_auto_tool_choice=True), CoordConfig(), TransferConfig())


@pytest.mark.asyncio
async def test_the_readme_round_trip_sends_the_reply_message_back():
    client, _ = app_client(CALL_TEXT)
    reply = (await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])).choices[0]
    call = reply.message.tool_calls[0]
    messages = [*USER, reply.message, {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    follow_up = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert follow_up.choices[0].message.tool_calls[0].function.name == "get_weather"


@pytest.mark.asyncio
async def test_streamed_calls_keep_every_tokens_logprob():
    client, _ = app_client(CALL_TEXT)
    stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], stream=True,
                                                  logprobs=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    entries = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert "".join(entry.token for entry in entries) == CALL_TEXT
    assert chunks[-1].usage.completion_tokens == len(CALL_TEXT)


def test_mistral_auto_keeps_special_tokens_so_the_marker_reaches_the_parser():
    params = SamplingParams()
    mistral = ToolCallConfig(parser="mistral", enable_auto=True)
    assert constrained_params(params, plan_tools(chat(tools=[WEATHER]), mistral)).skip_special_tokens is False
    assert constrained_params(params, plan_tools(chat(tools=[WEATHER]), AUTO)).skip_special_tokens is True
    assert constrained_params(params, None) == params
