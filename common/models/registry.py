"""Choose and build the model class for an HF config's architecture."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from common.distributed.group import TensorParallelGroup
from common.models.llama import LlamaForCausalLM, LlamaVariant

logger = logging.getLogger(__name__)


def _llama_variant(hf_config: Any) -> LlamaVariant:
    bias = bool(getattr(hf_config, "attention_bias", False))
    return LlamaVariant(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))


def _qwen2_variant(hf_config: Any) -> LlamaVariant:
    return LlamaVariant(qkv_bias=True)  # Qwen2 always has q/k/v bias and never an o_proj bias


def _qwen3_variant(hf_config: Any) -> LlamaVariant:
    bias = bool(getattr(hf_config, "attention_bias", False))
    return LlamaVariant(qkv_bias=bias, o_bias=bias, qk_norm=True)


ARCHITECTURES: dict[str, Callable[[Any], LlamaVariant]] = {
    "LlamaForCausalLM": _llama_variant,
    "MistralForCausalLM": _llama_variant,
    "Qwen2ForCausalLM": _qwen2_variant,
    "Qwen3ForCausalLM": _qwen3_variant,
}


# For configs made in code (e.g. benchmark shapes) that never got an `architectures` list.
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def architecture_of(hf_config: Any) -> str | None:
    """``architectures[0]``, or the class implied by ``model_type`` when the list is empty/missing."""
    architectures = getattr(hf_config, "architectures", None)
    if architectures:
        return architectures[0]
    return _BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Scoped ``torch.set_default_dtype``: the previous default is restored even on error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _warn_unsupported(hf_config: Any) -> None:
    """Features we do not implement yet but that only matter for long contexts."""
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", True)
    if window and uses_window and window < getattr(hf_config, "max_position_embeddings", 0):
        logger.warning("sliding_window=%d is ignored: attention is full; outputs differ past it", window)


def build_model(
    hf_config: Any, dtype: torch.dtype, device: torch.device, tp: TensorParallelGroup | None = None
) -> nn.Module:
    """Build the (randomly initialized) model for ``hf_config.architectures[0]`` on ``device`` in ``dtype``
    (with ``tp``: this rank's shard of it).

    Parameters are created directly on the device; no global torch state is changed afterwards.
    Raises ValueError naming the architecture when it is not supported.
    """
    arch = architecture_of(hf_config)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported model architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    _warn_unsupported(hf_config)
    variant = ARCHITECTURES[arch](hf_config)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(hf_config, variant, tp)
    shard = f" (tensor-parallel rank {tp.rank} of {tp.world_size})" if tp is not None else ""
    logger.info("built %s (%s) on %s in %s%s", arch, variant, device, dtype, shard)
    return model.eval()
