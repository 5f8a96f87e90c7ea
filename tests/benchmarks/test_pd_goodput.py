"""benchmarks/pd_goodput.py on CPU: the max-goodput interpolation and the SLO share on synthetic records (exact
values), the shared workload definitions (bounds, seeding, serve.py's --workload preset), and one real tiny
sweep: a 1P1D LocalCluster with SmolLM2 on CPU, two rates, the Markdown table and the JSON checked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from benchmarks import pd_goodput
from benchmarks.pd_goodput import GoodputRate, build_loads, chosen_layouts, max_goodput_rate, slo_share
from benchmarks.serve import RequestRecord, apply_workload
from benchmarks.serve import build_parser as serve_parser
from benchmarks.workloads import SERVING_WORKLOADS, shape_model_folder
from common.models.loader import resolve_model_path

S1_SLO = SERVING_WORKLOADS["S1"].slo_ms


# ---------------------------------------------------------------------------------------------------- goodput rule


def test_max_goodput_interpolates_between_the_rates_around_the_crossing():
    assert max_goodput_rate([(8, 1.0), (16, 0.5)]) == GoodputRate(8 + 0.1 / 0.5 * 8, "=")
    assert max_goodput_rate([(16, 1.0), (24, 0.5), (20, 1.0)]).rate == pytest.approx(20.8)  # unsorted input
    assert max_goodput_rate([(4, 0.9), (8, 0.4)]) == GoodputRate(4.0, "=")  # exactly 90% counts as meeting


def test_max_goodput_takes_the_last_crossing_when_shares_are_not_monotonic():
    found = max_goodput_rate([(2, 1.0), (4, 0.5), (6, 0.95), (8, 0.7)])
    assert found.bound == "=" and found.rate == pytest.approx(6.4)
    assert found.text == "6.4"


def test_max_goodput_below_the_lowest_and_above_the_highest_rate():
    never = max_goodput_rate([(8, 0.5), (16, 0.2)])
    assert never == GoodputRate(8, "<") and never.text == "< 8"
    always = max_goodput_rate([(8, 1.0), (16, 0.95)])
    assert always == GoodputRate(16, ">=") and always.text == ">= 16"
    assert max_goodput_rate([]).text == "n/a"


def record(success: bool, ttft_ms: float | None, tpot_ms: float | None) -> RequestRecord:
    to_s = lambda ms: None if ms is None else ms / 1e3
    return RequestRecord(index=0, success=success, ttft_s=to_s(ttft_ms), tpot_s=to_s(tpot_ms), e2e_s=1.0)


def test_slo_share_counts_failures_as_misses_and_needs_both_ttft_and_tpot():
    records = [
        record(True, 500.0, 20.0),  # on both limits: meets
        record(True, 100.0, None),  # one output token: no TPOT, meets
        record(True, 501.0, 5.0),  # TTFT over
        record(True, 100.0, 20.5),  # TPOT over
        record(False, None, None),  # failed
    ]
    assert slo_share(records, S1_SLO) == 2 / 5
    assert slo_share([], S1_SLO) == 0.0


# ---------------------------------------------------------------------------------------------------- workloads


def test_workload_definitions_match_issue_11():
    s1, s2 = SERVING_WORKLOADS["S1"], SERVING_WORKLOADS["S2"]
    assert (s1.input_bounds, s1.output_bounds, s1.max_model_len) == ((1024, 3072), (128, 384), 4096)
    assert (s2.input_bounds, s2.output_bounds, s2.max_model_len) == ((6144, 10240), (128, 384), 12288)
    assert dict(s1.slo_ms) == {"ttft": 500.0, "tpot": 20.0} and dict(s2.slo_ms) == {"ttft": 2000.0, "tpot": 15.0}
    assert (s1.duration_s, s1.rates, s2.duration_s, s2.rates) == (30.0, (8, 12, 16, 20, 24), 20.0, (2, 3, 4, 5, 6))
    toy = s1.scaled(0.01)
    assert toy.input_bounds == (10, 30) and toy.max_model_len >= toy.input_bounds[1] + toy.output_bounds[1]


def test_serve_workload_preset_fills_defaults_and_keeps_explicit_flags():
    parser = serve_parser()
    args = apply_workload(parser.parse_args(["--workload", "S2", "--output-len", "64"]), parser)
    assert (args.input_len, args.range_ratio, args.output_range_ratio) == (8192, 0.25, 0.5)
    assert args.output_len == 64 and args.ignore_eos and args.goodput == ["ttft:2000", "tpot:15"]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return resolve_model_path("smollm2", None)


def test_seeded_loads_are_the_same_prompts_within_the_bounds(smollm2_dir):
    load = SERVING_WORKLOADS["S1"]
    first = build_loads(load, [2.0], 3.0, str(smollm2_dir), seed=5)[0]
    again = build_loads(load, [2.0], 3.0, str(smollm2_dir), seed=5)[0]
    other = build_loads(load, [2.0], 3.0, str(smollm2_dir), seed=6)[0]
    assert len(first.requests) == 6 and first.requests == again.requests and first.requests != other.requests
    low, high = load.input_bounds
    assert all(low <= r.input_len <= high for r in first.requests)  # token counts under SmolLM2's tokenizer
    assert all(load.output_bounds[0] <= r.output_len <= load.output_bounds[1] for r in first.requests)
    assert first.args.ignore_eos and first.args.request_rate == 2.0


def test_shape_folder_has_the_shape_and_the_tokenizer(smollm2_dir, tmp_path):
    folder = shape_model_folder("llama8b", smollm2_dir, str(tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (32, 4096, 49152)
    assert (folder / "tokenizer.json").is_file() and not list(folder.glob("*.safetensors"))


def test_layouts_skip_vllm_without_its_bundle_and_refuse_unknown_names(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pd_goodput, "VLLM_SITE", tmp_path / "absent")
    assert [layout.name for layout in chosen_layouts("1p1d,vllm-dp2,0p2d")] == ["1p1d", "0p2d"]
    assert "skipping vllm-dp2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown layout 'auto'"):
        chosen_layouts("auto")


# ---------------------------------------------------------------------------------------------------- real run


@pytest.mark.timeout(150)
def test_tiny_sweep_on_a_real_cluster(tmp_path, capsys):
    cpu_worker = ["--device", "cpu", "--kv-cache-memory", str(64 * 2**20), "--max-num-batched-tokens", "512",
                  "--heartbeat-s", "0.5", "--ttl-s", "3"]
    argv = ["--shape", "none", "--model", "smollm2", "--load-format", "auto", "--dtype", "float32",
            "--layouts", "1p1d", "--rates", "1,2", "--duration-s", "1.5", "--scale", "0.02", "--no-engine-step",
            "--router-arg=--heartbeat-s", "--router-arg=0.5", "--run-dir", str(tmp_path / "run"),
            "--result-json", str(tmp_path / "out.json"), *[f"--worker-arg={a}" for a in cpu_worker]]
    started = time.monotonic()
    assert pd_goodput.main(argv) == 0
    assert time.monotonic() - started < 90
    assert not psutil.Process().children(recursive=True)  # router, workers and Redis are gone

    report = json.loads((tmp_path / "out.json").read_text())
    rates = report["workloads"][0]["layouts"][0]["rates"]
    assert [(r["rate"], r["num_prompts"]) for r in rates] == [(1.0, 2), (2.0, 3)]
    assert all(rec["success"] for r in rates for rec in r["records"])
    assert sum(r["workers"]["prefill"]["kv_transfers"] for r in rates) >= 1  # 1P1D shipped KV

    table = capsys.readouterr().out
    first, second = rates
    for rate in rates:
        ttft = " / ".join(f"{rate['metrics']['ttft'][f'p{p}_ms']:,.1f}" for p in (50, 90, 99))
        assert f"| Tandem 1P1D | {rate['rate']:g} | {rate['metrics']['output_throughput']:,.0f} | {ttft} |" in table
        assert f"| {rate['slo_share']:.1%} |" in table
    goodput = max_goodput_rate([(first["rate"], first["slo_share"]), (second["rate"], second["slo_share"])])
    assert f"| Tandem 1P1D | {goodput.text} |" in table
    assert "| Tandem layout | req/s | client TPOT p50 ms |" in table
