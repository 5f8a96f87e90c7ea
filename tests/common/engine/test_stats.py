"""Engine stats: the snapshot's gauges and counters, prefill vs decode token counts, per-request phase timings."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.engine import LLM, SamplingParams
from common.engine.model_runner import RunnerOutput
from common.engine.request import RequestStatus
from common.engine.stats import EngineStats, EngineStatsRecorder
from tests.common.engine.test_llm_tiny_models import COMMON
from tests.common.engine.test_scheduler import make_request, make_scheduler


def fake_step(scheduler, recorder: EngineStatsRecorder, token: int = 7):
    """One scheduled step with a sampled token for each request whose sequence completes."""
    out = scheduler.schedule()
    scheduler.on_step_done(out)
    sampled = {}
    for item in out.scheduled:
        if item.completes_sequence:
            item.request.append_output_token(token, None)
            sampled[item.request.request_id] = [(token, None)]
    recorder.on_step(out, RunnerOutput(sampled=sampled), started=0.0)
    return out


def test_recorder_splits_prefill_and_decode_tokens_and_times_phases():
    scheduler, recorder = make_scheduler(32, budget=8), EngineStatsRecorder()
    recorder.collect_finished = True
    request = make_request("a", list(range(10)))
    scheduler.add_request(request)
    fake_step(scheduler, recorder)  # first chunk: 8 prompt tokens, nothing sampled
    assert (recorder.prefill_tokens, recorder.generation_tokens) == (8, 0)
    fake_step(scheduler, recorder)  # last 2 prompt tokens, first token sampled
    fake_step(scheduler, recorder)  # one decode step
    assert (recorder.prefill_tokens, recorder.generation_tokens) == (10, 2)
    scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
    recorder.on_finish(request)
    (record,) = recorder.take_finished()
    assert record.finish_reason == "length" and record.num_output_tokens == 2 and record.num_prompt_tokens == 10
    assert record.prefill_s is not None and record.decode_s is not None and record.queue_s >= 0.0
    assert recorder.take_finished() == []


def test_recorder_keeps_no_records_unless_asked_and_times_requests_aborted_in_the_queue():
    recorder = EngineStatsRecorder()
    request = make_request("q", [1, 2, 3])
    request.status = RequestStatus.FINISHED_ABORTED
    recorder.on_finish(request)
    assert recorder.take_finished() == []
    recorder.collect_finished = True
    recorder.on_finish(request)
    (record,) = recorder.take_finished()
    assert record.finish_reason == "abort" and record.prefill_s is None and record.decode_s is None


def test_kv_cache_usage_fraction():
    assert EngineStats(total_blocks=10, free_blocks=4, running=1, waiting=0, num_requests=1).kv_cache_usage == 0.6
    assert EngineStats(0, 0, 0, 0, 0).kv_cache_usage == 0.0


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(**COMMON)
    LlamaForCausalLM(config).save_pretrained(path)
    return LLM(
        str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64, block_size=16
    )


def test_engine_snapshot_counts_tokens_prefix_hits_and_finishes(tiny_llm):
    engine = tiny_llm.engine
    engine.stats_recorder.collect_finished = True
    before = engine.stats()
    prompt = list(range(1, 41))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    tiny_llm.generate([prompt], params)
    tiny_llm.generate([prompt], params)  # the second run hits the first's two full cached blocks
    after = engine.stats()
    assert after.generation_tokens - before.generation_tokens == 10
    assert after.prefill_tokens - before.prefill_tokens == 40 + (40 - 32)
    assert after.prefix_cache_hits - before.prefix_cache_hits == 32
    assert after.prefix_cache_queries - before.prefix_cache_queries == 80
    assert (after.running, after.waiting, after.num_requests, after.free_blocks) == (0, 0, 0, after.total_blocks)
    records = engine.stats_recorder.take_finished()
    assert [r.finish_reason for r in records] == ["length", "length"]
    assert all(r.num_output_tokens == 5 and r.prefill_s > 0 and r.decode_s > 0 for r in records)
