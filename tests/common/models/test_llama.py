"""Our Llama-family model vs HF transformers (eager, fp32) on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from common.models.loader import iterate_safetensors, load_model
from kernels.fp8 import FP8_DTYPE, FP8_MAX

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}
CONFIGS = {
    "llama3": lambda: LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE),
    "llama-tied": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama-mha-bias": lambda: LlamaConfig(**{**TINY, "num_key_value_heads": 4}, attention_bias=True),
    "mistral": lambda: MistralConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
}
# Two sequences interleaved: fresh prefills, chunks over a cached prefix, and decodes in one batch.
MIXED_SCHEDULE = [
    [("a", 13), ("b", 9)],
    [("b", 1), ("a", 10)],
    [("a", 1), ("b", 6)],
    [("a", 1)],
    [("b", 1), ("a", 7)],
    [("a", 8), ("b", 8)],
]


@pytest.fixture(params=sorted(CONFIGS))
def checkpoint(request, tmp_path):
    """An HF model with every weight (biases and norms included) randomized, saved to tmp_path."""
    config = CONFIGS[request.param]()
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf.save_pretrained(tmp_path)
    return tmp_path, hf


def ours(path):
    return load_model(path, AutoConfig.from_pretrained(path), torch.float32, torch.device("cpu"), "auto")


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_single_prefill_matches_hf(checkpoint, paged_runner):
    path, hf = checkpoint
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    (logits,) = paged_runner(ours(path), num_blocks=32, block_size=4).step([("a", tokens)])
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_chunked_and_decode_batches_match_hf(checkpoint, paged_runner):
    path, hf = checkpoint
    gen = torch.Generator().manual_seed(2)
    prompts = {s: torch.randint(0, 256, (40,), generator=gen).tolist() for s in "ab"}
    runner = paged_runner(ours(path), num_blocks=64, block_size=4, seed=3)
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for step in MIXED_SCHEDULE:
        chunks = [(s, prompts[s][runner.computed.get(s, 0) :][:n]) for s, n in step]
        for (s, _), logits in zip(chunks, runner.step(chunks)):
            got[s].append(logits)
    for s, pieces in got.items():
        logits = torch.cat(pieces)
        torch.testing.assert_close(logits, hf_logits(hf, prompts[s])[: len(logits)], atol=1e-4, rtol=1e-4)


def test_model_attributes(checkpoint):
    path, hf = checkpoint
    model = ours(path)
    assert model.num_layers == 2
    assert model.num_kv_heads == hf.config.num_key_value_heads
    assert model.head_dim == (getattr(hf.config, "head_dim", None) or 16)
    if hf.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bfloat16_runs_and_stays_close(checkpoint, paged_runner):
    """Low precision path (bf16 weights and cache, fp32 softmax/norms): same argmax-level behaviour."""
    path, hf = checkpoint
    tokens = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    model = load_model(path, AutoConfig.from_pretrained(path), torch.bfloat16, torch.device("cpu"), "auto")
    runner = paged_runner(model, num_blocks=32, block_size=4)
    logits = torch.cat([*runner.step([("a", tokens[:20])]), *runner.step([("a", tokens[20:])])])
    assert logits.dtype == torch.float32 and runner.kv_cache.dtype == torch.bfloat16
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=0.1, rtol=0.05)


def test_kv_scales_load_from_the_checkpoint(checkpoint):
    """vLLM's checkpoint names for FP8 KV scales set each layer's k_scale / v_scale (a vector: its max);
    layers without them keep 1.0."""
    path, _ = checkpoint
    model = load_model(path, AutoConfig.from_pretrained(path), torch.float32, torch.device("cpu"), "auto")
    scales = [
        ("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
        ("model.layers.0.self_attn.v_proj.v_scale", torch.tensor([0.25, 0.75])),
        ("model.layers.1.self_attn.kv_scale", torch.tensor(2.0)),
    ]
    model.load_weights([*iterate_safetensors(path), *scales])
    attns = [layer.self_attn.attn for layer in model.model.layers]
    assert [(a.k_scale, a.v_scale) for a in attns] == [(0.5, 0.75), (2.0, 2.0)]
    with pytest.raises(ValueError, match="must be positive"):
        model.load_weights([*iterate_safetensors(path), ("model.layers.0.self_attn.k_scale", torch.tensor(0.0))])


# Relative L2 error of the logits vs HF with an e4m3 cache: measured 3.8-4.8% over these tiny random models (each
# attention output carries ~3% from e4m3's 3 mantissa bits, see tests/kernels; random weights pass it on).
FP8_LOGITS_REL_ERROR = 0.08


def test_fp8_kv_cache_stays_close_to_hf(checkpoint, paged_runner):
    """The model over an e4m3 cache (reference attention, dequantized on read) through prefill, decode and chunk
    steps, with per-layer scales calibrated as a checkpoint's are (amax / 448 of a float32 run's K and V): the
    float32 logits stay within FP8_LOGITS_REL_ERROR of HF's, and a NaN-poisoned slot read anywhere would show."""
    path, hf = checkpoint
    model = ours(path)
    tokens = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    steps = [[("a", tokens[:20])], [("a", tokens[20:21])], [("a", tokens[21:])]]
    calibration = paged_runner(model, num_blocks=32, block_size=4)
    for step in steps:
        calibration.step(step)
    amax = calibration.kv_cache.nan_to_num(0.0).abs().amax(dim=(2, 3, 4, 5))  # [layers, 2]
    for layer, (k_amax, v_amax) in zip(model.model.layers, amax.tolist()):
        layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale = k_amax / FP8_MAX, v_amax / FP8_MAX
    runner = paged_runner(model, num_blocks=32, block_size=4)
    runner.kv_cache = runner.kv_cache.to(FP8_DTYPE)
    logits = torch.cat([chunk for step in steps for chunk in runner.step(step)])
    assert runner.kv_cache.dtype == FP8_DTYPE
    expected = hf_logits(hf, tokens).double()
    err = ((logits.double() - expected).norm() / expected.norm()).item()
    assert err < FP8_LOGITS_REL_ERROR, f"relative L2 error of the logits {err:.3g}"
