"""KV cache dtype and sizing: an FP8 (e4m3) cache holds twice the blocks of the same byte budget, and the engine
over it stays close to the model-dtype engine."""

from __future__ import annotations

import pytest
import torch

from common.engine import LLM, SamplingParams
from common.engine.kv_cache_sizing import resolve_kv_cache_dtype
from kernels.fp8 import FP8_DTYPE

BUDGET = 64 * 2**20
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# The first tokens of the continuation must match exactly (the model's choices there have wide margins); past a
# near-tie an e4m3 rounding may pick the other token, after which the texts legitimately diverge.
MIN_MATCHING_PREFIX = 4


@pytest.fixture(scope="module")
def engines() -> dict[str, LLM]:
    # bfloat16 model, as on a GPU: the FP8 cache halves a 2-byte element.
    return {
        dtype: LLM("smollm2", dtype="bfloat16", device="cpu", kv_cache_memory=BUDGET, kv_cache_dtype=dtype)
        for dtype in ("auto", "fp8")
    }


def test_resolve_kv_cache_dtype():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == FP8_DTYPE
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float32) == FP8_DTYPE
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        resolve_kv_cache_dtype("int4", torch.bfloat16)


def test_fp8_cache_holds_twice_the_blocks_of_the_same_budget(engines):
    auto, fp8 = engines["auto"].engine, engines["fp8"].engine
    assert auto.kv_cache.dtype == torch.bfloat16 and fp8.kv_cache.dtype == FP8_DTYPE
    assert fp8.memory.num_kv_blocks == 2 * auto.memory.num_kv_blocks
    assert fp8.memory.kv_cache_bytes == auto.memory.kv_cache_bytes <= BUDGET


def test_fp8_cache_greedy_output_matches_the_model_dtype_cache(engines):
    """Greedy continuations over the FP8 cache vs the bf16 cache: the first MIN_MATCHING_PREFIX tokens are
    identical for every prompt (and "The capital of France is" continues with " Paris"); the count of matching
    leading tokens per prompt is printed for the report."""
    tokenizer = engines["auto"].get_tokenizer()
    outputs = {dtype: llm.generate(PROMPTS, GREEDY) for dtype, llm in engines.items()}
    for prompt, auto, fp8 in zip(PROMPTS, outputs["auto"], outputs["fp8"], strict=True):
        want, got = auto.outputs[0].token_ids, fp8.outputs[0].token_ids
        matching = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        print(f"{prompt!r}: {matching}/{len(want)} leading tokens match")
        assert matching >= MIN_MATCHING_PREFIX, (prompt, tokenizer.decode(want), tokenizer.decode(got))
    assert outputs["fp8"][0].outputs[0].text.startswith(" Paris")


def test_unknown_kv_cache_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("smollm2", device="cpu", kv_cache_memory=BUDGET, kv_cache_dtype="int4")
