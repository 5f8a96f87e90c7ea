"""PrefillLoad and the automatic placement rule: the router's prediction of a prompt's wait for prefill."""

from __future__ import annotations

import pytest

from services.router.policy import prefill_pool_saturated
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


@pytest.mark.parametrize(
    ("waits", "target_ms", "local_in_flight", "uncached", "expected"),
    [
        ([0.6, 0.8], 500, 0, 2048, True),  # every prefill worker too slow, decode worker idle
        ([0.6, 0.3], 500, 0, 2048, False),  # one prefill worker is fast enough
        ([0.6, None], 500, 0, 2048, False),  # a rate is unknown: keep to the prefill pool
        ([0.6], 0, 0, 2048, False),  # mode off
        ([0.6], 500, 3000, 2048, False),  # the decode worker already prefills enough
        ([], 500, 0, 2048, False),  # no candidate (the caller handles "no prefill worker")
    ],
)
def test_prefill_pool_saturated(waits, target_ms, local_in_flight, uncached, expected):
    assert prefill_pool_saturated(waits, target_ms, local_in_flight, uncached, 4096) is expected
