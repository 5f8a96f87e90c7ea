"""Tensor parallelism end to end on CPU (gloo, real processes): SmolLM2 split over 2 ranks gives TP=1's tokens;
its KV export/import moves exactly what TP=1 would (gathered from and scattered to the ranks); what it cannot do
is refused; a killed rank is a clear error, not a hang; no worker outlives its engine."""

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


def _export(llm: LLM, prompt_ids: list[int]) -> tuple[torch.Tensor, int]:
    """A prefill worker's request: the prompt's KV (whole-model layout) and its first greedy token."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=1)
    request_id = engine.add_request(prompt_token_ids=prompt_ids, sampling_params=params, export_kv=True)
    return _finished(engine, request_id, lambda out: (out.exported_kv, out.outputs[0].token_ids[0]))


def _decode_imported(llm: LLM, prompt_ids: list[int], kv: torch.Tensor, first: int, max_tokens: int) -> list[int]:
    """A decode worker's request: reserve, import ``kv``, decode greedily from the prefill's first token."""
    engine = llm.engine
    engine.reserve_blocks("reservation", len(prompt_ids))
    engine.import_kv("reservation", kv)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request_id = engine.add_prefilled_request("reservation", prompt_ids, [first], params)
    return _finished(engine, request_id, lambda out: list(out.outputs[0].token_ids))


def _finished(engine, request_id: str, take):
    while engine.has_unfinished_requests():
        for output in engine.step() + engine.finish_in_flight():
            if output.request_id == request_id and output.finished:
                result = take(output)
    return result


def _assert_write_then_read_is_the_identity(llm: LLM) -> None:
    """Scatter then gather of whole-model KV through the ranks, blocks in a scrambled order: bit for bit."""
    engine = llm.engine
    block_ids = engine.reserve_blocks("round-trip", 3 * engine.config.cache.block_size)[::-1]
    try:
        blocks = engine.kv_transfer.blocks
        shape = blocks.shape[:2] + (len(block_ids),) + blocks.shape[3:]
        kv = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        blocks.write(block_ids, kv)
        assert torch.equal(blocks.read(block_ids), kv)
        assert torch.equal(blocks.read(block_ids[1:]), kv[:, :, 1:])
    finally:
        engine.release_reservation("round-trip")


def test_sharded_kv_blocks_write_then_read_is_the_identity(tp2) -> None:
    _assert_write_then_read_is_the_identity(tp2)


@pytest.mark.timeout(600)
def test_replicated_kv_heads_travel_once_and_reach_every_replica(tmp_path) -> None:
    """4 ranks over 2 KV heads: each head lives on two ranks; export equals TP=1's, import decodes TP=1's tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny = dict(dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_memory=4 * 2**20)
    prompt_ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    single, sharded = LLM(str(tmp_path), **tiny), LLM(str(tmp_path), tensor_parallel_size=4, **tiny)
    try:
        expected = single.generate({"prompt_token_ids": prompt_ids}, GREEDY)[0].outputs[0].token_ids
        want_kv, want_first = _export(single, prompt_ids)
        got_kv, got_first = _export(sharded, prompt_ids)
        assert got_first == want_first == expected[0]
        got, want = _tokens_kv(got_kv, len(prompt_ids)), _tokens_kv(want_kv, len(prompt_ids))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert _decode_imported(sharded, prompt_ids, want_kv, want_first, len(expected)) == list(expected)
        _assert_write_then_read_is_the_identity(sharded)
    finally:
        sharded.close()


def _tokens_kv(kv: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The KV of the first ``num_tokens`` positions (the last block's unused slots hold whatever was there)."""
    return kv.flatten(2, 3)[:, :, :num_tokens]


def _prompt_ids(llm: LLM, prompt: str) -> list[int]:
    return llm.engine.validate_prompt(prompt, None, GREEDY)


@pytest.mark.timeout(600)
def test_kv_export_gathers_tp1s_exact_bytes_and_import_scatters_them_for_tp1s_tokens(tp1, tp2) -> None:
    """SmolLM2's 3 KV heads split unevenly (2 + 1): the handoff still moves exactly what TP=1 would, both ways."""
    prompt_ids = _prompt_ids(tp1, PROMPTS[0])  # 29 tokens: two blocks, the last one partial
    want_kv, want_first = _export(tp1, prompt_ids)
    got_kv, got_first = _export(tp2, prompt_ids)
    assert got_kv.shape == want_kv.shape and got_kv.shape[4] == 3
    # Layer 0's K/V come from the same rows of the same weights: bit for bit. Later layers' inputs went through
    # an all-reduce of partial sums (another summation order), so they agree to float32 rounding only.
    got, want = _tokens_kv(got_kv, len(prompt_ids)), _tokens_kv(want_kv, len(prompt_ids))
    assert torch.equal(got[0], want[0]) and got_first == want_first
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    expected = _tokens(tp1, [PROMPTS[0]], GREEDY)[0][0]
    assert expected[0] == want_first
    assert _decode_imported(tp2, prompt_ids, want_kv, want_first, len(expected)) == expected  # TP 1 -> TP 2
    assert _decode_imported(tp1, prompt_ids, got_kv, got_first, len(expected)) == expected  # TP 2 -> TP 1
    assert tp2.engine.kv_cache.shape[4] == 2  # rank 0 really holds only its heads


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
