"""Structured outputs through a real local cluster (router + 1 prefill + 1 decode worker, SmolLM2 on CPU).

Prompts are longer than ``--local-prefill-max-tokens`` so every request goes router -> prefill worker (first token
sampled under the constraint) -> KV transfer -> decode worker (grammar state re-derived from the tokens so far).
The generating requests run concurrently once (``answers``) and each test checks its own; invalid constraints
are 400s naming the problem, from the router (shape) or from the worker compiling it (meaning).
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from services.cluster import LocalCluster
from tests.services.test_cluster_e2e import WORKER_ARGS, assert_no_leak, wait_ready

pytestmark = pytest.mark.timeout(600)

MODEL = "smollm2"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "address"],
}
COLORS = {
    "type": "object",
    "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}
    },
    "required": ["colors"],
}
CODE = {
    "type": "object",
    "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    },
    "required": ["value", "code"],
}
ASK = "Reply in JSON about Ana, 31, who lives in Lisbon and likes blue and green."


class City(BaseModel):
    name: str
    country: str


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    router_args = ["--heartbeat-s", "0.5", "--ttl-s", "3", "--local-prefill-max-tokens", "4"]
    with LocalCluster(
        MODEL,
        1,
        1,
        router_port=0,
        worker_args=WORKER_ARGS,
        router_args=router_args,
        run_dir=tmp_path_factory.mktemp("structured-cluster"),
    ) as running:
        wait_ready(running.router_url, 1, 1)
        yield running


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.router_url}/v1", api_key="none", max_retries=0, timeout=300)


async def _streamed_chat(client: openai.AsyncOpenAI, **kwargs) -> tuple[str, str]:
    text, finish = "", None
    async for chunk in await client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


async def _all_answers(url: str) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    chat = client.chat.completions.create
    calls = {
        "person_greedy": chat(
            model=MODEL,
            messages=user(ASK),
            temperature=0,
            max_tokens=96,
            response_format=schema_format("person", PERSON),
        ),
        "person_sampled": chat(
            model=MODEL,
            messages=user(ASK),
            temperature=0.9,
            seed=11,
            max_tokens=96,
            extra_body={"structured_outputs": {"json": PERSON}},
        ),
        "colors_sampled_streamed": _streamed_chat(
            client,
            messages=user(ASK),
            temperature=0.9,
            seed=5,
            max_tokens=64,
            response_format=schema_format("colors", COLORS),
        ),
        "code_greedy_streamed": _streamed_chat(
            client, messages=user(ASK), temperature=0, max_tokens=64, extra_body={"guided_json": json.dumps(CODE)}
        ),
        "json_object": chat(
            model=MODEL,
            temperature=0,
            max_tokens=64,
            response_format={"type": "json_object"},
            messages=user('Reply with a JSON object like {"answer": "Paris"}: the capital of France?'),
        ),
        "choice": chat(
            model=MODEL,
            messages=user("What is the capital of France?"),
            temperature=0,
            max_tokens=8,
            extra_body={"guided_choice": ["Paris", "Rome"]},
        ),
        "n2": chat(
            model=MODEL,
            messages=user(ASK),
            temperature=1.0,
            seed=3,
            n=2,
            max_tokens=64,
            response_format=schema_format("colors", COLORS),
        ),
        "too_short": chat(
            model=MODEL,
            messages=user(ASK),
            temperature=0,
            max_tokens=4,
            response_format=schema_format("person", PERSON),
        ),
        "regex_completion": client.completions.create(
            model=MODEL,
            prompt="Our office phone number is",
            max_tokens=16,
            temperature=0,
            extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"},
        ),
        "parsed": client.beta.chat.completions.parse(
            model=MODEL,
            temperature=0,
            max_tokens=64,
            response_format=City,
            messages=user("Name the capital of France and its country."),
        ),
    }
    try:
        return dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
    finally:
        await client.close()


@pytest.fixture(scope="module")
def answers(cluster) -> dict:
    """Every generating request of this module, sent at once so that they share the engines' steps."""
    return asyncio.run(_all_answers(cluster.router_url))


@pytest.mark.parametrize(("name", "schema"), [("person_greedy", PERSON), ("person_sampled", PERSON)])
def test_json_schema_outputs_validate(answers, name, schema):
    choice = answers[name].choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize(("name", "schema"), [("colors_sampled_streamed", COLORS), ("code_greedy_streamed", CODE)])
def test_streamed_json_schema_outputs_validate(answers, name, schema):
    text, finish_reason = answers[name]
    assert finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_choice(answers):
    assert isinstance(json.loads(answers["json_object"].choices[0].message.content), dict)
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", answers["regex_completion"].choices[0].text)
    assert answers["choice"].choices[0].message.content in ("Paris", "Rome")


def test_n_choices_each_follow_the_schema(answers):
    choices = answers["n2"].choices
    assert sorted(c.index for c in choices) == [0, 1]
    for choice in choices:
        jsonschema.validate(json.loads(choice.message.content), COLORS)


def test_too_small_max_tokens_is_length(answers):
    choice = answers["too_short"].choices[0]
    assert choice.finish_reason == "length" and answers["too_short"].usage.completion_tokens == 4
    assert choice.message.content.startswith('{"')


def test_openai_client_parses_into_the_pydantic_model(answers):
    parsed = answers["parsed"].choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name and parsed.country


def test_generate_takes_structured_outputs(cluster):
    body = {
        "prompt": "The capital of France is the city of",
        "max_tokens": 8,
        "temperature": 0,
        "structured_outputs": {"choice": [" Paris", " Rome"]},
    }
    answer = httpx.post(f"{cluster.router_url}/generate", json=body, timeout=300).json()
    assert answer["text"] in (" Paris", " Rome") and answer["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("extra", "stream", "message"),
    [
        ({"response_format": schema_format("bad", {"type": "foo"})}, False, 'Unsupported type "foo"'),
        ({"guided_regex": "(ab"}, False, "structured_outputs.regex: Regex parsing error"),
        ({"structured_outputs": {"grammar": "root ::= missing"}}, True, 'Rule "missing" is not defined'),
        ({"guided_json": '{"type": "object"', "stream": False}, False, "guided_json: the JSON schema is not valid"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, False, "guided_regex and guided_choice cannot be combined"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, False, "exactly one of .* got regex and choice"),
    ],
)
def test_bad_constraints_are_400s_naming_the_problem(cluster, extra, stream, message):
    body = {"model": MODEL, "messages": user(ASK), "max_tokens": 8, "stream": stream, **extra}
    response = httpx.post(f"{cluster.router_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert re.search(message, error["message"]) and error["type"] == "invalid_request_error"


def test_first_tokens_came_from_the_prefill_worker(cluster, answers):
    """The constrained requests really took the disaggregated path: the prefill worker shipped their KV."""
    prefill = next(w for w in cluster.workers.values() if w.role == "prefill")
    families = text_string_to_metric_families(httpx.get(f"{prefill.metrics_url}/metrics", timeout=10).text)
    shipped = [s.value for f in families if f.name == "tandem_kv_transfer_bytes" for s in f.samples]
    assert sum(shipped) > 0


def test_no_blocks_leak(cluster, answers):
    assert_no_leak(cluster)
