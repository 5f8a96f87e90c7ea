"""The structured-output request fields map onto SamplingParams.structured_outputs (no I/O), and the prefill
worker resumes a migrated constrained request with its generated tokens as outputs."""

from __future__ import annotations

import json

import pytest

from common.engine.sampling_params import SamplingParams, StructuredOutputs
from services.prefill.service import first_token_request
from services.router.protocol import ProtocolError, parse_chat, parse_completion

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def chat_constraint(**fields) -> StructuredOutputs | None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat(body).sampling_params().structured_outputs


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutputs(json=json.dumps(SCHEMA)),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
            StructuredOutputs(json_object=True),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputs(json=json.dumps(SCHEMA))),
        ({"structured_outputs": {"json": '{"type": "string"}'}}, StructuredOutputs(json='{"type": "string"}')),
        ({"structured_outputs": {"json_object": True}}, StructuredOutputs(json_object=True)),
        ({"structured_outputs": {"regex": "a+"}}, StructuredOutputs(regex="a+")),
        ({"structured_outputs": {"choice": ["x", "y"]}}, StructuredOutputs(choice=("x", "y"))),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutputs(grammar='root ::= "a"')),
        ({"guided_json": SCHEMA}, StructuredOutputs(json=json.dumps(SCHEMA))),
        ({"guided_regex": "[0-9]+"}, StructuredOutputs(regex="[0-9]+")),
        ({"guided_choice": ["x"]}, StructuredOutputs(choice=("x",))),
        ({"guided_grammar": "start: /a+/"}, StructuredOutputs(grammar="start: /a+/")),
    ],
)
def test_chat_fields_become_one_constraint(fields, expected):
    assert chat_constraint(**fields) == expected


def test_completions_take_the_same_fields():
    body = {"model": "m", "prompt": "hi", "response_format": {"type": "json_object"}}
    assert parse_completion(body).sampling_params().structured_outputs == StructuredOutputs(json_object=True)
    body = {"model": "m", "prompt": "hi", "guided_choice": ["a", "b"]}
    assert parse_completion(body).sampling_params().structured_outputs == StructuredOutputs(choice=("a", "b"))


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            "guided_regex: response_format and guided_regex cannot be combined",
        ),
        (
            {"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]},
            "guided_choice",
            "guided_choice: structured_outputs and guided_choice cannot be combined",
        ),
        (
            {"structured_outputs": {"regex": "a", "grammar": "b"}},
            "structured_outputs",
            "structured_outputs takes exactly one of json, json_object, regex, choice, grammar; got regex and grammar",
        ),
        ({"structured_outputs": {}}, "structured_outputs", "got none"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "Input should be"),
        ({"guided_choice": []}, "guided_choice", "at least 1 item"),
        ({"guided_json": "{not json"}, "guided_json", "guided_json: the JSON schema is not valid JSON"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "Unrecognized"),
    ],
)
def test_conflicting_or_malformed_constraints_are_400s_naming_the_field(fields, param, message):
    with pytest.raises(ProtocolError) as caught:
        chat_constraint(**fields)
    assert caught.value.status == 400 and caught.value.param == param and message in caught.value.message


def test_prefill_resumes_a_migrated_request_with_its_generated_tokens():
    """Constrained or not, a migrated request's generated tokens are its outputs again (grammar, penalties and the
    seeded generator all count them as output)."""
    params = SamplingParams(max_tokens=50, min_tokens=4, structured_outputs=StructuredOutputs(regex="[0-9]+"))
    prompt, generated, local = first_token_request(params, [1, 2, 3, 7, 8], num_generated=2)
    assert (prompt, generated) == ([1, 2, 3], [7, 8])
    assert (local.max_tokens, local.min_tokens, local.n) == (3, 3, 1)
    plain = params.replace(structured_outputs=None)
    assert first_token_request(plain, [1, 2, 3, 7, 8], num_generated=2)[:2] == ([1, 2, 3], [7, 8])
    prompt, generated, local = first_token_request(params, [1, 2, 3], num_generated=0)
    assert (prompt, generated, local.max_tokens, local.min_tokens) == ([1, 2, 3], [], 1, 1)
