"""Rotary position embedding applied to q and k (neox / HF-Llama "rotate half" style).

Why a Triton kernel rather than ``torch.compile``: one small kernel per head layout, compiled once, with no
recompiles for varying token counts and no dynamo guards around CUDA-graph capture; it rotates q and k in
place in one launch instead of the reference's dozen elementwise ops and temporaries. cos/sin stay in
torch (``positions * inv_freq`` in float32, then ``cos``/``sin``), exactly as HF computes them: Triton's
sin/cos may lower to approximate instructions whose error grows with the angle (positions reach 10^5).
The kernel then rounds where HF's ``x * cos + rotate_half(x) * sin`` rounds in the activation dtype, with
fused multiply-adds off, so on CUDA its output is bit-identical to the reference's.
"""

from __future__ import annotations

import torch

from kernels.triton_import import HAS_TRITON, tl, triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (neox style: halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rope: new ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]`` rotated by each token's position ``[T]``."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D], broadcast over heads
    cos, sin = emb.cos(), emb.sin()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same dtype handling as HF: cos/sin cast to the activation dtype before the multiply.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def apply_rope(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``(q, k)``: on CUDA the kernel rotates the given tensors in place and returns them; elsewhere
    the reference returns new tensors. Callers must use the returned tensors and not rely on either."""
    if q.is_cuda and HAS_TRITON and q.dtype == k.dtype and q.stride(-1) == 1 and k.stride(-1) == 1:
        with torch.cuda.device(q.device):
            return rope_triton(positions, q, k, inv_freq)
    return rope_reference(positions, q, k, inv_freq)


def rope_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` in place (any token/head strides, unit dim stride); returns them."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    freqs = positions.to(torch.float32)[:, None] * inv_freq.float()[None, :]  # [T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF_PAD=triton.next_power_of_2(half),
        enable_fp_fusion=False,  # a fused multiply-add would skip the roundings HF does (seen: 23% of bf16 outputs)
    )  # fmt: skip
    return q, k


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, cos, sin,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    """Rotate one token's heads in place; ``cos``/``sin`` are ``[HALF_PAD]`` in the activation dtype."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = x_ptr + heads * stride_h + dims
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    c = cos.to(tl.float32)[None, :]
    s = sin.to(tl.float32)[None, :]
    dtype = x1.dtype
    # Each product is rounded to the activation dtype before the sum, as torch does op by op.
    out1 = (x1.to(tl.float32) * c).to(dtype).to(tl.float32) - (x2.to(tl.float32) * s).to(dtype).to(tl.float32)
    out2 = (x2.to(tl.float32) * c).to(dtype).to(tl.float32) + (x1.to(tl.float32) * s).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    """Program = one token: its cos/sin row (float32) rounded to the activation dtype, then q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + token * stride_cos + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(sin_ptr + token * stride_cos + dims, mask=dims < HALF, other=0.0)
    dtype = q_ptr.dtype.element_ty
    cos, sin = cos.to(dtype), sin.to(dtype)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, K_HEADS_PAD, HALF, HALF_PAD)
