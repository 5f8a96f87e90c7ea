"""One sampling schema: SamplingParams is the source; the proto, the wire conversion, ``POST /generate`` and the
OpenAI mapping must carry every one of its fields.

Adding a field to SamplingParams alone fails here: first ``test_every_field_has_a_test_value`` (add a non-default
value and a strategy below), then the proto, wire, /generate and OpenAI checks name what else lacks it. Fields an
endpoint intentionally leaves out are listed, with the reason, in ``protocol.CHAT_UNEXPOSED_SAMPLING`` and
``protocol.GENERATE_UNEXPOSED_SAMPLING``; those tests assert the field is refused there, not silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from common.engine.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputs
from proto import worker_pb2
from services.router import protocol
from services.wire import sampling_from_proto, sampling_to_proto

FIELDS = tuple(field.name for field in dataclasses.fields(SamplingParams))
INT32_MAX, INT64_MIN, INT64_MAX = 2**31 - 1, -(2**63), 2**63 - 1

NON_DEFAULT: dict[str, Any] = {
    "n": 3,
    "temperature": 0.5,
    "top_p": 0.75,
    "top_k": 5,
    "min_p": 0.25,
    "seed": 1234,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.25,
    "logit_bias": {"7": 2.5},
    "stop": ["END"],
    "stop_token_ids": [9],
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "max_tokens": 8,
    "min_tokens": 2,
    "logprobs": 3,
    "prompt_logprobs": 2,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "structured_outputs": {"choice": ["yes", "no"]},
}
"""A valid, non-default value for every SamplingParams field, as a JSON client would send it."""

OPENAI_SPELLING: dict[str, dict[str, Any]] = {
    "chat": {"logprobs": {"logprobs": True, "top_logprobs": NON_DEFAULT["logprobs"]}},
    "completion": {"prompt_logprobs": {"echo": True, "logprobs": NON_DEFAULT["prompt_logprobs"]}},
}
"""How an OpenAI request asks for a field that it does not spell under SamplingParams' own name."""

OPENAI_UNEXPOSED = {"chat": protocol.CHAT_UNEXPOSED_SAMPLING, "completion": {}}
OPENAI_BASE = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "completion": {"model": "m", "prompt": "hi"},
}


@st.composite
def _lengths(draw) -> tuple[int | None, int]:
    max_tokens = draw(st.none() | st.integers(1, INT32_MAX))
    return max_tokens, draw(st.integers(0, max_tokens or INT32_MAX))


def _finite(low: float, high: float, **kwargs) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, **kwargs)


STRATEGIES: dict[str, st.SearchStrategy] = {
    "n": st.integers(1, 128),
    "temperature": _finite(0.0, 1e6),
    "top_p": _finite(0.0, 1.0, exclude_min=True),
    "top_k": st.integers(-1, INT32_MAX),
    "min_p": _finite(0.0, 1.0),
    "seed": st.none() | st.integers(INT64_MIN, INT64_MAX),
    "presence_penalty": _finite(-2.0, 2.0),
    "frequency_penalty": _finite(-2.0, 2.0),
    "repetition_penalty": _finite(0.0, 1e6, exclude_min=True),
    "logit_bias": st.none() | st.dictionaries(st.integers(0, INT32_MAX), _finite(-100.0, 100.0), min_size=1),
    "stop": st.lists(st.text(min_size=1), max_size=4),
    "stop_token_ids": st.lists(st.integers(0, INT32_MAX), max_size=4),
    "include_stop_str_in_output": st.booleans(),
    "ignore_eos": st.booleans(),
    "max_tokens": st.just("drawn with min_tokens"),
    "min_tokens": st.just("drawn with max_tokens"),
    "logprobs": st.none() | st.integers(0, MAX_LOGPROBS),
    "prompt_logprobs": st.none() | st.integers(0, MAX_LOGPROBS),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "structured_outputs": st.none()
    | st.builds(StructuredOutputs, json=st.text())
    | st.builds(StructuredOutputs, json_object=st.just(True))
    | st.builds(StructuredOutputs, regex=st.text())
    | st.builds(StructuredOutputs, choice=st.lists(st.text(), min_size=1).map(tuple))
    | st.builds(StructuredOutputs, grammar=st.text()),
}
"""Every SamplingParams field's valid range, within what the proto's types hold (int32 ids and counts)."""


@st.composite
def sampling_params(draw) -> SamplingParams:
    fields = {name: draw(strategy) for name, strategy in STRATEGIES.items() if name not in ("max_tokens", "min_tokens")}
    fields["max_tokens"], fields["min_tokens"] = draw(_lengths())
    return SamplingParams(**fields)


def expected(name: str) -> Any:
    """The field's value in SamplingParams after normalization (tuples, int logit_bias keys)."""
    return getattr(SamplingParams(**{name: NON_DEFAULT[name]}), name)


def test_every_field_has_a_test_value():
    """A field added to SamplingParams must be added here too, and then every check below covers it."""
    assert set(NON_DEFAULT) == set(FIELDS), "give the new SamplingParams field a NON_DEFAULT value"
    assert set(STRATEGIES) == set(FIELDS), "give the new SamplingParams field a STRATEGIES entry"
    for name in FIELDS:
        assert expected(name) != getattr(SamplingParams(), name), f"NON_DEFAULT[{name!r}] is the default"


# ------------------------------------------------------------------------------------------------ proto and wire
def test_proto_fields_are_exactly_the_sampling_fields():
    proto_fields = set(worker_pb2.SamplingOptions.DESCRIPTOR.fields_by_name)
    assert proto_fields == set(FIELDS), "proto/worker.proto SamplingOptions differs from SamplingParams"


@pytest.mark.parametrize("name", FIELDS)
def test_the_wire_carries_each_field(name):
    params = SamplingParams(**{name: NON_DEFAULT[name]})
    assert sampling_from_proto(sampling_to_proto(params)) == params


def test_the_wire_carries_every_field_at_once():
    params = SamplingParams(**NON_DEFAULT)
    assert sampling_from_proto(sampling_to_proto(params)) == params


@hypothesis.given(sampling_params())
@hypothesis.settings(max_examples=300, deadline=None, database=None)
def test_random_params_round_trip_through_the_proto(params):
    assert sampling_from_proto(sampling_to_proto(params)) == params


# ------------------------------------------------------------------------------------------------ POST /generate
@pytest.mark.parametrize("name", FIELDS)
def test_generate_body_takes_each_field_or_documents_why_not(name):
    body = {"prompt": "hi", name: NON_DEFAULT[name]}
    if name in protocol.GENERATE_UNEXPOSED_SAMPLING:
        with pytest.raises(protocol.ProtocolError, match=f"Unrecognized request argument supplied: {name}"):
            protocol.parse_generate(body)
        return
    assert getattr(protocol.parse_generate(body).sampling_params(), name) == expected(name)


def test_generate_body_defaults_are_sampling_params_defaults():
    assert protocol.parse_generate({"prompt": "hi"}).sampling_params() == SamplingParams()


# ------------------------------------------------------------------------------------------------ OpenAI
@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_openai_requests_map_each_field_or_document_why_not(endpoint, name):
    parse = protocol.parse_chat if endpoint == "chat" else protocol.parse_completion
    if name in OPENAI_UNEXPOSED[endpoint]:
        with pytest.raises(protocol.ProtocolError, match=f"Unrecognized request argument supplied: {name}"):
            parse({**OPENAI_BASE[endpoint], name: NON_DEFAULT[name]})
        return
    spelled = OPENAI_SPELLING[endpoint].get(name, {name: NON_DEFAULT[name]})
    params = parse({**OPENAI_BASE[endpoint], **spelled}).sampling_params()
    assert getattr(params, name) == expected(name)


def test_completions_take_vllms_prompt_logprobs_spelling_too():
    body = {**OPENAI_BASE["completion"], "prompt_logprobs": NON_DEFAULT["prompt_logprobs"]}
    assert protocol.parse_completion(body).sampling_params().prompt_logprobs == expected("prompt_logprobs")
