"""Tool-call parsers: whole answers, streams split at every character, malformed markup, one call at a time."""

from __future__ import annotations

import json

import pytest

from services.router.tool_parsers import (
    HermesScanner,
    Llama3JsonScanner,
    MistralScanner,
    NamedScanner,
    RequiredScanner,
    ToolCallStream,
    parse,
)

WEATHER = {"city": "Paris", "units": ["c", "f"], "note": "a </tool_call> b ] }"}

CASES = [
    (HermesScanner, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}\n</tool_call>\n<tool_call>{"name": "noop", "arguments": {}}</tool_call>\n',
     "Let me check.", [("get_weather", WEATHER), ("noop", {})]),
    (HermesScanner, '<tool_call>{"name": "f", "arguments": {"x": 1}}', None, [("f", {"x": 1})]),  # left open
    (Llama3JsonScanner, '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "arguments": {}}',
     None, [("f", {"x": 1}), ("g", {})]),
    (Llama3JsonScanner, ' {"name": "f", "parameters": {"s": "}{"}} and then text', "and then text",
     [("f", {"s": "}{"})]),
    (MistralScanner, 'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"x": [1, 2]}}, {"name": "g", "arguments": {}}]',
     "Sure.", [("f", {"x": [1, 2]}), ("g", {})]),
    (RequiredScanner, '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]', None,
     [("f", {"x": 1}), ("g", {})]),
]

PLAIN = [
    (HermesScanner, "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag."),
    (HermesScanner, 'x <tool_call>{"name": "f", "arguments": {bad}}</tool_call> y',
     'x <tool_call>{"name": "f", "arguments": {bad}}</tool_call> y'),
    (HermesScanner, "<tool_call>{\"name\": 3}</tool_call>", "<tool_call>{\"name\": 3}</tool_call>"),
    (HermesScanner, "cut <tool_call>{\"name\": \"f\", \"argu", "cut <tool_call>{\"name\": \"f\", \"argu"),
    (HermesScanner, "ends with <tool_c", "ends with <tool_c"),
    (Llama3JsonScanner, '{"answer": 42} is JSON but no call', '{"answer": 42} is JSON but no call'),
    (Llama3JsonScanner, "Paris is the capital.", "Paris is the capital."),
    (Llama3JsonScanner, '{"name": "f", "parameters": {', '{"name": "f", "parameters": {'),
    (MistralScanner, '[TOOL_CALLS][{"name": "f", "arguments": 1}]', '[TOOL_CALLS][{"name": "f", "arguments": 1}]'),
    (MistralScanner, "[TOOL_CALLS] not json", "[TOOL_CALLS] not json"),
    (RequiredScanner, "I will not call anything", "I will not call anything"),
]


def streamed(scanner, text: str, parallel: bool = True) -> tuple[ToolCallStream, list[dict]]:
    """Feed ``text`` one character at a time; return the stream and the deltas it sent."""
    stream = ToolCallStream(scanner, parallel)
    deltas = []
    for i, character in enumerate(text):
        deltas += stream.feed(character, final=i == len(text) - 1)
    return stream, deltas


def assembled(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What a client rebuilds from the deltas: the content and each call's id, name and arguments."""
    content, calls = "", []
    for delta in deltas:
        content += delta.get("content", "")
        for item in delta.get("tool_calls", []):
            if "id" in item:
                assert item["index"] == len(calls) and item["type"] == "function"
                assert item["function"]["arguments"] == ""  # the name comes first, arguments after
                calls.append({"id": item["id"], "name": item["function"]["name"], "arguments": ""})
            else:
                assert "name" not in item["function"]
                calls[item["index"]]["arguments"] += item["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize(("scanner", "text", "content", "calls"), CASES)
def test_whole_answer_gives_content_and_calls(scanner, text, content, calls):
    got_content, got_calls = parse(scanner(), text)
    assert got_content == content
    assert [(call.name, json.loads(call.arguments)) for call in got_calls] == calls
    assert all(call.id.startswith("call_") for call in got_calls) and len({c.id for c in got_calls}) == len(calls)


@pytest.mark.parametrize(("scanner", "text", "content", "calls"), CASES)
def test_stream_split_anywhere_adds_up_to_the_whole_answer(scanner, text, content, calls):
    whole_content, whole_calls = parse(scanner(), text)
    for split in range(1, len(text)):
        stream = ToolCallStream(scanner())
        deltas = stream.feed(text[:split], final=False) + stream.feed(text[split:], final=True)
        streamed_content, streamed_calls = assembled(deltas)
        assert streamed_content == (whole_content or "")
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c.name, c.arguments) for c in whole_calls]
        assert [c["id"] for c in streamed_calls] == [c.id for c in stream.calls]
    stream, deltas = streamed(scanner(), text)
    assert assembled(deltas)[0] == (content or "") and len(assembled(deltas)[1]) == len(calls)


@pytest.mark.parametrize(("scanner", "text"), [(s, t) for s, t, _, _ in CASES])
def test_no_markup_reaches_the_content(scanner, text):
    _, deltas = streamed(scanner(), text)
    content = assembled(deltas)[0]
    for markup in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '"name"'):
        assert markup not in content


@pytest.mark.parametrize(("scanner", "text", "content"), PLAIN)
def test_text_without_a_valid_call_is_plain_content(scanner, text, content):
    assert parse(scanner(), text) == (content, [])
    stream, deltas = streamed(scanner(), text)
    assert assembled(deltas) == (content, []) and stream.calls == []


def test_without_parallel_calls_only_the_first_is_kept():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    content, calls = parse(HermesScanner(), text, parallel=False)
    assert content is None and [call.name for call in calls] == ["a"]
    assert [c["name"] for c in assembled(streamed(HermesScanner(), text, parallel=False)[1])[1]] == ["a"]


def test_named_choice_streams_arguments_as_they_come():
    text = '{"city": "Paris"}'
    stream, deltas = streamed(NamedScanner("get_weather"), text)
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert len(deltas) == 1 + len(text)  # the start, then one piece per character fed
    assert assembled(deltas)[1][0]["arguments"] == text
    assert stream.content is None and [(c.name, c.arguments) for c in stream.calls] == [("get_weather", text)]
    assert parse(NamedScanner("f"), text)[1][0].arguments == text


def test_whitespace_between_content_and_calls_is_kept_inside_and_trimmed_outside():
    text = '\n A <tool_call>{"name": "f", "arguments": {}}</tool_call> B \n'
    assert parse(HermesScanner(), text)[0] == "A  B"
    assert assembled(streamed(HermesScanner(), text)[1])[0] == "A  B"
