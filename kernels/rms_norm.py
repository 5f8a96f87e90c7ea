"""RMSNorm, alone or fused with the residual add before it, with HF transformers' rounding.

HF's Llama computes ``residual = residual + hidden`` in the activation dtype, normalizes in float32
(``x32 * rsqrt(mean(x32**2) + eps)``), casts back to the activation dtype, and only then multiplies by the
weight (in the promoted weight/activation dtype). The kernel rounds at exactly those points, so in float32 it
differs from the reference only by summation order, and in bf16/fp16 it rarely differs by more than one ulp.
"""

from __future__ import annotations

import torch

from kernels.triton_import import HAS_TRITON, tl, triton

MAX_FUSED_DIM = 65536  # one program holds a whole row in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's ``LlamaRMSNorm.forward``, over the last dim."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; the sum rounded to the activation dtype first, as in HF."""
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: the Triton kernel on CUDA, the reference elsewhere."""
    if _use_kernel(x):
        with torch.cuda.device(x.device):
            return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, new_residual)`` with ``new_residual = x + residual``: one kernel on CUDA, the reference elsewhere."""
    if _use_kernel(x):
        with torch.cuda.device(x.device):
            return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_reference(x, residual, weight, eps)


def _use_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and HAS_TRITON and x.shape[-1] <= MAX_FUSED_DIM


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Kernel version of ``rms_norm_reference``: one read of ``x``, one write of the output."""
    rows = _as_rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(rows, None, weight.contiguous(), out, None, eps)
    return out.view(x.shape)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of ``fused_add_rms_norm_reference``: the sum is written once and normalized in registers."""
    rows, res_rows = _as_rows(x), _as_rows(residual)
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    new_residual = torch.empty(rows.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    _launch(rows, res_rows, weight.contiguous(), out, new_residual, eps)
    return out.view(x.shape), new_residual.view(x.shape)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[rows, dim]`` with unit column stride (a view when possible, else a copy)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    new_residual: torch.Tensor | None,
    eps: float,
) -> None:
    num_rows, dim = x.shape
    if num_rows == 0:
        return
    block = triton.next_power_of_2(dim)
    has_residual = residual is not None
    residual = residual if has_residual else x  # placeholders: never read or written without a residual
    new_residual = new_residual if has_residual else out
    _rms_norm_kernel[(num_rows,)](
        x, residual, weight, out, new_residual,
        x.stride(0), residual.stride(0), out.stride(0), new_residual.stride(0),
        dim, eps,
        BLOCK=block, HAS_RESIDUAL=has_residual, num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    stride_x, stride_r, stride_out, stride_new_r,
    dim, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Program = one row. Rounds where HF rounds: the sum to its dtype, the normalized row to the
    activation dtype, the weighted product to the output dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_new_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, 0) / dim
    normed = (x32 * tl.rsqrt(mean_square + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
