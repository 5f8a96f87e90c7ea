"""Writing one step's K/V into the paged KV cache.

Cache layout (per layer, per K or V): ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A slot is ``block_id * block_size + offset``; slot -1 marks padding and is never written.
"""

from __future__ import annotations

import torch


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain-torch reference: ``k_cache[slot] = k[i]`` and ``v_cache[slot] = v[i]`` for each slot >= 0.

    ``k``/``v`` are ``[num_tokens, num_kv_heads, head_dim]``; values are cast to the cache dtype.
    The caches are written in place, so they must be viewable as flat ``[slots, heads, dim]``.
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    # .view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy.
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat[slots] = k[valid].to(k_cache.dtype)
    v_flat[slots] = v[valid].to(v_cache.dtype)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's K/V into their slots (skipping slot -1); dispatches to the best implementation.

    Invariant: after the call, every slot ``s = slot_mapping[i] >= 0`` holds ``k[i]``/``v[i]``;
    no other slot changes.
    """
    # A Triton kernel for CUDA tensors goes here (chosen by k.is_cuda); until then, the reference.
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
