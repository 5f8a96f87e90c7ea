"""Writing one step's K/V into the paged KV cache.

Cache layout (per layer, per K or V): ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A slot is ``block_id * block_size + offset``; slot -1 marks padding and is never written.

An FP8 (e4m3) cache holds ``clamp(x / scale, -448, 448)`` with one float scale per layer for K and one for V
(vLLM's per-tensor ``k_scale`` / ``v_scale``); readers multiply by the scale. Other cache dtypes ignore the scales.
"""

from __future__ import annotations

import torch

from kernels.fp8 import FP8_DTYPE, FP8_MAX
from kernels.triton_import import HAS_TRITON, tl, triton


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``clamp(x / scale, +-448)`` as e4m3, computed in float32 (the write path of an FP8 cache)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def check_kv_dtype(incoming: torch.dtype, cache_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` when KV of dtype ``incoming`` cannot be cast into a cache of ``cache_dtype``: an FP8
    side means scaled values, which a plain cast would misread (the pools' --kv-cache-dtype differ)."""
    if incoming != cache_dtype and FP8_DTYPE in (incoming, cache_dtype):
        raise ValueError(
            f"KV cache dtype mismatch: the transfer carries {incoming} but this worker's cache is {cache_dtype}; "
            "the prefill and decode pools must run the same --kv-cache-dtype"
        )


def index_copy_blocks(cache: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor) -> None:
    """``cache[:, :, block_ids] = kv`` (dim 2 = blocks) for any cache dtype: torch has no float8 ``index_copy_``,
    so an FP8 cache copies its bytes (``kv`` must already hold the cache's dtype then)."""
    if cache.dtype == FP8_DTYPE:
        cache, kv = cache.view(torch.uint8), kv.view(torch.uint8)
    cache.index_copy_(2, block_ids, kv)


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``x`` as the cache stores it: quantized with ``scale`` for an FP8 cache, else a plain cast."""
    return quantize_kv(x, scale) if cache_dtype == FP8_DTYPE else x.to(cache_dtype)


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Plain-torch reference: ``k_cache[slot] = k[i]`` and ``v_cache[slot] = v[i]`` for each slot >= 0.

    ``k``/``v`` are ``[num_tokens, num_kv_heads, head_dim]``; values are cast to the cache dtype (an FP8 cache
    gets ``quantize_kv(k, k_scale)`` / ``quantize_kv(v, v_scale)``).
    The caches are written in place, so they must be viewable as flat ``[slots, heads, dim]``.
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    # .view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy.
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat[slots] = to_cache_dtype(k[valid], k_cache.dtype, k_scale)
    v_flat[slots] = to_cache_dtype(v[valid], v_cache.dtype, v_scale)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write this step's K/V into their slots (skipping slot -1): the Triton kernel on CUDA, else the reference.

    Invariant: after the call, every slot ``s = slot_mapping[i] >= 0`` holds ``k[i]``/``v[i]`` (quantized with
    the scales for an FP8 cache); no other slot changes.
    """
    if k.is_cuda and HAS_TRITON:
        with torch.cuda.device(k.device):  # Triton launches on the current device
            write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Same contract as ``write_kv_reference`` in one launch (one program per token, all its heads).

    Any strides (``k``/``v`` may be views into a fused qkv output; the caches views of a bigger tensor);
    addresses are int64, so caches past 2**31 elements are fine. CUDA-graph capturable.
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    heads_pad, dim_pad = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        k_cache.shape[1], k_scale, v_scale,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEADS_PAD=heads_pad, DIM_PAD=dim_pad,
        QUANTIZE=k_cache.dtype == FP8_DTYPE, FP8_MAX=FP8_MAX,
        num_warps=4 if heads_pad * dim_pad >= 1024 else 1,
    )  # fmt: skip


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    block_size, k_scale, v_scale,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):  # fmt: skip
    """Program = one token: copy its ``[NUM_HEADS, HEAD_DIM]`` K and V into the slot, cast to the cache dtype
    (QUANTIZE: divided by the scale and clamped to the e4m3 range first, in float32)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    if QUANTIZE:
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -FP8_MAX), FP8_MAX)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims * stride_kcd
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
