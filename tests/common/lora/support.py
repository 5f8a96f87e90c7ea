"""Tiny random Llama + PEFT LoRA adapters saved the way users get them (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(**TINY_LLAMA)


def tiny_llama() -> LlamaForCausalLM:
    """The same random base weights on every call."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def save_peft_adapter(folder: Path, seed: int = 1, **lora_config) -> tuple[Path, torch.nn.Module]:
    """A PEFT LoRA over ``tiny_llama()`` with random A and B (PEFT starts B at zero, which would test nothing)."""
    model = get_peft_model(tiny_llama(), LoraConfig(lora_dropout=0.0, **lora_config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
    model.save_pretrained(folder)
    return folder, model.eval()
