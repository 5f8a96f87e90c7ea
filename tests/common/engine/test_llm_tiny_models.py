"""Engine greedy output equals HF on tiny random-weight Llama and Qwen2 checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from common.engine import LLM, SamplingParams
from tests.hf_reference import hf_greedy, load_hf_model

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def llama_checkpoint(path):
    config = LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return LlamaForCausalLM(config), path


def qwen2_checkpoint(path):
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)), path


@pytest.mark.parametrize("make", [llama_checkpoint, qwen2_checkpoint], ids=["llama3", "qwen2"])
def test_tiny_model_greedy_equals_hf(tmp_path, make):
    torch.manual_seed(0)
    model, path = make(tmp_path)
    model.save_pretrained(path)
    hf = load_hf_model(path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (length,), generator=generator).tolist() for length in (5, 17, 33, 64)]
    llm = LLM(str(path), device="cpu", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=40)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens, rows = hf_greedy(hf, prompt, 24)
        assert output.outputs[0].token_ids == tokens
        for entry, row in zip(output.outputs[0].logprobs, rows, strict=True):
            for token_id, logprob in entry.items():
                assert abs(logprob.logprob - float(row[token_id])) < 1e-3
