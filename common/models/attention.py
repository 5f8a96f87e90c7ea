"""The glue between a model's attention projections and the paged KV cache kernels."""

from __future__ import annotations

import torch
from torch import nn

from kernels.attention_metadata import AttentionMetadata
from kernels.kv_cache import write_kv
from kernels.paged_attention import paged_attention


class PagedAttention(nn.Module):
    """Stores this step's K/V in one layer's cache, then attends over each sequence's cached context.

    Holds no weights. ``kv_cache`` is this layer's slice ``[2, num_blocks, block_size, num_kv_heads,
    head_dim]``; index 0 is K, 1 is V. An FP8 cache stores K / ``k_scale`` and V / ``v_scale`` (per-tensor
    scales, vLLM's semantics: the checkpoint's when it has them, else 1.0); other caches ignore them. The
    scales are Python floats, set once at load time, so CUDA graphs capture them as kernel arguments.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (rope already applied) -> ``[T, Hq * D]``."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_kv(k, v, k_cache, v_cache, attn_metadata.slot_mapping, self.k_scale, self.v_scale)
        out = paged_attention(q, k_cache, v_cache, attn_metadata, self.scale, self.k_scale, self.v_scale)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
