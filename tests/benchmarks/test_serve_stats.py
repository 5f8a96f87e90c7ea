"""benchmarks/serve.py without a server: SSE parsing, per-request figures, statistics, schedule, and a request
loop against an in-process fake (httpx.MockTransport)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math

import httpx
import numpy as np
import pytest

from benchmarks.serve import (
    BenchRequest,
    ContentEvent,
    RequestRecord,
    SSEEvent,
    aggregate,
    api_url,
    arrival_offsets,
    build_parser,
    build_payload,
    build_record,
    chunk_text,
    chunk_usage,
    event_token_counts,
    file_requests,
    format_table,
    goodput,
    inter_token_latencies,
    meets_slos,
    parse_goodput,
    parse_percentiles,
    parse_sse_line,
    peak_concurrency,
    percentile,
    run_benchmark,
    sample_lengths,
    send_request,
    summarize,
    time_per_output_token,
)

COMPLETION_CHUNK = {
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "text": " Paris", "logprobs": None, "finish_reason": None}],
}
CHAT_ROLE_CHUNK = {
    "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
}
CHAT_CONTENT_CHUNK = {
    "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
    "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}],
}
USAGE_CHUNK = {
    "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}


def data(obj: dict) -> str:
    return "data: " + json.dumps(obj)


# ------------------------------------------------------------------------------------------------ SSE


def test_sse_completion_chunk():
    event = parse_sse_line(data(COMPLETION_CHUNK))
    assert event == SSEEvent("chunk", data=COMPLETION_CHUNK)
    assert chunk_text(event.data, "completions") == " Paris"
    assert chunk_usage(event.data) is None


def test_sse_chat_chunks():
    role = parse_sse_line(data(CHAT_ROLE_CHUNK))
    content = parse_sse_line(data(CHAT_CONTENT_CHUNK) + "\r\n")
    assert chunk_text(role.data, "chat") == ""  # the role-only first chunk is not content
    assert chunk_text(content.data, "chat") == "Hello"
    reasoning = {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
    assert chunk_text(reasoning, "chat") == "hmm"


def test_sse_usage_chunk_has_no_text():
    event = parse_sse_line(data(USAGE_CHUNK))
    assert chunk_text(event.data, "chat") == ""
    assert chunk_usage(event.data) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert chunk_usage({"choices": [], "usage": None}) is None


def test_sse_done_blank_comment_and_other_fields():
    assert parse_sse_line("data: [DONE]") == SSEEvent("done")
    assert parse_sse_line("data:[DONE]") == SSEEvent("done")
    for line in ["", ": keep-alive", "event: message", "id: 3", "retry: 100"]:
        assert parse_sse_line(line) is None
    assert parse_sse_line('data:{"choices": []}') == SSEEvent("chunk", data={"choices": []})


def test_sse_error_events():
    event = parse_sse_line('data: {"error": {"message": "out of blocks", "type": "InternalError", "code": 500}}')
    assert event.kind == "error" and event.error == "out of blocks"
    assert parse_sse_line('data: {"error": "plain"}').error == "plain"
    assert parse_sse_line("data: {not json").kind == "error"
    assert parse_sse_line("data: [1, 2]").kind == "error"


# ------------------------------------------------------------------------------------------------ per request


def test_token_counts_from_usage_deltas():
    events = [ContentEvent(0.1, "a", 1), ContentEvent(0.2, "bc", 3), ContentEvent(0.3, "d", 4)]
    assert event_token_counts(events, 4) == ([1.0, 2.0, 1.0], "usage_deltas")


def test_token_counts_without_per_event_usage():
    events = [ContentEvent(0.1, "a"), ContentEvent(0.2, "b"), ContentEvent(0.4, "c"), ContentEvent(0.5, "d")]
    assert event_token_counts(events, 4) == ([1.0] * 4, "one_per_event")
    assert event_token_counts(events, None) == ([1.0] * 4, "one_per_event")
    assert event_token_counts(events, 6) == ([1.5] * 4, "averaged")


def test_inter_token_latencies_split_multi_token_events():
    times = [0.1, 0.2, 0.5, 0.6]
    assert inter_token_latencies(times, [1, 1, 3, 1]) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert inter_token_latencies(times, [1, 1, 1, 1]) == pytest.approx([0.1, 0.3, 0.1])
    assert inter_token_latencies(times, [2, 2, 2, 2]) == pytest.approx([0.05, 0.05, 0.15, 0.15, 0.05, 0.05])
    assert inter_token_latencies(times, [1.5] * 4) == pytest.approx([0.1 / 1.5, 0.3 / 1.5, 0.1 / 1.5])
    assert inter_token_latencies(times, [1, 0, 1, 1]) == pytest.approx([0.4, 0.1])  # a zero-token gap carries on
    assert inter_token_latencies([0.1], [1]) == []


def test_time_per_output_token():
    assert time_per_output_token(0.2, 1.2, 11) == pytest.approx(0.1)
    assert time_per_output_token(0.2, 0.2, 1) is None
    assert time_per_output_token(None, 1.0, 5) is None


def test_build_record_with_usage():
    events = [ContentEvent(0.25, "a"), ContentEvent(0.35, "b"), ContentEvent(0.55, "c")]
    usage = {"prompt_tokens": 12, "completion_tokens": 3}
    record = build_record(4, 1.5, events, usage, end_s=0.65, intended_input_len=10)
    assert record.success and record.error is None
    assert (record.index, record.start_s, record.num_events) == (4, 1.5, 3)
    assert record.ttft_s == 0.25 and record.e2e_s == 0.65
    assert record.itl_s == pytest.approx([0.1, 0.2])
    assert record.tpot_s == pytest.approx((0.65 - 0.25) / 2)
    assert (record.prompt_tokens, record.prompt_tokens_source) == (12, "usage")
    assert (record.output_tokens, record.output_tokens_source, record.itl_mode) == (3, "usage", "one_per_event")


def test_build_record_fallbacks_without_usage():
    events = [ContentEvent(0.1, "ab"), ContentEvent(0.2, "cd")]
    by_events = build_record(0, 0.0, events, None, 0.3, intended_input_len=9)
    assert (by_events.output_tokens, by_events.output_tokens_source) == (2, "events")
    assert (by_events.prompt_tokens, by_events.prompt_tokens_source) == (9, "intended")
    by_tokenizer = build_record(0, 0.0, events, None, 0.3, count_tokens=len)
    assert (by_tokenizer.output_tokens, by_tokenizer.output_tokens_source) == (4, "tokenizer")
    assert by_tokenizer.prompt_tokens is None


def test_build_record_failures():
    failed = build_record(1, 0.0, [ContentEvent(0.1, "a")], None, 0.2, error="out of blocks")
    assert not failed.success and failed.error == "out of blocks" and failed.ttft_s == 0.1
    empty = build_record(2, 0.0, [], {"prompt_tokens": 3, "completion_tokens": 0}, 0.2)
    assert not empty.success and empty.error == "the stream carried no content"


# ------------------------------------------------------------------------------------------------ statistics


def test_percentile_matches_numpy_linear():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    values = np.random.default_rng(3).random(101).tolist()
    for p in [0, 1, 25, 50, 90, 99, 99.9, 100]:
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_in_ms():
    summary = summarize([0.001, 0.002, 0.003, 0.004], [50, 90, 99])
    assert summary == pytest.approx(
        {"mean_ms": 2.5, "median_ms": 2.5, "std_ms": math.sqrt(1.25), "p50_ms": 2.5, "p90_ms": 3.7, "p99_ms": 3.97}
    )
    assert summarize([], [99.9]) == {"mean_ms": None, "median_ms": None, "std_ms": None, "p99.9_ms": None}


def records_fixture() -> list[RequestRecord]:
    """Three successful requests and one failed one, 2 s benchmark."""
    return [
        RequestRecord(0, True, start_s=0.0, ttft_s=0.1, e2e_s=0.5, tpot_s=0.02, itl_s=[0.01, 0.03],
                      prompt_tokens=10, output_tokens=21),
        RequestRecord(1, True, start_s=0.2, ttft_s=0.3, e2e_s=1.3, tpot_s=0.05, itl_s=[0.05],
                      prompt_tokens=20, output_tokens=21),
        RequestRecord(2, True, start_s=0.4, ttft_s=0.2, e2e_s=0.2, tpot_s=None, itl_s=[],
                      prompt_tokens=30, output_tokens=1),
        RequestRecord(3, False, error="HTTP 500: boom", start_s=0.6, e2e_s=0.1, prompt_tokens=40, output_tokens=5),
    ]


def test_meets_slos_and_goodput():
    records = records_fixture()
    assert [meets_slos(r, {"ttft": 200}) for r in records] == [True, False, True, False]
    assert [meets_slos(r, {"tpot": 30}) for r in records] == [True, False, True, False]  # 1 token: TPOT 0
    assert [meets_slos(r, {"ttft": 250, "e2el": 400}) for r in records] == [False, False, True, False]
    assert goodput(records, {"ttft": 200, "tpot": 30}, 2.0) == 1.0
    assert goodput(records, {}, 2.0) is None


def test_aggregate_exact():
    metrics = aggregate(records_fixture(), 2.0, [50, 90, 99], {"ttft": 200})
    assert metrics["completed"] == 3 and metrics["failed"] == 1
    assert metrics["total_input_tokens"] == 60 and metrics["total_output_tokens"] == 43
    assert metrics["request_throughput"] == 1.5
    assert metrics["request_goodput"] == 1.0
    assert metrics["output_throughput"] == 21.5
    assert metrics["total_token_throughput"] == 51.5
    assert metrics["peak_concurrency"] == 3
    assert metrics["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert metrics["ttft"]["median_ms"] == pytest.approx(200.0)
    assert metrics["ttft"]["p90_ms"] == pytest.approx(280.0)
    assert metrics["tpot"]["mean_ms"] == pytest.approx(35.0)  # the one-token request has no TPOT
    assert metrics["itl"]["median_ms"] == pytest.approx(30.0)  # ITLs of all requests pooled: 10, 30, 50
    assert metrics["e2el"]["p99_ms"] == pytest.approx(500 + (1300 - 500) * 0.98)
    table = format_table(metrics, [50, 90, 99], {"ttft": 200})
    assert "Successful requests:                     3" in table
    assert "Request goodput (req/s):                 1.00" in table and "ttft<=200" in table
    assert "Median TTFT (ms):                        200.00" in table
    assert "P50 TTFT" not in table and "P99 E2EL (ms):" in table


def test_peak_concurrency():
    records = [RequestRecord(0, True, start_s=0.0, e2e_s=1.0), RequestRecord(1, True, start_s=1.0, e2e_s=1.0),
               RequestRecord(2, True, start_s=0.5, e2e_s=2.0)]
    assert peak_concurrency(records) == 2  # 0 ends exactly when 1 starts
    assert peak_concurrency([]) == 0


# ------------------------------------------------------------------------------------------------ workload


def test_poisson_schedule_reproducible_and_rate():
    first = arrival_offsets(20_000, 50.0, seed=7)
    assert first == arrival_offsets(20_000, 50.0, seed=7)
    assert first != arrival_offsets(20_000, 50.0, seed=8)
    assert first[0] == 0.0 and all(b >= a for a, b in zip(first, first[1:]))
    assert (len(first) - 1) / first[-1] == pytest.approx(50.0, rel=0.03)
    gaps = np.diff(first)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential gaps: CV 1
    bursty = np.diff(arrival_offsets(20_000, 50.0, seed=7, burstiness=0.25))
    assert np.mean(bursty) == pytest.approx(0.02, rel=0.05) and np.std(bursty) / np.mean(bursty) > 1.8


def test_schedule_inf_and_errors():
    assert arrival_offsets(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    assert arrival_offsets(0, 5.0, seed=0) == []
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, seed=0)


def test_sample_lengths_bounds():
    rng = np.random.default_rng(0)
    lengths = sample_lengths(5000, 100, 0.5, rng)
    assert min(lengths) == 50 and max(lengths) == 150
    assert sample_lengths(3, 100, 0.0, rng) == [100, 100, 100]
    with pytest.raises(ValueError):
        sample_lengths(3, 100, 1.0, rng)


def test_cli_parsers():
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_percentiles("50,90,99.9") == [50.0, 90.0, 99.9]
    with pytest.raises(ValueError):
        parse_percentiles("0,50")
    assert api_url("http://h:8000/", "/v1/models") == "http://h:8000/v1/models"
    assert api_url("http://h:8000/v1", "/v1/chat/completions") == "http://h:8000/v1/chat/completions"


def test_payloads():
    args = build_parser().parse_args(["--ignore-eos", "--extra-body", '{"top_k": 5}'])
    completion = build_payload(BenchRequest("hi", None, 8), "completions", "m", args)
    assert completion == {"model": "m", "stream": True, "temperature": 0.0, "stream_options": {"include_usage": True},
                          "prompt": "hi", "max_tokens": 8, "ignore_eos": True, "top_k": 5}
    chat = build_payload(BenchRequest(None, [{"role": "user", "content": "hi"}], 8), "chat", "m", args)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["max_completion_tokens"] == 8
    assert "prompt" not in chat


def test_file_dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}], "max_tokens": 3}\n')
    args = build_parser().parse_args(["--endpoint", "chat", "--dataset", "file", "--dataset-path", str(path),
                                      "--num-prompts", "3", "--output-len", "9"])
    requests = file_requests(args)
    assert [r.messages[0]["content"] for r in requests] == ["a", "b", "a"]
    assert [r.output_len for r in requests] == [9, 3, 9]
    args.endpoint = "completions"
    with pytest.raises(ValueError):
        file_requests(args)


# ------------------------------------------------------------------------------------------------ fake server


def fake_handler(chunk_delay_s: float):
    """A MockTransport handler streaming OpenAI-style chunks; prompt "fail" -> HTTP 500, "midway" -> error event."""

    async def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("prompt") == "fail":
            return httpx.Response(500, json={"error": {"message": "boom", "type": "InternalError", "code": 500}})

        async def stream():
            for i in range(body["max_tokens"]):
                await asyncio.sleep(chunk_delay_s)
                if body["prompt"] == "midway" and i == 1:
                    yield b'data: {"error": {"message": "worker lost"}}\n\n'
                    return
                chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                yield ("data: " + json.dumps(chunk) + "\n\n").encode()
            usage = {"prompt_tokens": 5, "completion_tokens": body["max_tokens"]}
            yield ("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n").encode()

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    return handle


def test_request_loop_against_fake_server():
    args = build_parser().parse_args(["--max-concurrency", "2", "--timeout", "5"])
    prompts = ["p0", "fail", "midway", "p3"]
    requests = [BenchRequest(p, None, 4, input_len=2) for p in prompts]
    bodies = [build_payload(r, "completions", "m", args) for r in requests]

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake_handler(0.01))) as client:
            return await run_benchmark(client, "http://fake/v1/completions", bodies, requests, args, None)

    records, duration = asyncio.run(go())
    assert [r.success for r in records] == [True, False, False, True]
    assert records[1].error == "HTTP 500: boom"
    assert records[2].error == "worker lost" and records[2].num_events == 1
    good = records[0]
    assert (good.prompt_tokens, good.output_tokens, good.num_events, good.itl_mode) == (5, 4, 4, "one_per_event")
    assert len(good.itl_s) == 3 and good.ttft_s >= 0.01 and good.e2e_s >= 0.04
    assert good.tpot_s == pytest.approx((good.e2e_s - good.ttft_s) / 3)
    assert peak_concurrency(records) <= 2
    assert duration >= max(r.start_s + r.e2e_s for r in records) - 1e-6


def test_request_timeout_is_a_failure():
    args = build_parser().parse_args(["--timeout", "0.05"])
    request = BenchRequest("p", None, 50)
    body = build_payload(request, "completions", "m", args)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake_handler(0.01))) as client:
            return await send_request(client, "http://fake/v1/completions", body, request, 0, 0.0, args, None)

    record = asyncio.run(go())
    assert not record.success and record.error == "timed out after 0.05 s"


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert isinstance(args, argparse.Namespace)
    assert args.endpoint == "completions" and math.isinf(args.request_rate) and args.max_concurrency is None
