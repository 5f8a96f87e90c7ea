"""PrefillLoad: the router's prediction of a prompt's wait for prefill (the placement rules: test_placement.py)."""

from __future__ import annotations

import pytest

from services.router.prefill_load import MIN_TOKENS_FOR_RATE, PrefillLoad


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_tokens_over_busy_time_and_unknown_until_enough_tokens():
    clock = Clock()
    load = PrefillLoad(clock)
    load.start("p0", 4096)
    clock.now += 0.1
    load.finish("p0", 4096, completed=True)
    assert load.tokens_per_s("p0") is None  # below MIN_TOKENS_FOR_RATE
    clock.now += 5.0  # idle: does not count
    load.start("p0", 4096)
    load.start("p0", 4096)  # concurrent prompts: one busy period
    clock.now += 0.2
    load.finish("p0", 4096, completed=True)
    load.finish("p0", 4096, completed=True)
    assert MIN_TOKENS_FOR_RATE <= 3 * 4096
    assert load.tokens_per_s("p0") == pytest.approx(3 * 4096 / 0.3)
    assert load.tokens_in_flight("p0") == 0


def test_predicted_wait_counts_the_tokens_ahead_and_failures_do_not_feed_the_rate():
    clock = Clock()
    load = PrefillLoad(clock)
    for _ in range(4):
        load.start("p0", 4000)
        clock.now += 0.1
        load.finish("p0", 4000, completed=True)  # 40,000 tok/s
    load.start("p0", 8000)
    load.start("p0", 2000)
    clock.now += 0.1
    load.finish("p0", 2000, completed=False)  # failed: leaves the queue, adds nothing to the rate
    assert load.tokens_in_flight("p0") == 8000
    assert load.predicted_wait_s("p0", 2000) == pytest.approx((8000 + 2000) / (16000 / 0.5))
    assert load.predicted_wait_s("unknown", 2000) is None
