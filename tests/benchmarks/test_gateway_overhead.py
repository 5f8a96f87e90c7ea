"""benchmarks/gateway_overhead.py without a cluster: workload, phase plan, statistics, verdict, and the HTTP
request loop against an in-process fake (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks.gateway_overhead import (
    DIRECT,
    ROUTER,
    Record,
    _router_one,
    _sampling_options,
    compare,
    completion_body,
    finish_record,
    format_report,
    make_prompts,
    phase_plan,
    split,
    summarize_phase,
)


def test_prompts_are_seeded_and_in_range():
    a = make_prompts(5, 7, seed=3, low=10, high=20)
    assert a == make_prompts(5, 7, seed=3, low=10, high=20)
    assert a != make_prompts(5, 7, seed=4, low=10, high=20)
    assert len(a) == 5 and all(len(p) == 7 and all(10 <= t < 20 for t in p) for p in a)
    with pytest.raises(ValueError):
        make_prompts(1, 1, 0, 5, 5)


def test_phase_plan_puts_every_router_phase_between_direct_ones():
    assert phase_plan(1) == [DIRECT, ROUTER, DIRECT]
    assert phase_plan(2) == [DIRECT, ROUTER, DIRECT, ROUTER, DIRECT]
    with pytest.raises(ValueError):
        phase_plan(0)


def test_split_covers_everything_once():
    parts = split(10, 3)
    assert [len(r) for r in parts] == [4, 3, 3]
    assert [i for r in parts for i in r] == list(range(10))
    assert [len(r) for r in split(2, 3)] == [1, 1, 0]


def test_finish_record_checks_the_token_count():
    assert finish_record(Record(0, 0.0, first=0.1), 1.0, 8, 8, None).ok
    short = finish_record(Record(0, 0.0, first=0.1), 1.0, 7, 8, None)
    assert not short.ok and "7 output tokens" in short.error
    assert finish_record(Record(0, 0.0), 1.0, 0, 8, None).error == "the stream carried no tokens"
    assert finish_record(Record(0, 0.0, first=0.1), 1.0, 8, 8, "boom").error == "boom"


def _records(ttft_s: float, e2e_s: float, n: int = 4, tokens: int = 10) -> list[Record]:
    return [Record(i, 100.0, ok=True, first=100.0 + ttft_s, end=100.0 + e2e_s, tokens=tokens) for i in range(n)]


def test_summary_and_comparison():
    direct_1 = summarize_phase("direct-1", DIRECT, _records(0.010, 2.0), {"client": 1.0})
    router = summarize_phase("router-1", ROUTER, _records(0.011, 2.0 / 0.95), {})
    direct_2 = summarize_phase("direct-2", DIRECT, _records(0.010, 2.0), {})
    assert direct_1["output_tok_s"] == pytest.approx(40 / 2.0)
    assert direct_1["ttft_p50_ms"] == pytest.approx(10.0)
    assert direct_1["cpu_cores"]["client"] == pytest.approx(0.5)
    result = compare([direct_1, router, direct_2])
    assert result["ratio"] == pytest.approx(0.95)
    assert result["ttft_p50_delta_ms"] == pytest.approx(1.0)
    assert result["ratio_ok"] and result["ttft_ok"] and result["direct_spread"] == pytest.approx(0.0)
    text = format_report([direct_1, router, direct_2], result)
    assert "95.0 %" in text and "+1.00 ms" in text and "FAIL" not in text


def test_failures_fail_the_verdict():
    bad = _records(0.010, 2.0)
    bad[0].ok, bad[0].error = False, "HTTP 503: no"
    router = summarize_phase("router-1", ROUTER, bad, {})
    direct = summarize_phase("direct-1", DIRECT, _records(0.010, 2.0), {})
    assert router["failed"] == 1 and router["errors"] == ["HTTP 503: no"]
    result = compare([direct, router])
    assert not result["ratio_ok"] and not result["ttft_ok"]
    assert "WARNING: 1 requests failed" in format_report([direct, router], result)


def test_direct_sampling_matches_the_router_body():
    options = _sampling_options("m", 32)
    assert options.max_tokens == 32 and options.ignore_eos and options.temperature == 0.0


def _sse(*events: dict | str) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def test_router_request_reads_ttft_and_usage():
    body = completion_body("m", [1, 2, 3], 2)
    assert body["prompt"] == [1, 2, 3] and body["stream_options"] == {"include_usage": True}

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        assert sent["ignore_eos"] is True and sent["max_tokens"] == 2
        content = _sse({"choices": [{"index": 0, "text": "a"}]}, {"choices": [{"index": 0, "text": "b"}]},
                       {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, "[DONE]")
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})

    async def go(want: int) -> Record:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await _router_one(client, "http://x/v1/completions", body, 0, want, 5.0)

    record = asyncio.run(go(2))
    assert record.ok and record.tokens == 2 and record.first is not None and record.end >= record.first
    assert not asyncio.run(go(3)).ok


def test_router_request_records_http_errors():
    async def go() -> Record:
        transport = httpx.MockTransport(lambda request: httpx.Response(429, json={"error": {"message": "busy"}}))
        async with httpx.AsyncClient(transport=transport) as client:
            return await _router_one(client, "http://x/v1/completions", {}, 0, 2, 5.0)

    record = asyncio.run(go())
    assert not record.ok and record.error.startswith("HTTP 429")
