"""benchmarks/autoscale_run.py without a cluster: its flags, the planner's gauges, and the timeline it prints from
synthetic samples and records (exact rows)."""

from __future__ import annotations

import argparse
import shlex

import pytest

from benchmarks.autoscale_run import (
    Run,
    Sample,
    build_parser,
    note_worker_starts,
    planner_gauges,
    report,
    serve_command,
    step_table,
)
from benchmarks.serve import RequestRecord

PLANNER_METRICS = """\
# TYPE tandem_planner_desired_replicas gauge
tandem_planner_desired_replicas{model="",pool="prefill"} 2.0
tandem_planner_desired_replicas{model="",pool="decode"} 1.0
# TYPE tandem_planner_actual_replicas gauge
tandem_planner_actual_replicas{model="",pool="prefill"} 1.0
tandem_planner_actual_replicas{model="",pool="decode"} 1.0
# TYPE tandem_planner_observed_request_rate gauge
tandem_planner_observed_request_rate{model="",pool="prefill"} 3.5
"""


def record(start_s: float, ttft_s: float, tpot_s: float, success: bool = True) -> RequestRecord:
    return RequestRecord(index=0, success=success, start_s=start_s, ttft_s=ttft_s, e2e_s=ttft_s + 10 * tpot_s,
                         tpot_s=tpot_s, output_tokens=11)


def test_flags_reach_the_serve_command_and_its_planner_args():
    opts = build_parser().parse_args(["--profile", "p.json", "--rates", "1,2.5", "--max-prefill", "4",
                                      "--planner-arg", "--band 0.3"])
    assert opts.rates == [1.0, 2.5] and opts.step_s == 60.0
    command = serve_command(opts, port=8123, metrics_port=9123, log_dir="/tmp/x")
    assert command[command.index("--port") + 1] == "8123" and "--autoscale" in command
    planner = shlex.split(command[command.index("--planner-args") + 1])
    assert planner[planner.index("--profile") + 1] == "p.json" and planner[-2:] == ["--band", "0.3"]
    assert planner[planner.index("--metrics-port") + 1] == "9123"
    assert planner[planner.index("--max-prefill") + 1] == "4"
    assert command[-6:] == ["--device", "cpu", "--max-model-len", "512", "--kv-cache-memory", "128MiB"]
    for bad in ("0,1", "", "x"):
        with pytest.raises((SystemExit, argparse.ArgumentTypeError)):
            build_parser().parse_args(["--profile", "p", "--rates", bad])


def test_the_planner_gauges_are_read_per_pool():
    assert planner_gauges(PLANNER_METRICS) == {"desired": {"prefill": 2, "decode": 1},
                                              "actual": {"prefill": 1, "decode": 1}}


def test_the_timeline_has_a_row_per_period_with_the_workers_seen_at_its_end():
    run = Run([1.0, 2.0], step_s=20.0, slo_ms={"ttft": 500.0, "tpot": 50.0}, load_start=100.0)
    run.samples = [Sample(0.0, {"prefill": 1, "decode": 1}, {"prefill": 1, "decode": 1}, {}),
                   Sample(18.0, {"prefill": 1, "decode": 1}, {"prefill": 2, "decode": 1}, {}),
                   Sample(25.0, {"prefill": 2, "decode": 1}, {"prefill": 2, "decode": 1}, {})]
    run.records = [record(1.0, 0.2, 0.03), record(5.0, 0.9, 0.03), record(12.0, 0.3, 0.04),
                   record(21.0, 0.1, 0.02), record(22.0, 0.1, 0.02, success=False), record(30.0, 0.4, 0.09)]
    run.decisions = [(117.0, "prefill: 1 -> 2: up: ...")]
    run.worker_starts = {"prefill-0": 0.0, "decode-0": 0.0, "prefill-1": 16.5}
    text = report(run, row_s=10.0)
    lines = text.splitlines()
    assert lines[0] == "SLO: TTFT <= 500 ms, TPOT <= 50 ms; met by 50.0% of 6 requests"
    assert lines[4] == "| 0-10 | 1 | 1/1 | 1/1 | 2 | 50% | 550 | 30 |"
    assert lines[5] == "| 10-20 | 1 | 1/1 | 2/1 | 1 | 100% | 300 | 40 |"
    assert lines[6] == "| 20-30 | 2 | 2/1 | 2/1 | 2 | 50% | 100 | 20 |"
    assert lines[7] == "| 30-40 | 2 | 2/1 | 2/1 | 1 | 0% | 400 | 90 |"
    assert lines[8] == ""
    assert step_table(run)[2:] == ["| 1 | 1 | 1/1 | 3 | 67% | 300 | 30 |", "| 2 | 2 | 2/1 | 3 | 33% | 250 | 55 |"]
    assert lines[-5] == "- 17 s: prefill: 1 -> 2: up: ..."
    assert lines[-2:] == ["- 16 s: prefill-1 started", "- 25 s: the router sees 2/1 workers P/D"]


def test_new_workers_are_noted_by_their_log_files(tmp_path):
    run = Run([1.0], step_s=10.0, slo_ms={})
    for name in ("prefill-0", "decode-0", "router", "serve"):
        (tmp_path / f"{name}.log").write_text("")
    note_worker_starts(run, tmp_path, 0.0)
    (tmp_path / "decode-1.log").write_text("")
    note_worker_starts(run, tmp_path, 12.0)
    note_worker_starts(run, tmp_path, 14.0)
    assert run.worker_starts == {"prefill-0": 0.0, "decode-0": 0.0, "decode-1": 12.0}


def test_the_correction_factors_are_read_and_reported_per_quarter_step():
    from benchmarks.autoscale_run import planner_corrections

    text = ('tandem_planner_correction_factor{model="m",pool="prefill"} 2.5\n'
            'tandem_planner_correction_factor{model="m",pool="decode"} 1.0\n')
    assert planner_corrections(text) == {"prefill": 2.5, "decode": 1.0}
    assert planner_corrections(PLANNER_METRICS) == {}
    run = Run([1.0], step_s=20.0, slo_ms={"ttft": 500.0, "tpot": 50.0})
    run.samples = [Sample(4.0, {}, {}, {}, {"prefill": 1.5, "decode": 1.0}),
                   Sample(12.0, {}, {}, {}, {"prefill": 2.25, "decode": 0.75})]
    lines = report(run, row_s=10.0).splitlines()
    found = [line for line in lines if line.startswith("Correction factor P/D")]
    assert found == ["Correction factor P/D (the planner's tandem_planner_correction_factor, every quarter step): "
                     "5 s 1.50/1.00, 10 s 1.50/1.00, 15 s 2.25/0.75, 20 s 2.25/0.75"]
