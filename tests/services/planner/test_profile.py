"""The planner's profile: its curves, its JSON file, and the builder from a pd_goodput result."""

from __future__ import annotations

import json

import pytest

from services.planner.profile import (
    DecodeProfile,
    Profile,
    from_pd_goodput,
    load_profile,
    profile_from_file,
    save_profile,
)


def rate(rate: float, input_tokens: int, completed: int, ttft_ms: float, running: float | None, worker_ms: float | None,
         tpot_ms: float) -> dict:
    decode = {"mean_running": running, "worker_ms_per_token": worker_ms, "kv_transfers": completed}
    return {"rate": rate, "metrics": {"completed": completed, "total_input_tokens": input_tokens,
                                      "ttft": {"median_ms": ttft_ms, "p90_ms": ttft_ms * 2},
                                      "tpot": {"median_ms": tpot_ms, "p90_ms": tpot_ms * 1.2}},
            "workers": {"prefill": {"mean_running": 1.0}, "decode": decode}}


REPORT = {"command": "python3 benchmarks/pd_goodput.py --workloads S1", "workloads": [{
    "workload": {"name": "S1", "slo_ms": {"ttft": 500, "tpot": 30}},
    "layouts": [
        {"layout": "1p1d", "rates": [
            rate(8, 80 * 1000, 80, ttft_ms=125, running=10.0, worker_ms=12.0, tpot_ms=14.0),  # 8000 tok/s
            rate(16, 160 * 1000, 160, ttft_ms=100, running=24.0, worker_ms=None, tpot_ms=20.0),  # 10000 tok/s
            rate(24, 240 * 1000, 240, ttft_ms=400, running=40.0, worker_ms=18.0, tpot_ms=25.0),  # TPOT falls: kept
        ]},
        {"layout": "0p2d", "rates": [rate(8, 80 * 1000, 80, ttft_ms=10, running=99.0, worker_ms=1.0, tpot_ms=1.0)]},
    ]}]}


def test_decode_tpot_is_piecewise_linear_and_extends_past_the_last_point():
    decode = DecodeProfile(tpot_ms_by_batch=((1, 10.0), (64, 30.0), (128, 50.0)), max_batch=256)
    assert decode.tpot_s(0) == pytest.approx(0.010)
    assert decode.tpot_s(32.5) == pytest.approx(0.020)
    assert decode.tpot_s(96) == pytest.approx(0.040)
    assert decode.tpot_s(192) == pytest.approx(0.070)
    assert decode.max_batch_within(0.030) == pytest.approx(64, abs=1e-6)
    assert decode.max_batch_within(1.0) == 256  # the KV limit binds first
    assert decode.max_batch_within(0.005) == 0.0
    with pytest.raises(ValueError, match="must rise"):
        DecodeProfile(tpot_ms_by_batch=((1, 10.0), (1, 12.0)), max_batch=8)


def test_the_pd_goodput_builder_reads_the_one_prefill_one_decode_layout():
    profile = from_pd_goodput(REPORT, max_batch=128)
    assert profile.prefill.tokens_per_s == pytest.approx(10_000)  # 1000-token prompts, best median TTFT 100 ms
    assert profile.prefill.overhead_ms == 0.0
    # (mean running batch, the worker's own ms/token, else the client's TPOT median), made monotone
    assert profile.decode.tpot_ms_by_batch == ((10.0, 12.0), (24.0, 20.0), (40.0, 20.0))
    assert profile.decode.max_batch == 128
    assert "[1p1d]" in profile.source
    with pytest.raises(ValueError, match="no rates"):
        from_pd_goodput(REPORT, layout="vllm-dp2")


def test_a_profile_round_trips_through_its_file_and_either_file_kind_loads(tmp_path):
    profile = from_pd_goodput(REPORT)
    path = tmp_path / "profile.json"
    save_profile(profile, path)
    assert load_profile(path) == profile == profile_from_file(path)
    result = tmp_path / "pd_s1.json"
    result.write_text(json.dumps(REPORT))
    assert profile_from_file(result) == profile
    path.write_text(json.dumps({"prefill": {"tokens_per_s": -1}, "decode": {}}))
    with pytest.raises(ValueError, match="profile.json"):
        load_profile(path)
    assert isinstance(Profile.model_validate_json(json.dumps(json.loads(profile.model_dump_json()))), Profile)
