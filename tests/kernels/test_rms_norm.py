"""RMSNorm kernel (alone and fused with the residual add) vs HF's torch code."""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
)
from tests.kernels.support import DEVICE, assert_equal_after_cast, requires_triton


def assert_norm_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: summation order only. Half types: one ulp apart at most (relative to the smaller of the two
    near a power of two: up to 2 ulp-ratios), almost every element bit-equal on CUDA; on CPU the interpreter
    truncates each of its casts (the sum, the normed row, the product), so a few ulps there."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
        return
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=ulp * (2 if out.is_cuda else 4), atol=1e-5)
    if out.is_cuda:
        assert (out != ref).float().mean() < 0.01


def inputs(shape, dtype, gen, residual_scale=4.0):
    hidden = shape[-1]
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    residual = (residual_scale * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    return x, residual, weight


@requires_triton
@pytest.mark.parametrize(
    ("shape", "dtype"), [((7, 576), torch.float32), ((5, 576), torch.bfloat16), ((3, 4, 128), torch.float16)]
)
def test_rms_norm_kernel(shape, dtype, gen):
    x, _, weight = inputs(shape, dtype, gen)
    assert_norm_close(rms_norm_triton(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))


@requires_triton
@pytest.mark.parametrize(("shape", "dtype"), [((7, 576), torch.float32), ((5, 320), torch.bfloat16)])
def test_fused_add_rms_norm_kernel(shape, dtype, gen):
    x, residual, weight = inputs(shape, dtype, gen)
    out, new_residual = fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_residual = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert_equal_after_cast(new_residual, ref_residual)  # the add is HF's, rounded to the activation dtype
    assert_norm_close(out, ref_out)


@requires_triton
def test_rms_norm_kernel_on_strided_heads(gen):
    """Qwen3's q/k norm: per-head rows of a view into the fused qkv output (non-contiguous)."""
    qkv = torch.randn(6, (4 + 2) * 64, generator=gen).to(DEVICE)
    q = qkv[:, : 4 * 64].view(6, 4, 64)
    weight = torch.randn(64, generator=gen).to(DEVICE)
    assert_norm_close(rms_norm_triton(q, weight, 1e-6), rms_norm_reference(q, weight, 1e-6))


def test_dispatch_is_reference_on_cpu(gen):
    x, residual, weight = (t.cpu() for t in inputs((3, 64), torch.bfloat16, gen))
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))
    for got, want in zip(fused_add_rms_norm(x, residual, weight, 1e-5),
                         fused_add_rms_norm_reference(x, residual, weight, 1e-5)):  # fmt: skip
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1000, 4096), (33, 8192), (257, 32, 128)])
def test_dispatch_on_cuda(shape, dtype, gen):
    x, residual, weight = inputs(shape, dtype, gen)
    assert_norm_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = fused_add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, ref_residual)
    assert_norm_close(out, ref_out)
