"""Tensor parallelism end to end on CPU (gloo, real processes): SmolLM2 split over 2 ranks gives TP=1's tokens;
what it cannot do is refused; a killed rank is a clear error, not a hang; no worker outlives its engine."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from common.config import EngineConfig
from common.engine import LLM, SamplingParams
from common.engine.llm import validate_engine_args
from common.engine.tensor_parallel import EagerForward, TensorParallelError, pack_inputs, unpack_inputs
from kernels.attention_metadata import AttentionMetadata

SHARED = "You are a careful assistant. Answer briefly and truthfully, in one sentence. "
PROMPTS = [
    SHARED + "The capital of France is",
    SHARED + "List three colors:",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
# Small step budget: prompts are prefilled in chunks, mixed with other requests' decodes.
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=64 * 2**20, max_num_batched_tokens=24)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def tp1() -> LLM:
    return LLM("smollm2", **ENGINE)


@pytest.fixture(scope="module")
def tp2():
    llm = LLM("smollm2", tensor_parallel_size=2, **ENGINE)
    pids = llm.engine.tensor_parallel.worker_pids
    yield llm
    llm.close()
    assert all(_gone(pid) for pid in pids), "a tensor-parallel worker outlived close()"


def _tokens(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in out.outputs] for out in llm.generate(prompts, params)]


def test_packed_inputs_round_trip() -> None:
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor([5, 6, 7, 40]), query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),
        seq_lens=torch.tensor([3, 9], dtype=torch.int32),
        block_tables=torch.tensor([[0, 0], [2, 3]], dtype=torch.int32),
        query_lens_cpu=(3, 1), seq_lens_cpu=(3, 9), block_size=16, num_decode_splits=None,
    )
    ids, positions = torch.tensor([11, 12, 13, 14]), torch.tensor([0, 1, 2, 8])
    message = EagerForward(4, 2, 2, (3, 1), (3, 9), 16, None)
    got_ids, got_positions, got = unpack_inputs(pack_inputs(ids, positions, metadata), message)
    assert torch.equal(got_ids, ids) and torch.equal(got_positions, positions)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        assert torch.equal(getattr(got, name), getattr(metadata, name)) and getattr(got, name).dtype == getattr(
            metadata, name).dtype, name


@pytest.mark.parametrize(("settings", "match"), [
    (dict(tensor_parallel_size=0), "at least 1"),
    (dict(tensor_parallel_size=2, speculative_config={"method": "draft_model", "model": "smollm2",
                                                       "num_speculative_tokens": 3}), "draft models"),
])
def test_what_tensor_parallelism_cannot_do_is_refused_up_front(settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_engine_args(EngineConfig.from_kwargs(**settings))


@pytest.mark.timeout(600)
def test_greedy_tokens_equal_tp1_with_chunked_prefill_and_prefix_caching(tp1, tp2) -> None:
    expected = _tokens(tp1, PROMPTS, GREEDY)
    assert _tokens(tp2, PROMPTS, GREEDY) == expected
    again = tp2.generate(PROMPTS[:2], GREEDY)  # the shared prompts again: served from the prefix cache
    assert all(out.num_cached_tokens >= 16 for out in again)
    assert [[list(c.token_ids) for c in out.outputs] for out in again] == expected[:2]


@pytest.mark.timeout(600)
def test_forked_samples_and_prompt_logprobs_equal_tp1(tp1, tp2) -> None:
    """n > 1 shares the prompt's blocks (copy-on-write on every rank); prompt logprobs take extra logits calls."""
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, prompt_logprobs=2)
    want, got = tp1.generate(PROMPTS[2], params)[0], tp2.generate(PROMPTS[2], params)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    for mine, theirs in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert mine.keys() == theirs.keys()
        for token, entry in mine.items():
            assert entry.logprob == pytest.approx(theirs[token].logprob, abs=1e-4)


def test_kv_export_is_refused(tp2) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        tp2.engine.add_request(prompt="hello", sampling_params=GREEDY, export_kv=True)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        tp2.engine.reserve_blocks("r1", 16)


@pytest.mark.timeout(300)
def test_a_killed_rank_fails_the_engine_clearly_and_quickly() -> None:
    llm = LLM("smollm2", tensor_parallel_size=2, **ENGINE)
    (pid,) = llm.engine.tensor_parallel.worker_pids
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(2.0, kill)
    timer.start()
    try:
        with pytest.raises(TensorParallelError, match=rf"rank 1 \(pid {pid}\) was killed by signal 9"):
            llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True))
        assert killed_at and time.monotonic() - killed_at[0] < 30
        with pytest.raises(TensorParallelError):  # and it stays failed
            llm.generate(PROMPTS[0], GREEDY)
    finally:
        timer.cancel()
        llm.close()
    assert _gone(pid)


@pytest.mark.timeout(600)
def test_ngram_speculation_keeps_tp1s_greedy_tokens(tp1) -> None:
    """Verification steps (several rows per sequence, drafts checked against rank 0's gathered logits)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "adaptive": False}
    llm = LLM("smollm2", tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    try:
        prompts = ["The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat", PROMPTS[3]]
        assert _tokens(llm, prompts, GREEDY) == _tokens(tp1, prompts, GREEDY)
        assert llm.engine.stats_recorder.speculation.accepted_tokens > 0
    finally:
        llm.close()
