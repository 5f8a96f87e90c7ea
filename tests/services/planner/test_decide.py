"""The planner's decisions on recorded load traces: exact replica counts per step, no flapping, each pool scaled
by its own load (prefill-heavy load scales prefill, decode-heavy scales decode)."""

from __future__ import annotations

import math

import pytest

from services.planner.decide import (
    PlannerState,
    Policy,
    PoolLimits,
    PoolState,
    Slo,
    decide,
    decode_tpot_s,
    prefill_ttft_s,
)
from services.planner.load import ClusterLoad, PoolLoad
from services.planner.profile import DecodeProfile, PrefillProfile, Profile

# Prefill: 10k prompt tokens/s, so a 1000-token prompt takes 100 ms; with the M/D/1 wait, TTFT <= 500 ms needs
# utilisation <= 0.889 (rate <= 8.89 req/s per worker), and the 20% band (400 ms) <= 0.857 (8.57 req/s).
# Decode: TPOT 10 ms at batch 1 to 30 ms at 64, so the 30 ms SLO allows 64 streams per worker: n >= rate x
# output x 0.03 / 64.
PROFILE = Profile(prefill=PrefillProfile(tokens_per_s=10_000), decode=DecodeProfile(
    tpot_ms_by_batch=((1, 10.0), (64, 30.0)), max_batch=128))
POLICY = Policy(Slo(ttft_s=0.5, tpot_s=0.03), PoolLimits(1, 8), PoolLimits(1, 8), cooldown_s=60.0)
INTERVAL_S = 10.0


def cluster(at: float, rate: float, prompt: float, output: float, ttft_p90: float | None = None) -> ClusterLoad:
    prefill = PoolLoad("prefill", 0, rate, prompt, output, ttft_p90_s=ttft_p90)
    return ClusterLoad(at, prefill, PoolLoad("decode", 0, rate, prompt, output))


def run_trace(rates: list[float], prompt: float, output: float, start: tuple[int, int] = (1, 1),
              ttft_p90: float | None = None) -> tuple[list[int], list[int], list[str]]:
    """Replay one (rate per interval) trace; the prefill and decode counts after each step, and the reasons."""
    state = PlannerState(PoolState(start[0]), PoolState(start[1]))
    prefill, decode, reasons = [], [], []
    for step, rate in enumerate(rates):
        decisions, state = decide(PROFILE, POLICY, cluster(step * INTERVAL_S, rate, prompt, output, ttft_p90), state)
        prefill.append(decisions[0].desired)
        decode.append(decisions[1].desired)
        reasons.append(decisions[0].reason)
    return prefill, decode, reasons


def reversals(counts: list[int]) -> int:
    """How often the direction of change flips (up then down, or down then up)."""
    moves = [b - a for a, b in zip(counts, counts[1:]) if b != a]
    return sum((x > 0) != (y > 0) for x, y in zip(moves, moves[1:]))


def test_the_predictions_follow_the_queueing_and_batch_models():
    idle = PoolLoad("prefill", 1, 0.0, 1000, 100)
    assert prefill_ttft_s(PROFILE.prefill, idle, 1) == pytest.approx(0.1)
    busy = PoolLoad("prefill", 1, 8.0, 1000, 100)  # utilisation 0.8: wait 0.8 x 0.1 / (2 x 0.2) = 0.2 s
    assert prefill_ttft_s(PROFILE.prefill, busy, 1) == pytest.approx(0.3)
    assert prefill_ttft_s(PROFILE.prefill, busy, 2) == pytest.approx(0.1 + 0.4 * 0.1 / 1.2)
    assert prefill_ttft_s(PROFILE.prefill, PoolLoad("prefill", 1, 9.5, 1000, 100), 1) == math.inf  # over 0.9
    decode = PoolLoad("decode", 1, 3.0, 100, 1000)  # 3000 tokens/s: b = 3000 x TPOT(b) has no root below 64
    assert decode_tpot_s(PROFILE.decode, decode, 1, 0.03) == math.inf
    tpot = decode_tpot_s(PROFILE.decode, decode, 2, 0.03)  # b = 1500 TPOT(b): Little's law holds at the answer
    batch = 1 + (tpot * 1e3 - 10) * 63 / 20
    assert batch == pytest.approx(1500 * tpot, rel=1e-6) and tpot < 0.03


def test_a_prefill_heavy_ramp_scales_prefill_step_by_step_and_leaves_decode_alone():
    prefill, decode, reasons = run_trace([5, 10, 15, 20, 25, 30, 35, 40], prompt=1000, output=50)
    assert prefill == [1, 2, 2, 3, 3, 4, 4, 5]
    assert decode == [1] * 8
    assert reasons[1].startswith("up: predicted TTFT") and "at 2" in reasons[1]


def test_a_decode_heavy_ramp_scales_decode_and_leaves_prefill_alone():
    prefill, decode, _ = run_trace([2, 4, 6, 8, 10], prompt=100, output=1000)
    assert decode == [1, 2, 3, 4, 5]  # ceil(rate x 1000 x 0.03 / 64)
    assert prefill == [1] * 5


def test_a_burst_scales_up_at_once_and_down_one_replica_per_cool_down():
    rates = [5, 5, 40, 40] + [5] * 26
    prefill, decode, reasons = run_trace(rates, prompt=1000, output=50)
    # Low load from step 4 (t = 40 s): each step down needs 60 s of wanting it, so 100, 160, 220 and 280 s.
    assert prefill == [1, 1, 5, 5] + [5] * 6 + [4] * 6 + [3] * 6 + [2] * 6 + [1] * 2
    assert decode == [1] * 30
    assert reversals(prefill) == 1
    assert "cool-down 0/60 s" in reasons[4] and reasons[10].startswith("down by one")


def test_a_steady_load_holds_its_count_and_an_oversized_pool_shrinks_to_it_and_stops():
    prefill, decode, _ = run_trace([20] * 12, prompt=1000, output=50, start=(3, 1))
    assert prefill == [3] * 12
    prefill, _, _ = run_trace([20] * 30, prompt=1000, output=50, start=(6, 1))
    # 20 req/s needs 3 with the margin (20 / 8.57); from 6: down at 60, 120 and 180 s, then it stays.
    assert prefill == [6] * 6 + [5] * 6 + [4] * 6 + [3] * 12


def test_noise_around_a_boundary_never_flips_the_count():
    noisy = [8.7, 9.1, 8.6, 9.0, 8.5, 9.2, 8.7, 8.8, 9.1, 8.6] * 3  # around 8.89 req/s, the 1 -> 2 boundary
    prefill, _, _ = run_trace(noisy, prompt=1000, output=50)
    assert prefill == [1] + [2] * 29
    assert reversals(prefill) == 0


def test_no_scale_down_while_the_observed_ttft_breaks_the_slo():
    prefill, _, reasons = run_trace([5] * 12, prompt=1000, output=50, start=(3, 1), ttft_p90=0.8)
    assert prefill == [3] * 12
    assert "observed TTFT p90 800 ms > SLO" in reasons[-1]


def test_counts_stay_within_the_limits():
    prefill, _, _ = run_trace([200, 200], prompt=1000, output=50)
    assert prefill == [8, 8]  # the SLO is out of reach: max, not more
    prefill, _, reasons = run_trace([5], prompt=1000, output=50, start=(12, 1))
    assert prefill == [8] and reasons[0].startswith("clamped")
    with pytest.raises(ValueError):
        PoolLimits(3, 2)
