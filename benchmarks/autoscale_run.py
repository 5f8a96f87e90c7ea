"""`tandem serve --autoscale` under a rising load: the replica counts the planner chose over time, and the SLO share.

    export OMP_NUM_THREADS=1   # on a small shared CPU: one thread per engine process
    .venv/bin/python -m services.launch profile --device cpu --max-model-len 512 --kv-cache-memory 128MiB \\
        --prompt-tokens 128 --output-tokens 24 --decode-batches 1,4,8,16 --output /tmp/cpu-profile.json
    timeout 540 .venv/bin/python benchmarks/autoscale_run.py --profile /tmp/cpu-profile.json \\
        --rates 0.2,0.4,0.8,1.2 --input-len 128 --slo-ttft-ms 2000 --slo-tpot-ms 400 --result-json /tmp/autoscale.json

(benchmarks/RESULTS.md has this run on a shared 2-core CPU.) The profile should be measured right before the run
with the workers' engine flags (`--worker-args`), on the same machine.

Starts `tandem serve --autoscale` with one prefill and one decode worker (its own Redis, a free port; the planner
gets `--profile`, the SLO, its pacing and limits through `--planner-args` and serves its /metrics on a free port),
waits until the router sees both workers, then sends benchmarks/serve.py's load: one Poisson step per rate, each
`--step-s` long and started on time whether or not the previous step's requests have finished (random-word
prompts of `--input-len`, `--output-len` tokens, EOS ignored, streamed over /v1/completions). Every `--sample-s`
it reads the planner's tandem_planner_desired_replicas / tandem_planner_actual_replicas per pool and the router's
/ready worker counts; `tandem serve`'s stderr is read live, so each `tandem autoscale:` decision line gets its time.

Output (stdout, Markdown for benchmarks/RESULTS.md): a timeline with one row per `--row-s` (offered rate, the
workers the router saw and the planner's desired counts at the row's end, and for the requests sent in that row:
how many, the share that met both SLOs, TTFT and TPOT p50), one row per step, and the planner's decisions.
`--result-json` keeps the samples, decisions and every request record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repo importable (benchmarks/ is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pd_goodput import free_port, slo_share, stop_session, wait_workers  # noqa: E402
from benchmarks.serve import (  # noqa: E402
    ENDPOINT_PATHS,
    RequestRecord,
    api_url,
    build_payload,
    first_model,
    load_requests,
    percentile,
    run_benchmark,
)
from benchmarks.serve import build_parser as serve_parser  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
POOLS = ("prefill", "decode")
PLANNER_GAUGES = {"tandem_planner_desired_replicas": "desired", "tandem_planner_actual_replicas": "actual"}


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Sample:
    """At `t` s from the load's start: the router's live workers and the planner's desired / actual per pool."""

    t: float
    ready: dict[str, int]
    desired: dict[str, int]
    actual: dict[str, int]
    correction: dict[str, float] = field(default_factory=dict)  # the planner's correction factor per pool


@dataclass
class Run:
    """Everything one run observed (times in seconds from the load's start)."""

    rates: list[float]
    step_s: float
    slo_ms: dict[str, float]
    samples: list[Sample] = field(default_factory=list)
    decisions: list[tuple[float, str]] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    load_start: float = 0.0  # the monotonic clock when the first step began; decisions are kept on that clock
    worker_starts: dict[str, float] = field(default_factory=dict)  # worker id -> when its log file appeared

    def rate_at(self, t: float) -> float:
        step = int(t // self.step_s)
        return self.rates[step] if 0 <= step < len(self.rates) else 0.0

    def sample_at(self, t: float) -> Sample | None:
        """The last sample taken at or before `t`."""
        before = [s for s in self.samples if s.t <= t]
        return before[-1] if before else None


# ---------------------------------------------------------------------------------------------------- tables


def _p50_ms(values: Sequence[float]) -> str:
    return f"{percentile(values, 50) * 1e3:.0f}" if values else "-"


def window_figures(records: Sequence[RequestRecord], slo_ms: dict[str, float]) -> list[str]:
    """Requests sent, SLO share, TTFT p50 and TPOT p50 (ms) of `records`."""
    ok = [r for r in records if r.success]
    share = f"{slo_share(records, slo_ms):.0%}" if records else "-"
    return [str(len(records)), share, _p50_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
            _p50_ms([r.tpot_s for r in ok if r.tpot_s is not None])]


def _counts(sample: Sample | None, kind: str) -> str:
    if sample is None:
        return "-"
    values = getattr(sample, kind)
    return "/".join(str(values.get(pool, "-")) for pool in POOLS)


def timeline_table(run: Run, row_s: float) -> list[str]:
    """One Markdown row per `row_s` of the load (and its drain): workers and desired counts as prefill/decode."""
    end = max([len(run.rates) * run.step_s] + [r.start_s + (r.e2e_s or 0.0) for r in run.records])
    lines = ["| t (s) | offered req/s | workers P/D | planner wants P/D | sent | SLO met | TTFT p50 ms | TPOT p50 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    start = 0.0
    while start < end:
        sent = [r for r in run.records if start <= r.start_s < start + row_s]
        sample = run.sample_at(start + row_s)
        cells = [f"{start:.0f}-{start + row_s:.0f}", f"{run.rate_at(start):g}", _counts(sample, "ready"),
                 _counts(sample, "desired"), *window_figures(sent, run.slo_ms)]
        lines.append("| " + " | ".join(cells) + " |")
        start += row_s
    return lines


def step_table(run: Run) -> list[str]:
    """One Markdown row per load step: the most workers seen during it and its requests' figures."""
    lines = ["| step | offered req/s | max workers P/D | sent | SLO met | TTFT p50 ms | TPOT p50 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for index, rate in enumerate(run.rates):
        lo, hi = index * run.step_s, (index + 1) * run.step_s
        sent = [r for r in run.records if lo <= r.start_s < hi]
        seen = [s for s in run.samples if lo <= s.t < hi]
        most = "/".join(str(max((s.ready.get(pool, 0) for s in seen), default=0)) for pool in POOLS)
        lines.append("| " + " | ".join([str(index + 1), f"{rate:g}", most, *window_figures(sent, run.slo_ms)]) + " |")
    return lines


def correction_lines(run: Run) -> list[str]:
    """The planner's correction factor per pool at each row's end, where the planner exports one."""
    if not any(s.correction for s in run.samples):
        return []
    cells = []
    for index in range(len(run.rates) * 4):
        sample = run.sample_at((index + 1) * run.step_s / 4)
        if sample is not None and sample.correction:
            cells.append(f"{(index + 1) * run.step_s / 4:.0f} s " + "/".join(
                f"{sample.correction.get(pool, 1.0):.2f}" for pool in POOLS))
    return ["Correction factor P/D (the planner's tandem_planner_correction_factor, every quarter step): "
            + ", ".join(cells), ""]


def worker_events(run: Run) -> list[str]:
    """When each worker added during the run was started (its log appeared) and when the router's counts changed."""
    started = [(t, f"{worker_id} started") for worker_id, t in run.worker_starts.items() if t > 0]
    seen, last = [], None
    for sample in run.samples:
        counts = _counts(sample, "ready")
        if last is not None and counts != last:
            seen.append((sample.t, f"the router sees {counts} workers P/D"))
        last = counts
    return [f"- {t:.0f} s: {text}" for t, text in sorted(started + seen)] or ["- (none)"]


def report(run: Run, row_s: float) -> str:
    decisions = [f"- {at - run.load_start:.0f} s: {line}" for at, line in run.decisions] or ["- (none)"]
    events = ["", "Workers (a pool's new workers start when the planner decides; LocalScaler waits for each to be "
                  "READY, all pools at once; the decision is printed after that):", *worker_events(run)]
    overall = f"{slo_share(run.records, run.slo_ms):.1%}" if run.records else "-"
    slo = ", ".join(f"{name.upper()} <= {ms:g} ms" for name, ms in run.slo_ms.items())
    return "\n".join([f"SLO: {slo}; met by {overall} of {len(run.records)} requests", "", *timeline_table(run, row_s),
                      "", *step_table(run), "", *correction_lines(run),
                      "Planner decisions (time from the load's start, printed once its workers were up):",
                      *decisions, *events])


# ---------------------------------------------------------------------------------------------------- the cluster


def planner_flags(opts: argparse.Namespace, metrics_port: int) -> str:
    flags = ["--profile", opts.profile, "--slo-ttft-ms", f"{opts.slo_ttft_ms:g}", "--slo-tpot-ms",
             f"{opts.slo_tpot_ms:g}", "--interval-s", f"{opts.interval_s:g}", "--cooldown-s", f"{opts.cooldown_s:g}",
             "--max-prefill", str(opts.max_prefill), "--max-decode", str(opts.max_decode),
             "--metrics-port", str(metrics_port)]
    return shlex.join(flags + shlex.split(opts.planner_arg))


def serve_command(opts: argparse.Namespace, port: int, metrics_port: int, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "services.launch", "serve", "--model", opts.model, "--prefill", "1", "--decode",
            "1", "--port", str(port), "--log-dir", str(log_dir), "--ready-timeout-s", f"{opts.ready_timeout_s:g}",
            "--autoscale", "--planner-args", planner_flags(opts, metrics_port), *shlex.split(opts.worker_args)]


def follow_stderr(stream: IO[str], log: IO[str], run: Run) -> None:
    """Copy `tandem serve`'s stderr to its log; each planner decision is kept with its time (monotonic)."""
    for line in stream:
        log.write(line)
        log.flush()
        if line.startswith("tandem autoscale: "):
            run.decisions.append((time.monotonic(), line.removeprefix("tandem autoscale: ").strip()))


def planner_gauges(text: str) -> dict[str, dict[str, int]]:
    """desired / actual -> pool -> replicas, from the planner's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[str, int]] = {"desired": {}, "actual": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PLANNER_GAUGES:
                found[PLANNER_GAUGES[sample.name]][sample.labels["pool"]] = int(sample.value)
    return found


def planner_corrections(text: str) -> dict[str, float]:
    """pool -> the planner's correction factor, from its /metrics text (empty from a planner without one)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["pool"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "tandem_planner_correction_factor"}


async def take_sample(client: httpx.AsyncClient, router_url: str, planner_url: str, t: float) -> Sample:
    ready, gauges, corrections = {}, {"desired": {}, "actual": {}}, {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        body = (await client.get(f"{router_url}/ready", timeout=5)).json()
        ready = {pool: int(body[f"{pool}_workers"]) for pool in POOLS}
    with contextlib.suppress(httpx.HTTPError):
        text = (await client.get(f"{planner_url}/metrics", timeout=5)).text
        gauges, corrections = planner_gauges(text), planner_corrections(text)
    return Sample(t, ready, gauges["desired"], gauges["actual"], corrections)


def note_worker_starts(run: Run, log_dir: Path, t: float) -> None:
    """LocalCluster opens `<worker id>.log` when it spawns a worker: the first time one is seen is its start."""
    for path in log_dir.glob("*.log"):
        if re.fullmatch(r"(prefill|decode)-\d+", path.stem):
            run.worker_starts.setdefault(path.stem, t)


async def sample_forever(client: httpx.AsyncClient, router_url: str, planner_url: str, run: Run, log_dir: Path,
                         period_s: float) -> None:
    while True:
        t = time.monotonic() - run.load_start
        note_worker_starts(run, log_dir, t)
        run.samples.append(await take_sample(client, router_url, planner_url, t))
        await asyncio.sleep(period_s)


# ---------------------------------------------------------------------------------------------------- the load


def step_args(opts: argparse.Namespace, rate: float, index: int) -> argparse.Namespace:
    """benchmarks/serve.py's settings for one step: rate x step_s prompts, seeded by the step."""
    argv = ["--num-prompts", str(max(1, round(rate * opts.step_s))), "--request-rate", str(rate), "--input-len",
            str(opts.input_len), "--output-len", str(opts.output_len), "--ignore-eos", "--seed",
            str(opts.seed + index), "--timeout", f"{opts.request_timeout_s:g}"]
    return serve_parser().parse_args(argv)


async def one_step(client: httpx.AsyncClient, url: str, model: str, args: argparse.Namespace,
                   offset_s: float) -> list[RequestRecord]:
    """One step's requests, started `offset_s` after the load's start; record times moved onto the load's clock."""
    requests, _ = load_requests(args)
    bodies = [build_payload(r, args.endpoint, model, args) for r in requests]
    await asyncio.sleep(offset_s)
    records, _ = await run_benchmark(client, url, bodies, requests, args, None)
    for record in records:
        record.start_s += offset_s
    return records


async def drive(opts: argparse.Namespace, router_url: str, planner_url: str, run: Run, log_dir: Path) -> None:
    """Every step on its schedule while the sampler runs; the records land in `run`."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        model = await first_model(client, router_url)
        url = api_url(router_url, ENDPOINT_PATHS["completions"])
        run.load_start = time.monotonic()
        note_worker_starts(run, log_dir, 0.0)  # the first workers: started before the load, not listed
        sampler = asyncio.create_task(sample_forever(client, router_url, planner_url, run, log_dir, opts.sample_s))
        try:
            steps = [one_step(client, url, model, step_args(opts, rate, i), i * opts.step_s)
                     for i, rate in enumerate(opts.rates)]
            run.records = [record for records in await asyncio.gather(*steps) for record in records]
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


def run_autoscale(opts: argparse.Namespace) -> Run:
    run = Run(list(opts.rates), opts.step_s, {"ttft": opts.slo_ttft_ms, "tpot": opts.slo_tpot_ms})
    port, metrics_port = free_port(), free_port()
    log_dir = Path(opts.log_dir or tempfile.mkdtemp(prefix="tandem-autoscale-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = serve_command(opts, port, metrics_port, log_dir)
    print(f"autoscale_run: {shlex.join(command)}\n  logs in {log_dir}", file=sys.stderr, flush=True)
    with open(log_dir / "serve.log", "w") as log:
        popen = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        reader = threading.Thread(target=follow_stderr, args=(popen.stderr, log, run), daemon=True)
        reader.start()
        try:
            router_url = f"http://127.0.0.1:{port}"
            wait_workers(router_url, 1, 1, opts.ready_timeout_s)
            asyncio.run(drive(opts, router_url, f"http://127.0.0.1:{metrics_port}", run, log_dir))
        finally:
            stop_session(popen)
            reader.join(timeout=10)
    return run


# ---------------------------------------------------------------------------------------------------- CLI


def parse_rates(text: str) -> list[float]:
    rates = [float(item) for item in text.split(",") if item.strip()]
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"--rates takes positive req/s, comma-separated, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--profile", required=True, help="the planner's profile (from `tandem profile` on this machine)")
    add("--rates", type=parse_rates, default=[0.2, 0.4, 0.8, 1.2], help="req/s of each step (default: 0.2,0.4,0.8,1.2)")
    add("--step-s", type=float, default=60.0, help="seconds per step (default: %(default)s)")
    add("--input-len", type=int, default=128, help="prompt words (about one token each) (default: %(default)s)")
    add("--output-len", type=int, default=16, help="default: %(default)s")
    add("--slo-ttft-ms", type=float, default=2000.0, help="default: %(default)s")
    add("--slo-tpot-ms", type=float, default=400.0, help="default: %(default)s")
    add("--interval-s", type=float, default=10.0, help="the planner's (default: %(default)s)")
    add("--cooldown-s", type=float, default=120.0, help="the planner's (default: %(default)s)")
    add("--max-prefill", type=int, default=3, help="default: %(default)s")
    add("--max-decode", type=int, default=3, help="default: %(default)s")
    add("--planner-arg", default="", help="more `tandem planner` flags, one string")
    add("--model", default="smollm2", help="default: %(default)s")
    add("--worker-args", default="--device cpu --max-model-len 512 --kv-cache-memory 128MiB",
        help="engine flags of `tandem serve` (the profile's own) (default: %(default)s)")
    add("--sample-s", type=float, default=2.0, help="default: %(default)s")
    add("--row-s", type=float, default=15.0, help="timeline row length (default: %(default)s)")
    add("--seed", type=int, default=0)
    add("--request-timeout-s", type=float, default=90.0,
        help="a request still streaming after this fails (an SLO miss), so the run ends (default: %(default)s)")
    add("--ready-timeout-s", type=float, default=300.0)
    add("--log-dir", default=None, help="default: a new temporary folder")
    add("--result-json", default=None)
    return parser


def save(run: Run, opts: argparse.Namespace, path: str) -> None:
    document = {"argv": sys.argv, "options": vars(opts), "samples": [asdict(s) for s in run.samples],
                "decisions": [(at - run.load_start, line) for at, line in run.decisions],
                "worker_starts": run.worker_starts, "records": [asdict(r) for r in run.records]}
    Path(path).write_text(json.dumps(document, indent=1, default=str))


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # `timeout` sends SIGTERM: stop `tandem serve` on the way out (finally blocks run)


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    run = run_autoscale(opts)
    if opts.result_json:
        save(run, opts, opts.result_json)
    print(report(run, opts.row_s))
    return 0 if any(r.success for r in run.records) else 1


if __name__ == "__main__":
    sys.exit(main())
