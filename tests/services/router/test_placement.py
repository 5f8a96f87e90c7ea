"""The prefill placement rules, each on its own with exact answers, then place_prefill's order of rules."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from common.config import RouterConfig
from common.metrics import PLACEMENT_REASONS
from services.router.policy import (
    DecodeLoad,
    Placement,
    PlacementSignals,
    RoutingPolicy,
    has_kv_headroom,
    local_not_slower,
    local_prefill_rate,
    over_tpot_target,
    place_prefill,
    place_saturated,
    predicted_tpot_ms,
    waits_exceed,
    within_token_budget,
    within_tpot_budget,
)

ROUTER = Path(__file__).resolve().parents[3] / "services" / "router"


def decode(**overrides: object) -> DecodeLoad:
    """A decode worker with 4 streams at 10 ms per token, 100 free blocks, nothing prefilling, rate unmeasured."""
    fields: dict[str, object] = {"running": 4, "free_blocks": 100, "tpot_ms": 10.0, "local_tokens_in_flight": 0,
                                 "local_rate": None}
    fields.update(overrides)
    return DecodeLoad(**fields)


def signals(**overrides: object) -> PlacementSignals:
    """A 2,000-token prompt nothing caches, 10 blocks needed; one prefill worker at 10,000 tok/s with 1 s queued."""
    fields: dict[str, object] = {"prompt_tokens": 2000, "uncached_local": 2000, "blocks_needed": 10,
                                 "prefill_available": True, "prefill_waits_s": (1.2,), "prefill_idle": False,
                                 "prefill_rate": 10_000.0, "decode": decode()}
    fields.update(overrides)
    return PlacementSignals(**fields)


def config(**overrides: object) -> RouterConfig:
    """Automatic placement on (TTFT 500 ms) with a 20 ms TPOT target, spread over 100 tokens."""
    fields: dict[str, object] = {"local_prefill_max_tokens": 32, "auto_prefill_ttft_ms": 500, "slo_tpot_ms": 20,
                                 "local_prefill_spread_tokens": 100}
    fields.update(overrides)
    return RouterConfig(**fields)


# ---------------------------------------------------------------------------------------------- single rules


@pytest.mark.parametrize(
    ("waits", "target_ms", "expected"),
    [
        ((0.6, 0.8), 500, True),
        ((0.6, 0.5), 500, False),  # equal to the target is not above it
        ((0.6, None), 500, False),  # a rate not measured yet
        ((0.6,), 0, False),  # mode off
        ((), 500, False),
    ],
)
def test_waits_exceed(waits, target_ms, expected) -> None:
    assert waits_exceed(waits, target_ms) is expected


def test_token_budget_and_kv_headroom_boundaries() -> None:
    assert within_token_budget(1000, 3096, 4096) is True
    assert within_token_budget(1001, 3096, 4096) is False
    assert has_kv_headroom(decode(free_blocks=10), 10) is True
    assert has_kv_headroom(decode(free_blocks=9), 10) is False


def test_local_rate_is_measured_then_configured_then_the_prefill_pools() -> None:
    assert local_prefill_rate(decode(local_rate=5000.0), 7000.0, 9000.0) == 5000.0
    assert local_prefill_rate(decode(local_rate=None), 7000.0, 9000.0) == 7000.0
    assert local_prefill_rate(decode(local_rate=0.0), 0.0, 9000.0) == 9000.0
    assert local_prefill_rate(decode(), 0.0, None) is None


def test_predicted_tpot_spreads_the_prefill_time_over_the_streams_tokens() -> None:
    # 8,192 tokens at 32,768 tok/s = 250 ms of prefill, over 256 tokens = 0.9765625 ms more per token
    assert predicted_tpot_ms(13.0, 8192, 32768.0, 256) == pytest.approx(13.9765625)
    assert predicted_tpot_ms(13.0, 8192, 32768.0, 0) == pytest.approx(13.0 + 250.0)  # never divides by zero


def test_within_tpot_budget_boundary_counts_the_prefills_already_running() -> None:
    # (1,000 in flight + 1,000) tokens at 2,000 tok/s = 1 s over 100 tokens = +10 ms on 10 ms
    busy = decode(local_tokens_in_flight=1000)
    assert within_tpot_budget(busy, 1000, 2000.0, 20.0, 100) is True
    assert within_tpot_budget(busy, 1000, 2000.0, 19.99, 100) is False
    assert within_tpot_budget(decode(), 1000, 2000.0, 14.99, 100) is False  # 10 + 5 ms


def test_within_tpot_budget_without_target_streams_or_rate() -> None:
    assert within_tpot_budget(decode(tpot_ms=500.0), 10**6, 1.0, 0.0, 100) is True  # no target: no TPOT limit
    assert within_tpot_budget(decode(running=0, tpot_ms=500.0), 10**6, 1.0, 20.0, 100) is True  # nothing to slow
    assert within_tpot_budget(decode(), 1, None, 20.0, 100) is False  # cannot predict: streams kept safe


@pytest.mark.parametrize(
    ("load", "target_ms", "expected"),
    [
        (decode(tpot_ms=20.5), 20.0, True),
        (decode(tpot_ms=20.0), 20.0, False),
        (decode(tpot_ms=20.5, running=0), 20.0, False),  # no stream: not busy
        (decode(tpot_ms=20.5), 0.0, False),  # no target
    ],
)
def test_over_tpot_target(load, target_ms, expected) -> None:
    assert over_tpot_target(load, target_ms) is expected


def test_local_not_slower_compares_the_queues_over_their_rates() -> None:
    # local: (1,000 + 2,000) / 10,000 = 0.3 s
    assert local_not_slower(signals(decode=decode(local_tokens_in_flight=1000), prefill_waits_s=(0.3,)), 10_000.0)
    assert not local_not_slower(signals(decode=decode(local_tokens_in_flight=1000), prefill_waits_s=(0.29,)),
                                10_000.0)
    assert local_not_slower(signals(), None)  # unknown: the other rules decide
    assert local_not_slower(signals(prefill_waits_s=(None,)), 10_000.0)


# ---------------------------------------------------------------------------------------------- saturated pool


def test_saturated_pool_goes_local_within_the_tpot_budget() -> None:
    # 2,000 tokens at the pool's 10,000 tok/s = 200 ms over 100 tokens: 10 + 2 = 12 ms <= 20 ms
    assert place_saturated(signals(), config()) == Placement(True, "prefill_saturated")


def test_saturated_pool_stays_remote_over_the_tpot_budget() -> None:
    # 10 + 200 ms / 100 tokens = 12 ms > 11.99 ms
    assert place_saturated(signals(), config(slo_tpot_ms=11.99)) == Placement(False, "decode_over_tpot")
    slow = signals(decode=decode(tpot_ms=18.5))  # 20.5 ms
    assert place_saturated(slow, config()) == Placement(False, "decode_over_tpot")


def test_saturated_pool_measured_local_rate_wins_over_the_pools() -> None:
    slow_local = signals(decode=decode(local_rate=1000.0))  # 2 s over 100 tokens: +20 ms
    assert place_saturated(slow_local, config()) == Placement(False, "decode_over_tpot")
    configured = config(local_prefill_tokens_per_s=20_000.0)  # +1 ms
    assert place_saturated(signals(), configured) == Placement(True, "prefill_saturated")


def test_saturated_pool_needs_kv_headroom() -> None:
    assert place_saturated(signals(blocks_needed=101), config()) == Placement(False, "decode_kv_full")


def test_saturated_pool_uses_the_token_budget_only_without_a_tpot_target() -> None:
    over_budget = signals(decode=decode(local_tokens_in_flight=3000))  # 5,000 > 4,096
    assert place_saturated(over_budget, config(slo_tpot_ms=0)) == Placement(False, "local_budget")
    assert place_saturated(signals(), config(slo_tpot_ms=0)) == Placement(True, "prefill_saturated")
    # with a target the TPOT model decides: (3,000 + 2,000) / 10,000 s over 100 tokens = +5 ms
    assert place_saturated(over_budget, config()) == Placement(True, "prefill_saturated")


def test_saturated_pool_stays_remote_when_the_decode_worker_would_be_slower() -> None:
    queued = signals(decode=decode(running=0, local_tokens_in_flight=20_000))  # 2.2 s locally vs 1.2 s
    assert place_saturated(queued, config()) == Placement(False, "local_slower")


# ---------------------------------------------------------------------------------------------- rule order


def test_no_prefill_worker_and_short_prompts_are_local_whatever_the_load() -> None:
    overloaded = decode(tpot_ms=500.0, free_blocks=0)
    assert place_prefill(signals(prefill_available=False, decode=overloaded), config()) == Placement(
        True, "no_prefill_worker")
    short = signals(prompt_tokens=32, uncached_local=32, prefill_idle=True, decode=overloaded)
    assert place_prefill(short, config()) == Placement(True, "short_prompt")


def test_a_prompt_cached_on_the_decode_worker_is_prefilled_there() -> None:
    cached = signals(uncached_local=32)
    assert place_prefill(cached, config()) == Placement(True, "decode_cache_hit")
    assert place_prefill(replace(cached, uncached_local=33, prefill_waits_s=(0.1,)), config()) == Placement(
        False, "prefill_pool")


def test_a_busy_decode_worker_sends_its_cached_prompts_to_an_idle_prefill_pool() -> None:
    cached = signals(uncached_local=32, prefill_waits_s=(0.001,), decode=decode(tpot_ms=25.0))
    assert place_prefill(replace(cached, prefill_idle=True), config()) == Placement(False, "decode_busy")
    assert place_prefill(cached, config()) == Placement(True, "decode_cache_hit")  # pool not idle
    assert place_prefill(replace(cached, prefill_idle=True), config(slo_tpot_ms=0)) == Placement(
        True, "decode_cache_hit")  # no TPOT target: the decode worker is never "busy"


def test_an_idle_or_unmeasured_prefill_pool_gets_the_long_prompts() -> None:
    assert place_prefill(signals(prefill_waits_s=(0.0002,), prefill_idle=True), config()) == Placement(
        False, "prefill_pool")
    assert place_prefill(signals(prefill_waits_s=(None,)), config()) == Placement(False, "prefill_pool")
    assert place_prefill(signals(), config(auto_prefill_ttft_ms=0)) == Placement(False, "prefill_pool")


def test_a_saturated_prefill_pool_hands_over_to_place_saturated() -> None:
    assert place_prefill(signals(), config()) == Placement(True, "prefill_saturated")
    assert RoutingPolicy(config(slo_tpot_ms=11.99)).place(signals()) == Placement(False, "decode_over_tpot")


def test_placement_names() -> None:
    assert (Placement(True, "x").placement, Placement(False, "x").placement) == ("local", "remote")


def test_every_reason_the_router_gives_is_a_metric_label_and_every_label_is_given() -> None:
    source = (ROUTER / "policy.py").read_text() + (ROUTER / "orchestrator.py").read_text()
    given = {("local" if local == "True" else "remote", reason)
             for local, reason in re.findall(r'Placement\((True|False), "(\w+)"\)', source)}
    declared = {(placement, reason) for placement, reasons in PLACEMENT_REASONS.items() for reason in reasons}
    assert given == declared
