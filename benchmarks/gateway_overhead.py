"""Gateway overhead: tokens/s through the router's HTTP API versus straight from the decode worker's gRPC stream.

    .venv/bin/python benchmarks/gateway_overhead.py --model /path/to/smollm2-folder --load-format dummy \\
        --dtype bfloat16 --num-requests 400 --concurrency 200 --input-len 128 --output-len 128 --json out.json

Starts one LocalCluster (Redis, router, 0 prefill workers, 1 decode worker: the decode worker prefills every prompt
itself on both paths, and the router is told to prefill locally whatever the length) and runs the same workload
(seeded random prompt token ids, fixed output length with ignore_eos, greedy) in phases:

  direct  asyncio + grpc.aio, `Worker.Generate` on the decode worker (one channel, as the router uses)
  router  httpx (HTTP/1.1, one keep-alive connection per concurrent stream) streaming `POST /v1/completions`
          with the prompt as token ids and stream_options.include_usage

in the order direct, router, direct (x --rounds), each after its own warm-up. Every phase is a closed loop of
--concurrency streams over --num-requests requests. Per request: TTFT (send -> first gRPC chunk carrying token ids /
first SSE chunk carrying a choice), end-to-end latency (send -> stream end), output tokens (gRPC: counted ids;
HTTP: usage.completion_tokens); a request whose token count differs from --output-len counts as failed. Per phase:
output tokens of the successful requests / (last stream end - first send). Also reported: CPU seconds per wall
second of the client, the router and the decode worker during each phase (a client near 1.0 core means the client,
not the gateway, may be the limit: use --client-procs).

The decode worker runs with --no-prefix-caching (unless --prefix-caching) so every phase does the same prefill work
on the same prompts. Prints one row per phase, then router/direct tok/s (against the mean of the direct phases) and
the p50 TTFT difference, with the targets (>= 90 %, < 2 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable (benchmarks/ is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve import chunk_usage, parse_sse_line, percentile  # noqa: E402

TARGET_RATIO = 0.90
TARGET_TTFT_DELTA_MS = 2.0
DIRECT, ROUTER = "direct", "router"


# ---------------------------------------------------------------------------------------------------- pure parts


@dataclass
class Record:
    """One request; times are time.monotonic() seconds (system-wide on Linux, so comparable across processes)."""

    index: int
    sent: float
    ok: bool = False
    error: str | None = None
    first: float | None = None
    end: float | None = None
    tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.sent


def make_prompts(count: int, length: int, seed: int, low: int, high: int) -> list[list[int]]:
    """`count` prompts of `length` token ids drawn uniformly from [low, high), reproducible from `seed`."""
    if not 0 <= low < high:
        raise ValueError(f"token id range [{low}, {high}) is empty")
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


def completion_body(model: str, prompt: Sequence[int], output_len: int) -> dict[str, Any]:
    """The /v1/completions body for one prompt (the direct path derives its sampling options from it too)."""
    return {"model": model, "prompt": list(prompt), "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def phase_plan(rounds: int) -> list[str]:
    """direct, router, direct, router, direct, ... with `rounds` router phases, each between two direct ones."""
    if rounds < 1:
        raise ValueError("--rounds must be >= 1")
    return [DIRECT] + [ROUTER, DIRECT] * rounds


def split(count: int, parts: int) -> list[range]:
    """Indices 0..count-1 as `parts` contiguous, nearly equal ranges (the first ones one longer)."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def finish_record(record: Record, end: float, tokens: int, want_tokens: int, error: str | None) -> Record:
    """Close a record: success means no error, a first token, and exactly `want_tokens` tokens."""
    record.end, record.tokens = end, tokens
    if error is None and record.first is None:
        error = "the stream carried no tokens"
    if error is None and tokens != want_tokens:
        error = f"got {tokens} output tokens, want {want_tokens}"
    record.error, record.ok = error, error is None
    return record


def _ms(values_s: Sequence[float], p: float) -> float | None:
    return percentile(values_s, p) * 1000.0 if values_s else None


def summarize_phase(name: str, kind: str, records: Sequence[Record], cpu: dict[str, float]) -> dict[str, Any]:
    """A phase's figures: ok/failed, output tok/s over first send -> last end, TTFT and e2e percentiles (ms)."""
    ok = [r for r in records if r.ok]
    sent = [r.sent for r in records]
    ends = [r.end for r in records if r.end is not None]
    wall = (max(ends) - min(sent)) if sent and ends else 0.0
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    errors = sorted({r.error for r in records if r.error})
    return {
        "phase": name, "kind": kind, "ok": len(ok), "failed": len(records) - len(ok), "wall_s": wall,
        "output_tokens": tokens, "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": _ms(ttft, 50), "ttft_p90_ms": _ms(ttft, 90), "ttft_p99_ms": _ms(ttft, 99),
        "e2e_p50_ms": _ms(e2e, 50), "e2e_p90_ms": _ms(e2e, 90),
        "cpu_cores": {k: (v / wall if wall > 0 else 0.0) for k, v in cpu.items()},
        "errors": errors[:5],
    }


def request_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Per request, for the JSON: send time relative to the phase's first send, TTFT and e2e (ms), tokens, error."""
    origin = min((r.sent for r in records), default=0.0)
    ms = lambda v: None if v is None else round(v * 1000.0, 3)  # noqa: E731
    return [{"index": r.index, "sent_ms": ms(r.sent - origin), "ttft_ms": ms(r.ttft_s), "e2e_ms": ms(r.e2e_s),
             "tokens": r.tokens, "error": r.error} for r in records]


def compare(phases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Router versus direct: tok/s ratio (router mean / direct mean), p50 TTFT difference (ms), direct spread."""
    direct = [p for p in phases if p["kind"] == DIRECT]
    router = [p for p in phases if p["kind"] == ROUTER]
    if not direct or not router:
        raise ValueError("need at least one direct and one router phase")
    mean = lambda ps, key: statistics.fmean(p[key] for p in ps)  # noqa: E731
    direct_tps, router_tps = mean(direct, "output_tok_s"), mean(router, "output_tok_s")
    have_ttft = all(p["ttft_p50_ms"] is not None for p in [*direct, *router])
    delta = mean(router, "ttft_p50_ms") - mean(direct, "ttft_p50_ms") if have_ttft else None
    spread = ((max(p["output_tok_s"] for p in direct) - min(p["output_tok_s"] for p in direct)) / direct_tps
              if direct_tps > 0 else None)
    ratio = router_tps / direct_tps if direct_tps > 0 else None
    failed = sum(p["failed"] for p in phases)
    return {
        "direct_tok_s": direct_tps, "router_tok_s": router_tps, "ratio": ratio,
        "ttft_p50_delta_ms": delta, "direct_spread": spread, "failed_requests": failed,
        "ratio_ok": ratio is not None and ratio >= TARGET_RATIO and failed == 0,
        "ttft_ok": delta is not None and delta < TARGET_TTFT_DELTA_MS and failed == 0,
    }


def format_report(phases: Sequence[dict[str, Any]], comparison: dict[str, Any]) -> str:
    """The table and the verdict lines."""
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    head = (f"{'phase':<10}{'ok':>6}{'failed':>8}{'tok/s':>11}{'TTFT p50':>10}{'TTFT p90':>10}{'e2e p50':>10}"
            f"{'wall s':>8}  cpu cores (client/router/decode)")
    rows = [head, "-" * len(head)]
    for p in phases:
        cpu = p["cpu_cores"]
        cores = "/".join(fmt(cpu.get(k), ".2f") for k in ("client", "router", "decode"))
        rows.append(f"{p['phase']:<10}{p['ok']:>6}{p['failed']:>8}{p['output_tok_s']:>11.1f}"
                    f"{fmt(p['ttft_p50_ms']):>10}{fmt(p['ttft_p90_ms']):>10}{fmt(p['e2e_p50_ms']):>10}"
                    f"{p['wall_s']:>8.2f}  {cores}")
    c = comparison
    ratio = "-" if c["ratio"] is None else f"{100 * c['ratio']:.1f} %"
    rows += [
        "",
        f"router / direct output tok/s: {ratio} ({c['router_tok_s']:.1f} / {c['direct_tok_s']:.1f}; "
        f"target >= {100 * TARGET_RATIO:.0f} %) -> {'PASS' if c['ratio_ok'] else 'FAIL'}",
        f"p50 TTFT router - direct: {fmt(c['ttft_p50_delta_ms'], '+.2f')} ms (target < {TARGET_TTFT_DELTA_MS:g} ms)"
        f" -> {'PASS' if c['ttft_ok'] else 'FAIL'}",
        f"direct phases spread: {fmt(None if c['direct_spread'] is None else 100 * c['direct_spread'])} % of their "
        "mean tok/s (machine stability; large means the comparison is noisy)",
    ]
    if c["failed_requests"]:
        rows.append(f"WARNING: {c['failed_requests']} requests failed; see the errors in the JSON / above")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- one phase


@dataclass(frozen=True)
class SliceSpec:
    """What one client process (or the main one) sends in a phase; prompts are (index, token ids) pairs."""

    kind: str
    target: str  # gRPC address (direct) or router base URL
    model: str
    tag: str
    prompts: tuple[tuple[int, tuple[int, ...]], ...]
    output_len: int
    concurrency: int
    start_at: float  # time.monotonic() to begin sending at (after connections are open)
    timeout_s: float


@dataclass
class SliceResult:
    records: list[Record] = field(default_factory=list)
    cpu_s: float = 0.0
    late_s: float = 0.0  # how long after start_at it began (connection warm-up overran the margin)


def _sampling_options(model: str, output_len: int):
    """The SamplingOptions the router sends for our completion body (parsed by the router's own code)."""
    from services.router import protocol
    from services.wire import sampling_to_proto

    params = protocol.parse_completion(completion_body(model, [1], output_len)).sampling_params()
    return sampling_to_proto(params.replace(n=1, seed=params.seed))


async def _direct_one(stub, sampling, tag: str, index: int, prompt: Sequence[int], want: int,
                      timeout_s: float) -> Record:
    import grpc

    from proto import worker_pb2

    record = Record(index, time.monotonic())
    tokens, error = 0, None
    request = worker_pb2.GenerateRequest(request_id=f"gw-{tag}-{index}", prompt_token_ids=prompt, sampling=sampling,
                                         reservation_id="")
    call = stub.Generate(request)
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in call:
                if chunk.token_ids:
                    if record.first is None:
                        record.first = time.monotonic()
                    tokens += len(chunk.token_ids)
    except TimeoutError:
        error = f"timed out after {timeout_s} s"
    except grpc.aio.AioRpcError as exc:
        error = f"gRPC {exc.code().name}: {exc.details()}"
    except Exception as exc:  # noqa: BLE001 - a load generator records every failure and goes on
        error = f"{type(exc).__name__}: {exc}"
    finally:
        call.cancel()
    return finish_record(record, time.monotonic(), tokens, want, error)


async def _router_one(client, url: str, body: dict, index: int, want: int, timeout_s: float) -> Record:
    record = Record(index, time.monotonic())
    usage, error = None, None
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
            else:
                error = "the stream ended without [DONE]"
                async for line in response.aiter_lines():
                    event = parse_sse_line(line)
                    if event is None:
                        continue
                    if event.kind == "done":
                        error = None
                        break
                    if event.kind == "error":
                        error = event.error
                        break
                    if record.first is None and event.data.get("choices"):
                        record.first = time.monotonic()
                    usage = chunk_usage(event.data) or usage
    except TimeoutError:
        error = f"timed out after {timeout_s} s"
    except Exception as exc:  # noqa: BLE001 - a load generator records every failure and goes on
        error = f"{type(exc).__name__}: {exc}"
    end = time.monotonic()
    tokens = int(usage.get("completion_tokens") or 0) if usage else 0
    if error is None and usage is None:
        error = "no usage chunk in the stream"
    return finish_record(record, end, tokens, want, error)


async def run_slice_async(spec: SliceSpec) -> SliceResult:
    """Open connections, wait for start_at, then send spec.prompts with at most spec.concurrency in flight."""
    limit = asyncio.Semaphore(max(1, spec.concurrency))
    if spec.kind == DIRECT:
        import grpc

        from proto import worker_pb2_grpc

        sampling = _sampling_options(spec.model, spec.output_len)
        channel = grpc.aio.insecure_channel(spec.target)
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = worker_pb2_grpc.WorkerStub(channel)

        def send(index: int, prompt: Sequence[int]):
            return _direct_one(stub, sampling, spec.tag, index, prompt, spec.output_len, spec.timeout_s)

        close = channel.close
    else:
        import httpx

        pool = spec.concurrency + 8
        client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=pool,
                                                                     max_keepalive_connections=pool))
        url = spec.target.rstrip("/") + "/v1/completions"
        # one keep-alive connection per concurrent stream, opened before the clock starts
        await asyncio.gather(*(client.get(spec.target.rstrip("/") + "/health") for _ in range(spec.concurrency)))

        def send(index: int, prompt: Sequence[int]):
            body = completion_body(spec.model, prompt, spec.output_len)
            return _router_one(client, url, body, index, spec.output_len, spec.timeout_s)

        close = client.aclose

    async def one(index: int, prompt: Sequence[int]) -> Record:
        async with limit:
            return await send(index, prompt)

    result = SliceResult()
    try:
        delay = spec.start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        result.late_s = max(0.0, time.monotonic() - spec.start_at)
        cpu0 = time.process_time()
        result.records = list(await asyncio.gather(*(one(i, p) for i, p in spec.prompts)))
        result.cpu_s = time.process_time() - cpu0
    finally:
        await close()
    return result


def run_slice(spec: SliceSpec) -> SliceResult:
    """Entry point for a client process (picklable)."""
    return asyncio.run(run_slice_async(spec))


def _noop() -> None:
    """Submitted once per client process so their imports happen before the first phase."""
    import grpc  # noqa: F401
    import httpx  # noqa: F401

    from services.router import protocol  # noqa: F401


# ---------------------------------------------------------------------------------------------------- driver


class CpuMeter:
    """CPU seconds (user + system) used by named processes between start() and stop(); psutil when available."""

    def __init__(self, pids: dict[str, int]) -> None:
        try:
            import psutil

            self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        except Exception:  # noqa: BLE001 - figures are diagnostic only
            self._procs = {}
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, proc in self._procs.items():
            try:
                times = proc.cpu_times()
                out[name] = times.user + times.system
            except Exception:  # noqa: BLE001 - a process that exited reports nothing
                pass
        return out

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        return {name: end[name] - self._start[name] for name in end if name in self._start}


def run_phase(kind: str, name: str, args: argparse.Namespace, target: str, model: str,
              prompts: Sequence[Sequence[int]], concurrency: int, executor, meter: CpuMeter | None,
              index_base: int = 0) -> tuple[list[Record], dict[str, float], float]:
    """One phase split over the client processes (in this process when executor is None); records, cpu, late_s."""
    parts = 1 if executor is None else args.client_procs
    margin = 0.0 if executor is None else args.start_margin_s
    start_at = time.monotonic() + margin
    indexed = list(enumerate(prompts, start=index_base))
    specs = []
    for rng, conc in zip(split(len(indexed), parts), split(concurrency, parts), strict=True):
        chunk = tuple((i, tuple(p)) for i, p in indexed[rng.start:rng.stop])
        if chunk:
            specs.append(SliceSpec(kind, target, model, name, chunk, args.output_len, max(1, len(conc)), start_at,
                                   args.timeout))
    if meter is not None:
        meter.start()
    if executor is None:
        results = [run_slice(spec) for spec in specs]
    else:
        results = list(executor.map(run_slice, specs))
    cpu = meter.stop() if meter is not None else {}
    cpu["client"] = sum(r.cpu_s for r in results)
    records = sorted((rec for r in results for rec in r.records), key=lambda rec: rec.index)
    return records, cpu, max((r.late_s for r in results), default=0.0)


def _router_model_id(base_url: str, timeout_s: float = 60.0) -> str:
    """Wait until the router sees a decode worker; the model id it serves."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router at {base_url} saw no decode worker within {timeout_s:.0f} s")
        time.sleep(0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", required=True, help="local HF folder (config + tokenizer), or a name the engine resolves")
    add("--load-format", default="dummy", choices=["auto", "dummy"])
    add("--dtype", default="bfloat16")
    add("--max-num-seqs", type=int, default=256)
    add("--worker-arg", action="append", default=[], metavar="ARG",
        help="extra decode worker argument, repeatable (use --worker-arg=--flag for values starting with '-')")
    add("--router-arg", action="append", default=[], metavar="ARG", help="extra router argument, repeatable")
    add("--prefix-caching", action="store_true", help="leave prefix caching on (phases then reuse cached prompts)")
    add("--num-requests", type=int, default=400)
    add("--concurrency", type=int, default=200)
    add("--input-len", type=int, default=128)
    add("--output-len", type=int, default=128)
    add("--warmup", type=int, default=16, help="warm-up requests before each phase (not measured)")
    add("--rounds", type=int, default=1, help="router phases; each sits between two direct phases")
    add("--seed", type=int, default=0)
    add("--token-id-range", type=int, nargs=2, default=(1000, 20000), metavar=("LOW", "HIGH"),
        help="prompt token ids are drawn from [LOW, HIGH) (default: %(default)s)")
    add("--client-procs", type=int, default=1, help="client processes sharing each phase's load (default: 1)")
    add("--start-margin-s", type=float, default=5.0, help="with --client-procs > 1: time to open connections")
    add("--timeout", type=float, default=600.0, help="seconds per request")
    add("--ready-timeout-s", type=float, default=300.0)
    add("--json", type=Path, default=None)
    add("--run-dir", type=Path, default=None, help="cluster logs (default: a new temporary folder)")
    return parser


OVERHEAD_METRIC = "tandem_router_added_latency_seconds_bucket"


def overhead_buckets(metrics_text: str) -> dict[float, float]:
    """Cumulative bucket counts of the router's own added-latency histogram from a /metrics page."""
    buckets: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(OVERHEAD_METRIC + "{"):
            labels, value = line.rsplit(" ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(value)
    return buckets


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Prometheus-style quantile (linear inside the bucket) of the observations between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return None


def _scrape(router_url: str) -> dict[float, float]:
    import httpx

    return overhead_buckets(httpx.get(f"{router_url}/metrics", timeout=30).text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.client_procs < 1 or args.concurrency < 1 or args.num_requests < 1:
        raise SystemExit("--client-procs, --concurrency and --num-requests must be >= 1")
    plan = phase_plan(args.rounds)
    low, high = args.token_id_range
    prompts = make_prompts(args.num_requests, args.input_len, args.seed, low, high)
    warm_prompts = make_prompts(args.warmup * len(plan), args.input_len, args.seed + 1, low, high)

    from services.cluster import LocalCluster

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="tandem-gateway-"))
    worker_args = ["--load-format", args.load_format, "--dtype", args.dtype, "--max-num-seqs",
                   str(args.max_num_seqs), *([] if args.prefix_caching else ["--no-prefix-caching"]),
                   *args.worker_arg]
    router_args = ["--local-prefill-max-tokens", str(10**9), *args.router_arg]
    print(f"starting cluster (0 prefill, 1 decode); logs in {run_dir}", file=sys.stderr)
    executor = None
    if args.client_procs > 1:
        executor = concurrent.futures.ProcessPoolExecutor(args.client_procs,
                                                          mp_context=multiprocessing.get_context("spawn"))
    phases: list[dict[str, Any]] = []
    try:
        if executor is not None:
            for future in [executor.submit(_noop) for _ in range(args.client_procs)]:
                future.result()
        with LocalCluster(args.model, 0, 1, router_port=0, worker_args=worker_args, router_args=router_args,
                          run_dir=run_dir, ready_timeout_s=args.ready_timeout_s) as cluster:
            decode = cluster.workers["decode-0"]
            router_url = cluster.router_url
            model = _router_model_id(router_url)
            targets = {DIRECT: decode.address, ROUTER: router_url}
            meter = CpuMeter({"router": cluster.router.popen.pid, "decode": decode.popen.pid})
            print(f"router {router_url} (model {model!r}), decode worker {decode.address}; "
                  f"{args.num_requests} requests x {args.input_len}+{args.output_len} tokens, "
                  f"concurrency {args.concurrency}, phases {' '.join(plan)}", file=sys.stderr)
            counts: dict[str, int] = {}
            for n, kind in enumerate(plan):
                counts[kind] = counts.get(kind, 0) + 1
                name = f"{kind}-{counts[kind]}"
                if args.warmup:
                    warm = warm_prompts[n * args.warmup:(n + 1) * args.warmup]
                    records, _, _ = run_phase(kind, f"{name}-warm", args, targets[kind], model, warm,
                                              min(args.warmup, args.concurrency), None, None, index_base=10**6)
                    bad = [r.error for r in records if not r.ok]
                    if bad:
                        print(f"{name} warm-up: {len(bad)} failed, e.g. {bad[0]}", file=sys.stderr)
                scraped = _scrape(router_url)
                records, cpu, late = run_phase(kind, name, args, targets[kind], model, prompts, args.concurrency,
                                               executor, meter)
                summary = summarize_phase(name, kind, records, cpu)
                if kind == ROUTER:  # the router's own share of TTFT, from its histogram (engine queueing excluded)
                    after = _scrape(router_url)
                    for q in (0.5, 0.9, 0.99):
                        value = histogram_quantile(scraped, after, q)
                        summary[f"router_added_p{int(q * 100)}_ms"] = None if value is None else value * 1e3
                summary["late_start_s"] = late
                summary["requests"] = request_rows(records)
                phases.append(summary)
                print(f"{name}: {summary['ok']} ok, {summary['failed']} failed, "
                      f"{summary['output_tok_s']:.1f} tok/s, TTFT p50 {summary['ttft_p50_ms'] or 0:.1f} ms",
                      file=sys.stderr)
                for error in summary["errors"]:
                    print(f"  error: {error}", file=sys.stderr)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    comparison = compare(phases)
    print(format_report(phases, comparison))
    for phase in phases:
        if phase["kind"] == ROUTER:
            added = {q: phase.get(f"router_added_p{q}_ms") for q in (50, 90, 99)}
            print(f"{phase['phase']}: router-added latency in TTFT p50 {added[50]} ms, p90 {added[90]} ms, "
                  f"p99 {added[99]} ms (from tandem_router_added_latency_seconds; target p50 < 2 ms)")
    if any(p["late_start_s"] > 0.5 for p in phases):
        print("WARNING: a client process started over 0.5 s late (raise --start-margin-s)", file=sys.stderr)
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        document = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config, "run_dir": str(run_dir),
                    "phases": phases, "comparison": comparison}
        args.json.write_text(json.dumps(document, indent=2, default=lambda o: asdict(o)))
    return 0 if comparison["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
