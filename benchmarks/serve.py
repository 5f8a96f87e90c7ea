"""Load generator for any OpenAI-compatible server (Tandem's router or vLLM), in the style of `vllm bench serve`.

    .venv/bin/python benchmarks/serve.py --num-prompts 200 --request-rate 8 --input-len 512 --output-len 128 \\
        --ignore-eos --tokenizer /path/to/hf-folder --goodput ttft:500 tpot:50 --result-json out.json
    .venv/bin/python benchmarks/serve.py --endpoint chat --dataset file --dataset-path prompts.jsonl \\
        --max-concurrency 16
    .venv/bin/python benchmarks/serve.py --workload S1 --request-rate 8 --num-prompts 240 --tokenizer DIR

`--workload S1|S2` takes lengths, range ratios, SLOs and --ignore-eos from benchmarks/workloads.py
SERVING_WORKLOADS (the definitions benchmarks/pd_goodput.py sweeps); flags given explicitly still win.

Streams every request with raw httpx (one SSE line at a time) and measures, per request: TTFT (send -> first
event that carries content), ITL (gap between consecutive content events, split over the tokens the event
carries), TPOT ((e2e - ttft) / (output tokens - 1)), end-to-end latency, and success or the error. Token counts
come from the server's `usage` (stream_options.include_usage). Prints a table and optionally writes the same
figures plus one record per request as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable (benchmarks/ is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import SERVING_WORKLOADS, length_bounds  # noqa: E402

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SLO_METRICS = ("ttft", "tpot", "e2el")  # goodput thresholds, all in ms
LATENCY_METRICS = (  # key in the metrics, short name, table heading
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)
# Short common English words: most BPE vocabularies hold each as one token (with its leading space).
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an were are which this be or had not but "
    "one all their there been has have they who its new after more first two other some time when would year "
    "into also only out can may over such most then these many about made than under them any both city world "
    "state part could while during between used life since three well being each people where work war name"
)
WORDS = tuple(_WORD_TEXT.split())
TABLE_WIDTH = 50


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: `prompt` for /v1/completions, `messages` for chat; `input_len` is the intended length."""

    prompt: str | None
    messages: list[dict] | None
    output_len: int
    input_len: int | None = None


@dataclass(frozen=True)
class SSEEvent:
    """One parsed `data:` line: kind is "chunk" (data holds the JSON), "done" ([DONE]) or "error" (error set)."""

    kind: str
    data: dict | None = None
    error: str | None = None


@dataclass(frozen=True)
class ContentEvent:
    """A streamed chunk that carried generated text, seen `time_s` after the request was sent.

    `completion_tokens` is the server's cumulative count when the chunk carried usage (vLLM's
    stream_options.continuous_usage_stats), else None.
    """

    time_s: float
    text: str
    completion_tokens: int | None = None


@dataclass
class RequestRecord:
    """What one request measured; times in seconds, `start_s` relative to the benchmark start."""

    index: int
    success: bool
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    num_events: int = 0
    prompt_tokens_source: str = "none"  # usage | intended | none
    output_tokens_source: str = "none"  # usage | tokenizer | events | none
    itl_mode: str = "none"  # usage_deltas | one_per_event | averaged | none


# ---------------------------------------------------------------------------------------------------- SSE


def parse_sse_line(line: str) -> SSEEvent | None:
    """Parse one line of an SSE stream; None for blank lines, comments and fields other than `data`.

    A JSON payload with a top-level "error" (vLLM and OpenAI send `data: {"error": {...}}` mid-stream) and a
    payload that is not JSON both become error events.
    """
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return SSEEvent("done")
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return SSEEvent("error", error=f"invalid JSON in SSE data: {payload[:200]!r}")
    if not isinstance(data, dict):
        return SSEEvent("error", error=f"SSE data is not an object: {payload[:200]!r}")
    if data.get("error") is not None:
        return SSEEvent("error", data=data, error=error_message(data["error"]))
    return SSEEvent("chunk", data=data)


def error_message(error: Any) -> str:
    """The human part of an OpenAI-style error object (or whatever the server sent)."""
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def chunk_text(chunk: dict, endpoint: str) -> str:
    """Generated text in a streamed chunk: choices[0].text (completions) or delta.content / reasoning_content."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


def chunk_usage(chunk: dict) -> dict | None:
    """The chunk's usage object when present and not null."""
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) else None


# ---------------------------------------------------------------------------------------------------- per request


def event_token_counts(events: Sequence[ContentEvent], total_tokens: int | None) -> tuple[list[float], str]:
    """How many tokens each content event carried, and how that was decided.

    usage_deltas: every event had a cumulative usage count (exact). one_per_event: no per-event counts and the
    total matches the number of events (or is unknown). averaged: the total differs from the number of events and
    nothing says which events carried more, so each event gets total / events.
    """
    if events and all(e.completion_tokens is not None for e in events):
        counts, previous = [], 0
        for event in events:
            counts.append(float(event.completion_tokens - previous))
            previous = event.completion_tokens
        return counts, "usage_deltas"
    if total_tokens is None or total_tokens == len(events) or not events:
        return [1.0] * len(events), "one_per_event"
    return [total_tokens / len(events)] * len(events), "averaged"


def inter_token_latencies(times_s: Sequence[float], counts: Sequence[float]) -> list[float]:
    """ITL values from content event times and per-event token counts.

    The gap before event i is split over the tokens it carried: an event with k (whole) tokens gives k values of
    gap / k; a fractional k (averaged counts) gives one value gap / k; an event with no tokens passes its gap on to
    the next event. The first event is the TTFT and gives no ITL.
    """
    values: list[float] = []
    carried = 0.0
    for i in range(1, len(times_s)):
        gap = times_s[i] - times_s[i - 1] + carried
        k = counts[i]
        if k <= 0:
            carried = gap
            continue
        carried = 0.0
        repeat = int(k) if float(k).is_integer() else 1
        values.extend([gap / k] * repeat)
    return values


def time_per_output_token(ttft_s: float | None, e2e_s: float | None, output_tokens: int) -> float | None:
    """(e2e - ttft) / (output_tokens - 1); None when there is no second token."""
    if ttft_s is None or e2e_s is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def build_record(
    index: int,
    start_s: float,
    events: Sequence[ContentEvent],
    usage: dict | None,
    end_s: float,
    error: str | None = None,
    intended_input_len: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> RequestRecord:
    """Turn what one stream delivered into a RequestRecord (pure: all times are given, relative to the send)."""
    record = RequestRecord(index=index, success=False, error=error, start_s=start_s, num_events=len(events))
    record.e2e_s = end_s
    if usage and usage.get("prompt_tokens") is not None:
        record.prompt_tokens, record.prompt_tokens_source = int(usage["prompt_tokens"]), "usage"
    elif intended_input_len is not None:
        record.prompt_tokens, record.prompt_tokens_source = intended_input_len, "intended"
    total = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None else None
    if total is not None:
        record.output_tokens, record.output_tokens_source = total, "usage"
    elif count_tokens is not None and events:
        record.output_tokens, record.output_tokens_source = count_tokens("".join(e.text for e in events)), "tokenizer"
    else:
        record.output_tokens, record.output_tokens_source = len(events), "events"
    if events:
        record.ttft_s = events[0].time_s
        counts, record.itl_mode = event_token_counts(events, total)
        record.itl_s = inter_token_latencies([e.time_s for e in events], counts)
        record.tpot_s = time_per_output_token(record.ttft_s, end_s, record.output_tokens)
    if error is None and not events:
        record.error = "the stream carried no content"
    record.success = record.error is None
    return record


# ---------------------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std and each requested percentile, converted from seconds to milliseconds."""
    if not values_s:
        keys = ["mean_ms", "median_ms", "std_ms"] + [f"p{percentile_label(p)}_ms" for p in percentiles]
        return dict.fromkeys(keys)
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    summary: dict[str, float | None] = {
        "mean_ms": mean,
        "median_ms": percentile(ms, 50),
        "std_ms": math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)),
    }
    for p in percentiles:
        summary[f"p{percentile_label(p)}_ms"] = percentile(ms, p)
    return summary


def percentile_label(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if float(p).is_integer() else str(p)


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request is within every SLO (ms). A request with one output token has TPOT 0."""
    if not record.success:
        return False
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.e2e_s}
    return all(measured[name] is not None and measured[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def goodput(records: Sequence[RequestRecord], slos_ms: dict[str, float], duration_s: float) -> float | None:
    """Requests per second that succeeded and met every SLO; None when no SLO is given."""
    if not slos_ms:
        return None
    return sum(meets_slos(r, slos_ms) for r in records) / duration_s


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once, from each record's start and end-to-end latency."""
    edges = []
    for r in records:
        if r.e2e_s is not None:
            edges += [(r.start_s, 1), (r.start_s + r.e2e_s, -1)]
    peak = current = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts at the same instant
        current += step
        peak = max(peak, current)
    return peak


def aggregate(
    records: Sequence[RequestRecord], duration_s: float, percentiles: Sequence[float], slos_ms: dict[str, float]
) -> dict[str, Any]:
    """Benchmark-level figures; token totals and latencies cover successful requests only."""
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": goodput(records, slos_ms, duration_s),
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "peak_concurrency": peak_concurrency(records),
        "ttft": summarize([r.ttft_s for r in ok if r.ttft_s is not None], percentiles),
        "tpot": summarize([r.tpot_s for r in ok if r.tpot_s is not None], percentiles),
        "itl": summarize([v for r in ok for v in r.itl_s], percentiles),
        "e2el": summarize([r.e2e_s for r in ok if r.e2e_s is not None], percentiles),
    }


def format_table(metrics: dict[str, Any], percentiles: Sequence[float], slos_ms: dict[str, float]) -> str:
    """The result as a table laid out like `vllm bench serve` prints it."""
    rows = [" Serving Benchmark Result ".center(TABLE_WIDTH, "=")]
    add = lambda label, value: rows.append(f"{label:<40} {value:<10}")
    add("Successful requests:", metrics["completed"])
    add("Failed requests:", metrics["failed"])
    add("Benchmark duration (s):", f"{metrics['duration_s']:.2f}")
    add("Total input tokens:", metrics["total_input_tokens"])
    add("Total generated tokens:", metrics["total_output_tokens"])
    add("Request throughput (req/s):", f"{metrics['request_throughput']:.2f}")
    if metrics["request_goodput"] is not None:
        add("Request goodput (req/s):", f"{metrics['request_goodput']:.2f}")
        add("  SLOs (ms):", " ".join(f"{k}<={v:g}" for k, v in slos_ms.items()))
    add("Output token throughput (tok/s):", f"{metrics['output_throughput']:.2f}")
    add("Total token throughput (tok/s):", f"{metrics['total_token_throughput']:.2f}")
    add("Peak concurrent requests:", metrics["peak_concurrency"])
    for key, short, title in LATENCY_METRICS:
        rows.append(title.center(TABLE_WIDTH, "-"))
        summary = metrics[key]
        add(f"Mean {short} (ms):", _ms(summary["mean_ms"]))
        add(f"Median {short} (ms):", _ms(summary["median_ms"]))
        for p in percentiles:
            if p != 50:
                add(f"P{percentile_label(p)} {short} (ms):", _ms(summary[f"p{percentile_label(p)}_ms"]))
    rows.append("=" * TABLE_WIDTH)
    return "\n".join(rows)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------- workload


def arrival_offsets(num: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Send time of each request in seconds from the start; the first goes at 0.

    Gaps are drawn from a gamma distribution with mean 1 / rate and shape `burstiness` (1 = exponential gaps,
    i.e. Poisson arrivals), from numpy's generator seeded with `seed`. rate inf sends everything at 0.
    """
    if num <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * num
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def sample_lengths(num: int, length: int, range_ratio: float, rng: np.random.Generator) -> list[int]:
    """Uniform integer lengths in [floor(L*(1-r)), ceil(L*(1+r))], at least 1."""
    low, high = length_bounds(length, range_ratio)
    return rng.integers(low, high + 1, size=num).tolist()


def random_words(num_words: int, rng: np.random.Generator) -> str:
    """A prompt of random common words (roughly one token each with most tokenizers)."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=num_words))


def random_token_prompt(tokenizer: Any, num_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
    """Text from random non-special token ids, re-encoded and trimmed so it tokenizes to about num_tokens.

    Returns the text and its token count under the tokenizer (no special tokens; the server may add a BOS and
    the chat template adds more, so the server's usage is the figure reported).
    """
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids = rng.choice(allowed, size=num_tokens).tolist()
    text = tokenizer.decode(ids)
    for _ in range(4):  # decode(encode(x)) need not round-trip: trim or top up, a few times
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == num_tokens:
            break
        if len(ids) > num_tokens:
            ids = ids[:num_tokens]
        else:
            ids = ids + rng.choice(allowed, size=num_tokens - len(ids)).tolist()
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def random_requests(args: argparse.Namespace, tokenizer: Any | None) -> list[BenchRequest]:
    """--dataset random: prompts of --input-len tokens (or words without --tokenizer), --output-len each."""
    rng = np.random.default_rng(args.seed)
    input_lens = sample_lengths(args.num_prompts, args.input_len, args.range_ratio, rng)
    output_ratio = args.range_ratio if getattr(args, "output_range_ratio", None) is None else args.output_range_ratio
    output_lens = sample_lengths(args.num_prompts, args.output_len, output_ratio, rng)
    requests = []
    for input_len, output_len in zip(input_lens, output_lens):
        if tokenizer is not None:
            text, input_len = random_token_prompt(tokenizer, input_len, rng)
        else:
            text = random_words(input_len, rng)
        requests.append(as_request({"prompt": text}, args.endpoint, output_len, input_len))
    return requests


def file_requests(args: argparse.Namespace) -> list[BenchRequest]:
    """--dataset file: JSONL lines {"prompt": ...} or {"messages": [...]} (optional "max_tokens"), cycled."""
    lines = [json.loads(line) for line in Path(args.dataset_path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{args.dataset_path} holds no prompts")
    picked = [lines[i % len(lines)] for i in range(args.num_prompts)]
    return [as_request(item, args.endpoint, int(item.get("max_tokens", args.output_len))) for item in picked]


def as_request(item: dict, endpoint: str, output_len: int, input_len: int | None = None) -> BenchRequest:
    """A dataset item as a request for the endpoint: a bare prompt becomes one user message for chat."""
    if endpoint == "chat":
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        return BenchRequest(None, messages, output_len, input_len)
    if "prompt" not in item:
        raise ValueError("the completions endpoint needs {'prompt': ...} items; use --endpoint chat for messages")
    return BenchRequest(item["prompt"], None, output_len, input_len)


def build_payload(request: BenchRequest, endpoint: str, model: str, args: argparse.Namespace) -> dict:
    """The JSON body for one streamed request; --extra-body fields are merged last."""
    body: dict[str, Any] = {"model": model, "stream": True, "temperature": args.temperature}
    body["stream_options"] = {"include_usage": True}
    if args.continuous_usage:
        body["stream_options"]["continuous_usage_stats"] = True
    if endpoint == "chat":
        body["messages"] = request.messages
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    body.update(args.extra_body or {})
    return body


# ---------------------------------------------------------------------------------------------------- HTTP


def api_url(base_url: str, path: str) -> str:
    """base + path, whether or not the base already ends in /v1."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[len("/v1"):]
    return base + path


def headers(api_key: str | None) -> dict[str, str]:
    """Request headers, with a bearer token when --api-key is given."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id GET /v1/models lists."""
    response = await client.get(api_url(base_url, "/v1/models"))
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def read_stream(
    response: httpx.Response, endpoint: str, sent: float
) -> tuple[list[ContentEvent], dict | None, str | None]:
    """Read an SSE response to its end: content events (times from `sent`), the last usage, and an error if any."""
    events: list[ContentEvent] = []
    usage: dict | None = None
    async for line in response.aiter_lines():
        now = time.perf_counter()
        event = parse_sse_line(line)
        if event is None:
            continue
        if event.kind == "done":
            return events, usage, None
        if event.kind == "error":
            return events, usage, event.error
        chunk_usage_now = chunk_usage(event.data)
        usage = chunk_usage_now or usage
        text = chunk_text(event.data, endpoint)
        if text:
            cumulative = chunk_usage_now.get("completion_tokens") if chunk_usage_now else None
            events.append(ContentEvent(now - sent, text, cumulative))
    return events, usage, "the stream ended without [DONE]"


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict, request: BenchRequest, index: int, bench_start: float,
    args: argparse.Namespace, count_tokens: Callable[[str], int] | None,
) -> RequestRecord:
    """Send one streamed request and measure it; never raises (failures become records with the error)."""
    sent = time.perf_counter()
    events: list[ContentEvent] = []
    usage: dict | None = None
    try:
        async with asyncio.timeout(args.timeout), client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {_body_error(text)}"
            else:
                events, usage, error = await read_stream(response, args.endpoint, sent)
    except TimeoutError:
        error = f"timed out after {args.timeout} s"
    except Exception as exc:  # a load generator records every failure and goes on
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter() - sent
    return build_record(index, sent - bench_start, events, usage, end, error, request.input_len, count_tokens)


def _body_error(text: str) -> str:
    """The error message of a JSON error body, else the body itself (shortened)."""
    with contextlib.suppress(ValueError, AttributeError):
        return error_message(json.loads(text).get("error", text))[:500]
    return text[:500]


async def run_benchmark(
    client: httpx.AsyncClient, url: str, bodies: Sequence[dict], requests: Sequence[BenchRequest],
    args: argparse.Namespace, count_tokens: Callable[[str], int] | None,
) -> tuple[list[RequestRecord], float]:
    """Send every request on the arrival schedule, at most --max-concurrency in flight; records and duration (s)."""
    offsets = arrival_offsets(len(bodies), args.request_rate, args.seed, args.burstiness)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()

    async def one(index: int) -> RequestRecord:
        async with limit:
            return await send_request(client, url, bodies[index], requests[index], index, start, args, count_tokens)

    start = time.perf_counter()
    tasks = []
    for index, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- CLI


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {SLO_METRICS}, got {item!r}")
        if float(value) <= 0:
            raise ValueError(f"--goodput {name} must be positive")
        slos[name] = float(value)
    return slos


def parse_percentiles(text: str) -> list[float]:
    """"50,90,99" -> [50.0, 90.0, 99.0]; each in (0, 100]."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"--percentiles takes numbers in (0, 100], got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:8000")
    add("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions")
    add("--model", default=None, help="default: the first id GET /v1/models lists")
    add("--api-key", default=None)
    add("--num-prompts", type=int, default=100)
    add("--request-rate", type=float, default=math.inf, help="req/s, Poisson arrivals; inf sends all at once")
    add("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    add("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    add("--dataset", choices=["random", "file"], default="random")
    add("--dataset-path", default=None, help="JSONL, one {'prompt': ...} or {'messages': [...]} per line")
    add("--input-len", type=int, default=1024)
    add("--output-len", type=int, default=128)
    add("--range-ratio", type=float, default=0.0, help="lengths uniform in [L*(1-r), L*(1+r)]")
    add("--output-range-ratio", type=float, default=None, help="for output lengths (default: --range-ratio)")
    add("--workload", choices=sorted(SERVING_WORKLOADS), default=None,
        help="lengths, range ratios, SLOs and --ignore-eos from benchmarks/workloads.py (explicit flags win)")
    add("--tokenizer", default=None, help="HF folder: random prompts from random token ids (else random words)")
    add("--ignore-eos", action="store_true", help="send ignore_eos=true (vLLM extension) for fixed output lengths")
    add("--continuous-usage", action="store_true",
        help="ask for usage in every chunk (vLLM stream_options.continuous_usage_stats): exact tokens per event")
    add("--temperature", type=float, default=0.0)
    add("--extra-body", type=json.loads, default=None, help="JSON object merged into every request body")
    add("--seed", type=int, default=0)
    add("--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    add("--percentiles", default="50,90,99")
    add("--result-json", default=None)
    add("--timeout", type=float, default=6 * 3600, help="seconds per request, whole stream")
    add("--no-test-request", action="store_true", help="skip the single request sent (and checked) first")
    return parser


def apply_workload(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the flags --workload defines wherever the command line left them at their defaults."""
    if args.workload is None:
        return args
    load = SERVING_WORKLOADS[args.workload]
    preset = {"input_len": load.input_len, "range_ratio": load.input_range_ratio, "output_len": load.output_len,
              "output_range_ratio": load.output_range_ratio, "ignore_eos": True,
              "goodput": [f"{name}:{ms:g}" for name, ms in load.slo_ms.items()]}
    for name, value in preset.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    return args


def load_requests(args: argparse.Namespace) -> tuple[list[BenchRequest], Callable[[str], int] | None]:
    """The workload, and a token counter for servers that send no usage (when --tokenizer is given)."""
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.dataset == "file":
        if not args.dataset_path:
            raise ValueError("--dataset file needs --dataset-path")
        requests = file_requests(args)
    else:
        requests = random_requests(args, tokenizer)
    count = (lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else None
    return requests, count


def result_document(
    args: argparse.Namespace, model: str, metrics: dict, records: Sequence[RequestRecord]
) -> dict[str, Any]:
    """Everything --result-json writes: settings, figures and one record per request."""
    config = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in vars(args).items()}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model,
        "config": config,
        "metrics": metrics,
        "requests": [asdict(r) for r in records],
    }


async def main_async(args: argparse.Namespace) -> int:
    """Run the benchmark described by the parsed arguments; 0 when at least one request succeeded."""
    slos = parse_goodput(args.goodput)
    percentiles = parse_percentiles(args.percentiles)
    requests, count_tokens = load_requests(args)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers=headers(args.api_key)) as client:
        try:
            model = args.model or await first_model(client, args.base_url)
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            print(f"could not list models at {args.base_url} (pass --model): {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 1
        url = api_url(args.base_url, ENDPOINT_PATHS[args.endpoint])
        bodies = [build_payload(r, args.endpoint, model, args) for r in requests]
        if not args.no_test_request:
            test = await send_request(client, url, bodies[0], requests[0], -1, time.perf_counter(), args, count_tokens)
            if not test.success:
                print(f"test request failed: {test.error}", file=sys.stderr)
                return 1
        print(f"model {model}, {len(bodies)} requests to {url}, rate {args.request_rate}, "
              f"max concurrency {args.max_concurrency}", file=sys.stderr)
        records, duration = await run_benchmark(client, url, bodies, requests, args, count_tokens)
    metrics = aggregate(records, duration, percentiles, slos)
    print(format_table(metrics, percentiles, slos))
    for error in sorted({r.error for r in records if r.error})[:5]:
        print(f"error: {error}", file=sys.stderr)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result_document(args, model, metrics, records), indent=2))
    return 0 if metrics["completed"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = build_parser()
    args = apply_workload(parser.parse_args(argv), parser)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
