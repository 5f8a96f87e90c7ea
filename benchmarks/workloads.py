"""The workloads and model shapes every benchmark shares: offline (ours, HF transformers, vLLM) and online
(benchmarks/serve.py, benchmarks/pd_goodput.py).

Offline: W1: 256 requests, 256 prompt tokens, 256 output tokens. W2: 1000 requests, prompt lengths uniform in
[128, 2048], output lengths uniform in [64, 512]. EOS is ignored everywhere; prompts are random token ids
drawn with a fixed seed, so every engine sees the same tokens.

Online (SERVING_WORKLOADS, issue 11): S1: prompts uniform in [1024, 3072] tokens, outputs uniform in [128, 384],
max-model-len 4096, SLO TTFT <= 500 ms and TPOT <= 20 ms. S2: prompts uniform in [6144, 10240], outputs uniform in
[128, 384], max-model-len 12288, SLO TTFT <= 2000 ms and TPOT <= 15 ms. Both: Poisson arrivals, EOS ignored.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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


def write_shape_config(shape: str, folder: str | None = None, vocab_size: int | None = None) -> Path:
    """A config.json (Llama architecture, bf16) for ``shape`` in a new folder; weights are drawn at load.
    ``vocab_size`` replaces the shape's (to match a tokenizer copied next to it)."""
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
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
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
    return decode_ms_per_step(lambda prompts, n: generate_one(prompts[0], n), vocab_size, context, 1, new_tokens)


def decode_ms_per_step(
    generate: Callable[[list[list[int]], int], None], vocab_size: int, context: int, batch: int, new_tokens: int = 128
) -> float:
    """One decode step at ``batch`` streams of ``context`` prompt tokens: (time for batch x (prompt + N tokens) -
    time for batch x (prompt + 1 token)) / (N - 1), fresh prompts each time (no prefix-cache hits).
    ``generate(prompts, max_tokens)`` runs the greedy requests together to completion on the engine."""

    def timed(max_tokens: int, seed: int) -> float:
        prompts = random_prompts([context] * batch, vocab_size, seed)
        started = time.perf_counter()
        generate(prompts, max_tokens)
        return time.perf_counter() - started

    timed(new_tokens, seed=100 + context)  # warm-up at this context length
    one = min(timed(1, seed=200 + context + i) for i in range(3))
    many = min(timed(new_tokens, seed=300 + context + i) for i in range(2))
    return (many - one) / (new_tokens - 1) * 1e3


# ---------------------------------------------------------------------------------------------------- online


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """serve.py's --range-ratio: lengths uniform in [floor(L*(1-r)), ceil(L*(1+r))], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--range-ratio must be in [0, 1)")
    low = max(1, math.floor(length * (1.0 - range_ratio)))
    return low, max(low, math.ceil(length * (1.0 + range_ratio)))


@dataclass(frozen=True)
class ServingWorkload:
    """An online workload for benchmarks/serve.py: lengths as --input-len/--output-len with their range ratios
    (see length_bounds), EOS ignored, Poisson arrivals; `slo_ms` maps serve.py's SLO names (ttft, tpot) to ms;
    `duration_s` per swept rate (prompts = rate x duration); `rates` the default sweep in req/s.
    Invariant: max_model_len holds the longest prompt plus the longest output."""

    name: str
    input_len: int
    input_range_ratio: float
    output_len: int
    output_range_ratio: float
    max_model_len: int
    slo_ms: Mapping[str, float] = field(default_factory=dict)
    duration_s: float = 30.0
    rates: tuple[float, ...] = ()

    @property
    def input_bounds(self) -> tuple[int, int]:
        return length_bounds(self.input_len, self.input_range_ratio)

    @property
    def output_bounds(self) -> tuple[int, int]:
        return length_bounds(self.output_len, self.output_range_ratio)

    def scaled(self, factor: float) -> ServingWorkload:
        """Lengths times `factor` (toy runs), max-model-len shrunk with them but still holding the longest
        request (+ 8 tokens for a BOS or template); SLOs, duration and rates unchanged."""
        if factor == 1.0:
            return self
        input_len = max(1, round(self.input_len * factor))
        output_len = max(2, round(self.output_len * factor))
        shrunk = replace(self, input_len=input_len, output_len=output_len)
        longest = shrunk.input_bounds[1] + shrunk.output_bounds[1] + 8
        return replace(shrunk, max_model_len=max(longest, math.ceil(self.max_model_len * factor)))


SERVING_WORKLOADS: dict[str, ServingWorkload] = {
    "S1": ServingWorkload("S1", 2048, 0.5, 256, 0.5, 4096, {"ttft": 500.0, "tpot": 20.0}, 30.0,
                          (8.0, 12.0, 16.0, 20.0, 24.0)),
    "S2": ServingWorkload("S2", 8192, 0.25, 256, 0.5, 12288, {"ttft": 2000.0, "tpot": 15.0}, 20.0,
                          (2.0, 3.0, 4.0, 5.0, 6.0)),
}

TOKENIZER_SKIP = ("config.json", ".safetensors", ".bin", ".gguf", ".pt")


def shape_model_folder(shape: str, tokenizer_folder: Path, folder: str | None = None) -> Path:
    """A model folder for ``--load-format dummy``: ``shape``'s config with the vocabulary of the tokenizer in
    `tokenizer_folder` (an HF folder, e.g. SmolLM2's as common/models/loader.py resolve_model_path converts it),
    whose tokenizer files (everything but config and weights) are copied beside it."""
    vocab = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    path = write_shape_config(shape, folder, vocab_size=vocab)
    for item in tokenizer_folder.iterdir():
        if item.is_file() and not item.name.endswith(TOKENIZER_SKIP):
            shutil.copy2(item, path / item.name)
    return path
