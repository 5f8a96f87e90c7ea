"""`tandem profile`: the ladder and its monotone fix-up, and a real measurement of SmolLM2 on CPU that the planner
takes as its profile."""

from __future__ import annotations

import math

import pytest

from common.config import parse_batch_sizes
from common.settings import SettingValueError
from services.launch import main
from services.planner.decide import PlannerState, Policy, PoolLimits, Slo, decide
from services.planner.load import ClusterLoad, PoolLoad
from services.planner.measure import DecodePoint, Measurement, format_table, ladder, monotone_tpot
from services.planner.profile import load_profile
from tests.services.planner.test_loop import prometheus  # noqa: F401 - the fake Prometheus fixture

LADDER = (1, 2, 4)


def test_monotone_tpot_keeps_the_running_maximum():
    assert monotone_tpot([10.0, 12.0, 11.0, 15.0, 14.0]) == [10.0, 12.0, 12.0, 15.0, 15.0]
    assert monotone_tpot([]) == []


def test_the_ladder_is_cut_at_the_kv_limit_which_then_closes_it():
    assert ladder((1, 4, 16, 64), 256) == [1, 4, 16, 64]
    assert ladder((1, 4, 16, 64), 20) == [1, 4, 16, 20]
    assert ladder((1, 4, 16), 16) == [1, 4, 16]
    assert ladder((4, 16), 2) == [2]


def test_batch_sizes_parse_positive_and_increasing():
    assert parse_batch_sizes("1, 4,16") == (1, 4, 16)
    for bad in ("", "4,2", "0,1", "1,x"):
        with pytest.raises(SettingValueError):
            parse_batch_sizes(bad)


def test_a_dip_in_the_measured_tpot_is_lifted_in_the_profile_and_shown_in_the_table():
    points = tuple(DecodePoint(b, ms, kept) for b, ms, kept in zip((1, 4, 16), (20.0, 19.0, 30.0),
                                                                     monotone_tpot([20.0, 19.0, 30.0])))
    measured = Measurement((900.0, 1000.0, 1100.0), points, max_batch=64)
    profile = measured.profile(overhead_ms=5.0, source="test")
    assert profile.prefill.tokens_per_s == 1000.0 and profile.prefill.overhead_ms == 5.0
    assert profile.decode.tpot_ms_by_batch == ((1.0, 20.0), (4.0, 20.0), (16.0, 30.0))
    table = format_table(measured)
    assert "1000 prompt tokens/s" in table and "max_batch 64" in table
    assert table.splitlines()[-2].split() == ["4", "19.00", "20.00"]  # measured, then kept


@pytest.fixture(scope="module")
def measured_file(tmp_path_factory) -> str:
    """A tiny real profile of the default model on CPU: 32-token prompts, a ladder of 1, 2, 4."""
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    code = main(["profile", "--device", "cpu", "--prompt-tokens", "32", "--output-tokens", "16",
                 "--prefill-batches", "2", "--prefill-batch-size", "2", "--decode-batches", "1,2,4",
                 "--decode-steps", "3", "--warmup-steps", "1", "--output", str(path)])
    assert code == 0
    return str(path)


def test_tandem_profile_measures_the_default_model_on_cpu(measured_file, capsys):
    profile = load_profile(measured_file)
    batches = [batch for batch, _ in profile.decode.tpot_ms_by_batch]
    tpots = [ms for _, ms in profile.decode.tpot_ms_by_batch]
    assert batches == list(LADDER)
    assert all(ms > 0 for ms in tpots) and tpots == sorted(tpots)
    assert profile.decode.max_batch >= LADDER[-1]
    assert 0 < profile.prefill.tokens_per_s < math.inf
    assert "smollm2 on cpu" in profile.source and "prompt 32 + output 16" in profile.source


def test_the_planner_plans_with_a_measured_profile(measured_file):
    profile = load_profile(measured_file)
    policy = Policy(Slo(ttft_s=10.0, tpot_s=profile.decode.tpot_s(4) * 2), PoolLimits(1, 8), PoolLimits(1, 8),
                    cooldown_s=60.0)
    one_worker = profile.prefill.tokens_per_s / 32  # requests a second of 32-token prompts one worker computes

    def load(rate: float, output_tokens: float) -> ClusterLoad:
        return ClusterLoad(0.0, PoolLoad("prefill", 1, rate, 32, output_tokens),
                           PoolLoad("decode", 1, rate, 32, output_tokens))

    streams = profile.decode.max_batch_within(policy.slo.tpot_s)  # one decode worker's batch within the SLO
    tokens_per_s = streams / profile.decode.tpot_s(streams)
    # Light for both pools: a tenth of what one worker of the slower pool takes (on a loaded CPU the measured
    # decode ladder can make decode the smaller capacity, which a load light only for prefill overran).
    light_rate = 0.1 * min(one_worker, tokens_per_s / 16)
    light, _ = decide(profile, policy, load(light_rate, 16), PlannerState.from_load(load(0, 0)))
    assert [d.desired for d in light] == [1, 1]
    heavy, _ = decide(profile, policy, load(one_worker * 2.5, 16), PlannerState.from_load(load(0, 0)))
    assert heavy[0].desired >= 3  # 2.5 workers' prompt tokens, each worker at most 90% busy
    busy, _ = decide(profile, policy, load(3 * tokens_per_s / 16, 16), PlannerState.from_load(load(0, 0)))
    assert busy[1].desired >= 3


def test_tandem_planner_takes_the_measured_file(measured_file, prometheus, capsys):  # noqa: F811
    code = main(["planner", "--dry-run", "--iterations", "1", "--interval-s", "0.01", "--prometheus-url", prometheus,
                 "--profile", measured_file])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["prefill", "decode"]
