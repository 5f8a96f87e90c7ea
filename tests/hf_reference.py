"""HF transformers as the reference for engine outputs (greedy tokens and their logprobs)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load_hf_model(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation with HF's own KV cache, ignoring EOS; also each step's log-softmax row."""
    input_ids = torch.tensor([prompt_ids])
    out = model(input_ids=input_ids, use_cache=True)
    tokens, logprob_rows = [], []
    for _ in range(num_tokens):
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        token = int(torch.argmax(logprobs))
        tokens.append(token)
        logprob_rows.append(logprobs)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprob_rows
