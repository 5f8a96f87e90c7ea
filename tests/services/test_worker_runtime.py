"""The worker runtime's pure parts: the heartbeat's recent time per token, and what each role's engine records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.config import EngineConfig
from common.engine.stats import StepClock
from services.worker_runtime import (
    RecentStepTime,
    configure_for_role,
    engine_config_for_role,
    speculative_positions,
)


def test_recent_step_time_is_a_moving_mean_of_each_windows_time_per_step() -> None:
    recent = RecentStepTime(weight=0.5)
    assert recent.ms == 0.0  # unknown until a step
    assert recent.update(StepClock(steps=10, seconds=0.1, requests=40)) == pytest.approx(10.0)  # the first window
    assert recent.update(StepClock(steps=20, seconds=0.4, requests=80)) == pytest.approx(0.5 * 30.0 + 0.5 * 10.0)
    assert recent.update(StepClock(steps=20, seconds=0.4, requests=80)) == pytest.approx(20.0)  # idle: kept
    assert recent.update(StepClock(steps=2, seconds=0.01, requests=2)) == pytest.approx(20.0)  # clock went back
    assert recent.update(StepClock(steps=4, seconds=0.07, requests=4)) == pytest.approx(0.5 * 30.0 + 0.5 * 20.0)


def test_recent_step_time_rejects_a_weight_outside_0_1() -> None:
    with pytest.raises(ValueError):
        RecentStepTime(weight=0.0)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_both_roles_record_prefix_cache_events_for_the_redis_index(role: str) -> None:
    engine = SimpleNamespace(kv_cache_manager=SimpleNamespace(pool=SimpleNamespace(track_cache_events=False)),
                             stats_recorder=SimpleNamespace(collect_finished=False))
    configure_for_role(engine, role)  # type: ignore[arg-type]
    assert engine.kv_cache_manager.pool.track_cache_events is True
    assert engine.stats_recorder.collect_finished is True


@pytest.mark.parametrize(("role", "spec", "positions"), [
    ("decode", {"method": "ngram", "num_speculative_tokens": 4}, 4),
    ("prefill", {"method": "ngram", "num_speculative_tokens": 4}, 0),  # prefill workers never speculate
    ("decode", None, 0),
])
def test_a_speculating_decode_workers_metrics_list_every_draft_position(role, spec, positions) -> None:
    settings = SimpleNamespace(engine=EngineConfig.from_kwargs(speculative_config=spec),
                               worker=SimpleNamespace(role=role))
    assert speculative_positions(settings) == positions  # type: ignore[arg-type]


@pytest.mark.parametrize(("role", "speculates"), [("prefill", False), ("decode", True)])
def test_only_decode_workers_run_the_speculative_config(role, speculates) -> None:
    spec = {"method": "draft_model", "model": "smollm2", "num_speculative_tokens": 3}
    settings = SimpleNamespace(engine=EngineConfig.from_kwargs(speculative_config=spec, max_num_seqs=8),
                               worker=SimpleNamespace(role=role))
    config = engine_config_for_role(settings)  # type: ignore[arg-type]
    assert (config.scheduler.speculative_config is not None) is speculates
    assert config.scheduler.max_num_seqs == 8  # everything else as given
