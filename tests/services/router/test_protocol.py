"""OpenAI protocol: request validation (400s naming the field) and response layouts (checked by the openai types)."""

from __future__ import annotations

import json
import math

import pytest
from openai._models import construct_type
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from common.engine.outputs import TokenLogprobs
from services.router.protocol import (
    DONE,
    INTERNAL_ERROR_MESSAGE,
    MIN_LOGPROB,
    ChoiceResult,
    ProtocolError,
    TokenLogprob,
    TopLogprob,
    chat_chunk_delta,
    chat_chunk_role,
    chat_completion,
    completion,
    completion_chunk,
    context_length_error,
    error_body,
    error_for_status,
    messages_for_template,
    model_not_found,
    models_list,
    new_id,
    parse_chat,
    parse_completion,
    prompts_of,
    sse,
    token_logprob,
    usage,
    usage_chunk,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat({"model": "m", "messages": USER, **fields})


def legacy(**fields):
    return parse_completion({"model": "m", "prompt": "hi", **fields})


def refused(parse, body) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def chat_error(**fields) -> ProtocolError:
    return refused(parse_chat, {"model": "m", "messages": USER, **fields})


def completion_error(**fields) -> ProtocolError:
    return refused(parse_completion, {"model": "m", "prompt": "hi", **fields})


# -- unsupported and unknown fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("service_tier", "flex"),
        ("store", True),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
    ],
)
def test_chat_unsupported_field_is_400_naming_it(field, value):
    error = chat_error(**{field: value})
    assert error.param == field
    assert error.message == f"{field} is not supported yet"
    assert error.body()["error"] == {
        "message": error.message,
        "type": "invalid_request_error",
        "param": field,
        "code": None,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", None),
        ("tool_choice", "none"),
        ("function_call", "none"),
        ("response_format", {"type": "text"}),
        ("modalities", ["text"]),
        ("service_tier", "auto"),
        ("service_tier", "default"),
        ("store", False),
        ("user", "u-1"),
        ("metadata", {"k": "v"}),
        ("safety_identifier", "s"),
        ("prompt_cache_key", "p"),
    ],
)
def test_chat_no_op_values_of_known_fields_are_accepted(field, value):
    assert chat(**{field: value}).model == "m"


@pytest.mark.parametrize(("field", "value"), [("suffix", "tail"), ("service_tier", "priority")])
def test_completion_unsupported_field_is_400_naming_it(field, value):
    error = completion_error(**{field: value})
    assert (error.param, error.message) == (field, f"{field} is not supported yet")


def test_best_of_must_equal_n():
    assert legacy(n=2, best_of=2).n == 2
    assert completion_error(n=2, best_of=1).param == "best_of"
    assert completion_error(best_of=3).message == "best_of greater than n is not supported yet"


@pytest.mark.parametrize("parse", [parse_chat, parse_completion])
def test_unknown_field_is_400_naming_it(parse):
    body = {"model": "m", "messages": USER, "prompt": "x", "frobnicate": 1, "temperature": 9}
    body.pop("prompt" if parse is parse_chat else "messages")
    error = refused(parse, body)
    assert (error.message, error.param) == ("Unrecognized request argument supplied: frobnicate", "frobnicate")


def test_unknown_nested_fields_are_named_with_openai_paths():
    error = refused(parse_chat, {"model": "m", "messages": [{"role": "user", "content": "x", "weight": 1}]})
    assert error.param == "messages[0].weight"
    assert chat_error(stream=True, stream_options={"include_usage": True, "x": 1}).param == "stream_options.x"
    parts = [{"type": "text", "text": "a", "cache_control": {}}]
    error = refused(parse_chat, {"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert error.param == "messages[0].content[0].cache_control"


def test_message_function_call_is_unsupported():
    message = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    error = refused(parse_chat, {"model": "m", "messages": [*USER, message]})
    assert error.param == "messages[1].function_call"
    assert error.message == "messages[1].function_call is not supported yet"


# -- messages ------------------------------------------------------------------------------------------


def test_text_parts_join_with_newlines_and_developer_becomes_system():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
    ]
    request = parse_chat({"model": "m", "messages": messages})
    assert messages_for_template(request) == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
    ]


def test_non_text_part_is_400_naming_its_type():
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x"}}]
    error = refused(parse_chat, {"model": "m", "messages": [*USER, {"role": "user", "content": parts}]})
    assert error.param == "messages[1].content[1].type"
    assert "image_url" in error.message


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([], "messages[0].content"),
        (5, "messages[0].content"),
        (["a"], "messages[0].content[0]"),
        ([{"type": "text"}], "messages[0].content[0].text"),
        ([{"type": "text", "text": 3}], "messages[0].content[0].text"),
        (None, "messages[0].content"),
    ],
)
def test_bad_content_is_400_naming_the_path(content, param):
    assert refused(parse_chat, {"model": "m", "messages": [{"role": "user", "content": content}]}).param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "bot", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
        (["hello"], "messages[0]"),
        ([], "messages"),
        ("hello", "messages"),
    ],
)
def test_role_and_message_shape_validation(messages, param):
    error = refused(parse_chat, {"model": "m", "messages": messages})
    assert error.param == param
    assert error.message.startswith(f"{param}: ")


def test_role_error_lists_the_roles():
    error = refused(parse_chat, {"model": "m", "messages": [{"role": "bot", "content": "x"}]})
    assert error.message == "messages[0].role: Input should be 'system', 'user', 'assistant', 'tool' or 'developer'"


def test_model_is_required():
    assert refused(parse_chat, {"messages": USER}).message == "model: Field required"


# -- ranges --------------------------------------------------------------------------------------------

BAD_SHARED = [
    ("temperature", -0.1),
    ("temperature", 2.1),
    ("temperature", "1"),
    ("top_p", 0.0),
    ("top_p", 1.1),
    ("n", 0),
    ("n", 129),
    ("n", "2"),
    ("n", True),
    ("n", 1.5),
    ("seed", 2**63),
    ("seed", 1.0),
    ("stop", ["s"] * 17),
    ("stop", 3),
    ("presence_penalty", -2.1),
    ("presence_penalty", 2.1),
    ("frequency_penalty", -2.1),
    ("frequency_penalty", 2.1),
    ("top_k", -2),
    ("min_p", 1.1),
    ("min_p", -0.1),
    ("repetition_penalty", 0.0),
    ("min_tokens", -1),
    ("ignore_eos", "yes"),
    ("stream", 1),
    ("skip_special_tokens", "false"),
    ("include_stop_str_in_output", 0),
    ("user", 5),
]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *BAD_SHARED,
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("logprobs", 1),
        ("max_tokens", 1.5),
    ],
)
def test_chat_range_checks(field, value):
    error = chat_error(**{field: value, **({"logprobs": True} if field == "top_logprobs" else {})})
    assert error.param == field
    assert error.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [*BAD_SHARED, ("max_tokens", 0), ("logprobs", 21), ("logprobs", -1), ("echo", "true"), ("logprobs", True)],
)
def test_completion_range_checks(field, value):
    error = completion_error(**{field: value})
    assert error.param == field
    assert error.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("bias", "param"),
    [
        ({"5": 101}, "logit_bias.5"),
        ({"5": -100.5}, "logit_bias.5"),
        ({"x": 1}, "logit_bias"),
        ({"-1": 1}, "logit_bias"),
        ({"5": "1"}, "logit_bias.5"),
        ([1], "logit_bias"),
    ],
)
def test_logit_bias_checks(bias, param):
    assert chat_error(logit_bias=bias).param == param


def test_engine_level_checks_name_the_field():
    with pytest.raises(ProtocolError) as info:
        chat(stop=[""]).sampling_params()
    assert info.value.param == "stop"


def test_list_items_are_named_by_index():
    assert chat_error(stop_token_ids=[1, -1]).param == "stop_token_ids[1]"
    assert chat_error(stop=["a", 3]).param == "stop[1]"


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(ProtocolError) as info:
        chat(min_tokens=5, max_completion_tokens=3).sampling_params()
    assert info.value.param == "min_tokens"


def test_boundaries_are_accepted():
    params = chat(
        temperature=2,
        top_p=1,
        n=128,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=-(2**63),
        logit_bias={"0": -100, "7": 100},
        logprobs=True,
        top_logprobs=20,
        stop=["s"] * 16,
        top_k=-1,
        min_p=1,
        stop_token_ids=[0, 2],
    ).sampling_params()
    assert (params.temperature, params.n, params.logprobs, params.logit_bias) == (2.0, 128, 20, {0: -100.0, 7: 100.0})
    assert params.stop == ("s",) * 16 and params.stop_token_ids == (0, 2)
    assert chat(temperature=0).sampling_params().is_greedy


def test_null_means_absent():
    params = chat(temperature=None, n=None, stop=None, top_p=None, logprobs=None, stream=None).sampling_params(64)
    assert (params.temperature, params.n, params.stop, params.top_p, params.logprobs) == (1.0, 1, (), 1.0, None)


def test_extras_reach_the_engine():
    params = chat(
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[9],
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        stop="x",
        seed=3,
    ).sampling_params()
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (5, 0.1, 1.2, 2)
    assert params.ignore_eos and not params.skip_special_tokens and params.include_stop_str_in_output
    assert (params.stop_token_ids, params.stop, params.seed) == ((9,), ("x",), 3)


# -- max tokens ----------------------------------------------------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens():
    request = chat(max_tokens=5, max_completion_tokens=9)
    assert request.requested_max_tokens == 9
    assert request.sampling_params(100).max_tokens == 9
    assert chat(max_tokens=5).sampling_params(100).max_tokens == 5


def test_chat_without_max_tokens_uses_the_default_or_the_context():
    assert chat().sampling_params().max_tokens is None
    assert chat().sampling_params(100).max_tokens == 100


def test_completion_max_tokens_defaults_to_16_and_null_to_the_default():
    assert legacy().sampling_params().max_tokens == 16
    assert legacy(max_tokens=None).sampling_params().max_tokens is None
    assert legacy(max_tokens=None).sampling_params(50).max_tokens == 50


# -- prompts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert prompts_of(legacy(prompt=prompt)) == expected


@pytest.mark.parametrize(
    "prompt", ["", [], [""], [[]], ["a", 1], [1, "a"], [True], [-1], [[1, -2]], [[1], "a"], 5, {"text": "a"}, [1.5]]
)
def test_bad_prompts_are_400_on_prompt(prompt):
    assert completion_error(prompt=prompt).param == "prompt"


def test_prompt_is_required():
    assert refused(parse_completion, {"model": "m"}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": None}).param == "prompt"


# -- logprobs and streaming options --------------------------------------------------------------------


def test_chat_logprobs_rules():
    assert chat().sampling_params().logprobs is None
    assert chat(logprobs=True).sampling_params().logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).sampling_params().logprobs == 5
    assert chat(logprobs=False, top_logprobs=0).sampling_params().logprobs is None
    error = chat_error(top_logprobs=3)
    assert error.param == "top_logprobs" and "logprobs" in error.message


def test_completion_logprobs_and_echo():
    params = legacy(logprobs=3).sampling_params()
    assert (params.logprobs, params.prompt_logprobs) == (3, None)
    params = legacy(logprobs=0, echo=True).sampling_params()
    assert (params.logprobs, params.prompt_logprobs) == (0, 0)
    assert legacy(logprobs=20).sampling_params().logprobs == 20


@pytest.mark.parametrize("parse", [chat_error, completion_error])
def test_stream_options_need_stream(parse):
    error = parse(stream_options={"include_usage": True})
    assert error.param == "stream_options"
    assert "stream=True" in error.message


def test_include_usage():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options={"include_usage": False}).include_usage
    assert not chat(stream=True).include_usage
    assert legacy(stream=True, stream_options={"include_usage": True, "include_obfuscation": False}).include_usage


# -- decoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{", b"", b'{"model": NaN}', b"\xff\xfe", "{'model': 1}"])
def test_bad_json_is_400(body):
    assert "JSON" in refused(parse_chat, body).message


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"3", [1]])
def test_body_must_be_an_object(body):
    assert refused(parse_completion, body).message == "The request body must be a JSON object."


def test_bytes_and_str_bodies_parse_like_dicts():
    body = {"model": "m", "messages": [{"role": "user", "content": "é"}], "n": 2}
    for encoded in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False)):
        assert parse_chat(encoded) == parse_chat(body)


# -- responses -----------------------------------------------------------------------------------------


def entry(token: str, logprob: float, *alternatives: tuple[str, float], token_id: int = 1) -> TokenLogprob:
    return TokenLogprob(token_id, token, logprob, tuple(TopLogprob(t, lp) for t, lp in alternatives))


LOGPROBS = (
    entry("Hel", -0.1, ("Hel", -0.1), ("He", -2.5)),
    entry("lo", -float("inf"), ("lo!", -0.5)),
    entry("é", -0.3),
)


def round_trips(model, body: dict) -> None:
    """The dict validates as the openai type and dumps back to itself."""
    assert model.model_validate(body).model_dump(mode="json", exclude_unset=True) == body
    json.dumps(body, allow_nan=False)


def test_chat_completion_layout():
    choices = [ChoiceResult(0, "Hello", "stop", (1, 2), LOGPROBS), ChoiceResult(1, "Hi", "length", (3,))]
    body = chat_completion("chatcmpl-abc", "m", 1700000000, choices, usage(7, 3))
    round_trips(ChatCompletion, body)
    assert body["object"] == "chat.completion" and body["system_fingerprint"] is None
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    first, second = body["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert second["logprobs"] is None and second["finish_reason"] == "length"
    content = first["logprobs"]["content"]
    top = [
        {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108]},
        {"token": "He", "logprob": -2.5, "bytes": [72, 101]},
    ]
    assert content[0] == {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108], "top_logprobs": top}
    assert content[1]["logprob"] == MIN_LOGPROB
    assert content[2]["bytes"] == [0xC3, 0xA9] and content[2]["top_logprobs"] == []


def test_explicit_bytes_win():
    token = TokenLogprob(5, "\ufffd", -1.0, (TopLogprob("\ufffd", -1.0, (0xE2,)),), bytes=(0xE2,))
    body = chat_chunk_delta("chatcmpl-x", "m", 1, 0, "", (token,))
    assert body["choices"][0]["logprobs"]["content"][0]["bytes"] == [0xE2]
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["bytes"] == [0xE2]


def test_usage_with_cached_tokens():
    assert usage(10, 2, cached_tokens=8)["prompt_tokens_details"] == {"cached_tokens": 8}


def test_chat_stream_chunks():
    role = chat_chunk_role("chatcmpl-a", "m", 5, 0)
    round_trips(ChatCompletionChunk, role)
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in role
    delta = chat_chunk_delta("chatcmpl-a", "m", 5, 1, "Hel", LOGPROBS[:1])
    round_trips(ChatCompletionChunk, delta)
    assert delta["object"] == "chat.completion.chunk" and delta["choices"][0]["delta"] == {"content": "Hel"}
    last = chat_chunk_delta("chatcmpl-a", "m", 5, 1, "", finish_reason="stop", include_usage=True)
    round_trips(ChatCompletionChunk, last)
    assert last["choices"][0]["delta"] == {} and last["usage"] is None
    assert chat_chunk_delta("c", "m", 5, 0, "!", finish_reason="length")["choices"][0]["delta"] == {"content": "!"}
    tail = usage_chunk("chatcmpl-a", "m", 5, usage(4, 2))
    round_trips(ChatCompletionChunk, tail)
    assert tail["choices"] == [] and tail["usage"]["total_tokens"] == 6


def test_completion_layout_with_logprobs():
    body = completion("cmpl-1", "m", 9, [ChoiceResult(0, "Hello\u00e9", "length", (1, 2, 3), LOGPROBS)], usage(2, 3))
    round_trips(Completion, body)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["logprobs"] == {
        "text_offset": [0, 3, 5],
        "token_logprobs": [-0.1, MIN_LOGPROB, -0.3],
        "tokens": ["Hel", "lo", "é"],
        "top_logprobs": [{"Hel": -0.1, "He": -2.5}, {"lo": MIN_LOGPROB, "lo!": -0.5}, {"é": -0.3}],
    }


def test_completion_echo_layout_starts_with_a_null_prompt_logprob():
    prompt = (TokenLogprob(9, "Say", None), entry("Say", -1.5, ("Say", -1.5), (" hi", -0.2), token_id=10))
    body = completion(
        "cmpl-2", "m", 9, [ChoiceResult(0, "SaySay hi", "stop", (1,), prompt + LOGPROBS[:1])], usage(2, 1)
    )
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"] == [0, 3, 6]
    assert logprobs["top_logprobs"][1] == {"Say": -1.5, " hi": -0.2}
    # The openai types declare List[float] here, but the client parses responses without validation (as OpenAI's
    # own echo responses carry this null): check the client's path and that everything else validates strictly.
    parsed = construct_type(type_=Completion, value=body)
    assert parsed.choices[0].logprobs.token_logprobs[0] is None and parsed.choices[0].finish_reason == "stop"
    stripped = json.loads(json.dumps(body))
    stripped["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    stripped["choices"][0]["logprobs"]["top_logprobs"][0] = {}
    Completion.model_validate(stripped)


def test_completion_stream_chunks():
    chunk = completion_chunk("cmpl-3", "m", 9, 2, "lo", LOGPROBS[1:2], text_offset=3, include_usage=True)
    assert chunk["choices"][0]["logprobs"]["text_offset"] == [3]
    assert chunk["usage"] is None and chunk["choices"][0]["finish_reason"] is None
    assert construct_type(type_=Completion, value=chunk).choices[0].text == "lo"
    last = completion_chunk("cmpl-3", "m", 9, 2, "", finish_reason="stop")
    round_trips(Completion, last)
    tail = usage_chunk("cmpl-3", "m", 9, usage(1, 1), endpoint="completion")
    round_trips(Completion, tail)
    assert tail["object"] == "text_completion" and tail["choices"] == []


def test_finish_reason_must_be_openai_one():
    with pytest.raises(ValueError):
        ChoiceResult(0, "", "abort")
    with pytest.raises(ValueError):
        chat_chunk_delta("c", "m", 1, 0, "", finish_reason="abort")


def test_token_logprob_from_engine_entry():
    names = {1: "a", 2: "b", 3: "c", 4: "d"}
    chosen_in_top = TokenLogprobs(token_id=2, logprob=-1.0, rank=2, top=((1, -0.5), (2, -1.0), (3, -2.0)))
    converted = token_logprob(2, chosen_in_top.to_dict(), names.__getitem__, num_top=2)
    assert converted == TokenLogprob(2, "b", -1.0, (TopLogprob("a", -0.5), TopLogprob("b", -1.0)))
    chosen_low = TokenLogprobs(token_id=4, logprob=-9.0, rank=40, top=((1, -0.5), (3, -2.0)))
    converted = token_logprob(4, chosen_low.to_dict(), names.__getitem__, num_top=2)
    assert converted.top == (TopLogprob("a", -0.5), TopLogprob("c", -2.0)) and converted.logprob == -9.0
    assert token_logprob(4, None, names.__getitem__, 2) == TokenLogprob(4, "d", None)


def test_ids():
    assert new_id("chat").startswith("chatcmpl-") and len(new_id("chat")) == len("chatcmpl-") + 32
    assert new_id("completion").startswith("cmpl-") and new_id("completion") != new_id("completion")


# -- SSE, errors, models ---------------------------------------------------------------------------------


def test_sse_is_compact_utf8_json():
    assert sse({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'.encode()
    assert sse("[DONE]") == DONE == b"data: [DONE]\n\n"
    assert sse("x\ny") == b"data: x\ndata: y\n\n"
    line = sse(chat_chunk_delta("c", "m", 1, 0, "a\nb"))
    assert line.count(b"\n") == 2 and json.loads(line[len(b"data: ") :])["choices"][0]["delta"]["content"] == "a\nb"


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", "invalid_api_key"),
        (404, "invalid_request_error", "model_not_found"),
        (429, "requests", "rate_limit_exceeded"),
        (503, "server_error", "service_unavailable"),
        (500, "server_error", "internal_error"),
        (418, "invalid_request_error", None),
        (502, "server_error", None),
    ],
)
def test_error_types_by_status(status, kind, code):
    error = error_for_status(status, "went wrong")["error"]
    assert (error["type"], error["code"]) == (kind, code)
    assert set(error) == {"message", "type", "param", "code"}


def test_error_messages_never_carry_tracebacks():
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: 3'
    assert error_for_status(500, traceback)["error"]["message"] == INTERNAL_ERROR_MESSAGE
    assert error_for_status(503, "no decode worker\nmore detail")["error"]["message"] == "no decode worker"
    assert error_for_status(400, "")["error"]["message"] == "Invalid request."


def test_error_envelopes():
    assert error_body("m", "t", "p", "c") == {"error": {"message": "m", "type": "t", "param": "p", "code": "c"}}
    missing = model_not_found("gpt-x")
    assert missing.status == 404 and missing.body()["error"]["code"] == "model_not_found"
    assert "`gpt-x`" in missing.body()["error"]["message"]
    too_long = context_length_error(2048, 3000)
    assert too_long.status == 400 and too_long.body()["error"]["code"] == "context_length_exceeded"
    assert too_long.body()["error"]["param"] == "messages"


def test_models_list():
    assert models_list(["a", "b"], 7) == {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "created": 7, "owned_by": "tandem"},
            {"id": "b", "object": "model", "created": 7, "owned_by": "tandem"},
        ],
    }
    from openai.types import Model

    Model.model_validate(models_list(["a"], 7)["data"][0])


def test_min_logprob_is_finite():
    assert math.isfinite(MIN_LOGPROB)
