"""The offline workloads and model shapes every GPU benchmark shares (ours, HF transformers, vLLM).

W1: 256 requests, 256 prompt tokens, 256 output tokens. W2: 1000 requests, prompt lengths uniform in
[128, 2048], output lengths uniform in [64, 512]. EOS is ignored everywhere; prompts are random token ids
drawn with a fixed seed, so every engine sees the same tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Llama-3.1-8B's shape (random weights); SmolLM2-135M's shape for the small model.
SHAPES: dict[str, dict] = {
    "llama8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def write_shape_config(shape: str, folder: str | None = None) -> Path:
    """A config.json (Llama architecture, bf16) for ``shape`` in a new folder; weights are drawn at load."""
    path = Path(folder or tempfile.mkdtemp(prefix=f"tandem-{shape}-"))
    path.mkdir(parents=True, exist_ok=True)
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        torch_dtype="bfloat16",
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        **SHAPES[shape],
    )
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def random_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab_size - 100, size=n).tolist() for n in lengths]


def workload(name: str, vocab_size: int, seed: int = 0) -> Workload:
    """W1, W2, or ``prefill`` (64 x 2048 prompt tokens, 1 output token)."""
    rng = np.random.default_rng(seed)
    if name == "W1":
        prompt_lens, output_lens = [256] * 256, [256] * 256
    elif name == "W2":
        prompt_lens = rng.integers(128, 2048, size=1000, endpoint=True).tolist()
        output_lens = rng.integers(64, 512, size=1000, endpoint=True).tolist()
    elif name == "prefill":
        prompt_lens, output_lens = [2048] * 64, [1] * 64
    elif name == "preempt":  # 1,000 concurrent requests of 1,000 tokens (900 prompt + 100 output)
        prompt_lens, output_lens = [900] * 1000, [100] * 1000
    else:
        raise ValueError(f"unknown workload {name!r}")
    return Workload(name, random_prompts(prompt_lens, vocab_size, seed + 1), output_lens)


def decode_ms_per_token(
    generate_one: Callable[[list[int], int], None], vocab_size: int, context: int, new_tokens: int = 128
) -> float:
    """Batch-1 decode: (time for prompt + N tokens - time for prompt + 1 token) / (N - 1), fresh prompts each
    time. ``generate_one(prompt_ids, max_tokens)`` runs one greedy request to completion on the engine."""

    def timed(max_tokens: int, seed: int) -> float:
        prompt = random_prompts([context], vocab_size, seed)[0]
        started = time.perf_counter()
        generate_one(prompt, max_tokens)
        return time.perf_counter() - started

    timed(new_tokens, seed=100 + context)  # warm-up at this context length
    one = min(timed(1, seed=200 + context + i) for i in range(3))
    many = min(timed(new_tokens, seed=300 + context + i) for i in range(2))
    return (many - one) / (new_tokens - 1) * 1e3
