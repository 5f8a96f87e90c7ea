"""SwiGLU's fused silu-and-mul kernel vs HF's torch code (``silu(gate) * up``)."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_reference, silu_and_mul_triton
from tests.kernels.support import DEVICE, requires_triton


def gate_up(shape, dtype, gen) -> torch.Tensor:
    # Gates over [-12, 12]: silu's tails (near 0 and near the identity) and its curved middle all get hit.
    return (4 * torch.randn(shape, generator=gen)).clamp(-12, 12).to(DEVICE, dtype)


@requires_triton
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((7, 2 * 1536), torch.float32),
        ((5, 2 * 1536), torch.bfloat16),
        ((2, 3, 2 * 1100), torch.float16),
        ((3, 2 * 2500), torch.bfloat16),
    ],  # 2,500 columns: a partial last block
)
def test_silu_and_mul_kernel(shape, dtype, gen):
    x = gate_up(shape, dtype, gen)
    out, ref = silu_and_mul_triton(x), silu_and_mul_reference(x)
    assert out.shape == ref.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
        return
    # Half types: silu rounded then the product rounded, as HF; exp's last float32 bit may differ from torch's,
    # which moves a rounding by one ulp now and then. The interpreter on CPU truncates its casts where CUDA rounds
    # to nearest, so there most elements are one ulp off and only the ulp bound is checked.
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(out, ref, rtol=2 * ulp, atol=1e-5)
    if out.is_cuda:
        assert (out != ref).float().mean() < 0.01


@requires_triton
def test_silu_and_mul_non_contiguous_rows(gen):
    """A column slice of a wider tensor (row stride != width): the kernel reads through the stride."""
    wide = gate_up((6, 3000), torch.float32, gen)
    x = wide[:, :2048]
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_reference(x), rtol=2e-6, atol=1e-6)


@requires_triton
def test_silu_and_mul_empty_and_odd():
    assert silu_and_mul_triton(torch.empty((0, 64), device=DEVICE)).shape == (0, 32)
    with pytest.raises(ValueError, match="gate and up"):
        silu_and_mul_triton(torch.empty((2, 63), device=DEVICE))


def test_silu_and_mul_dispatch_on_cpu(gen):
    """Off CUDA the public entry point is the reference itself."""
    x = torch.randn((4, 64), generator=gen)
    assert torch.equal(silu_and_mul(x), silu_and_mul_reference(x))
