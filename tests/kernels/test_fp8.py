"""FP8 weights and activations: quantization round trips within e4m3's rounding, the linear layer against the
float64 product, and (on a GPU with FP8 tensor cores) torch._scaled_mm against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize_rows, fp8_linear, fp8_linear_reference, quantize_rows
from tests.kernels.support import rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_round_trip_within_e4m3_rounding(gen, dtype):
    """Every element within 2^-4 of itself (relative) or 2^-10 of its row's scale (the subnormal range)."""
    matrix = (torch.randn(64, 300, generator=gen) * torch.rand(64, 1, generator=gen) * 3).to(dtype)
    quantized, scale = quantize_rows(matrix)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = quantized.double() * scale.double()
    exact = matrix.double()
    bound = 2**-4 * exact.abs() + 2**-10 * scale.double()
    assert bool(((back - exact).abs() <= bound).all())
    assert torch.equal(quantized.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))  # each row uses the range
    assert dequantize_rows(quantized, scale, dtype).dtype == dtype


def test_an_all_zero_row_stays_zero_without_nan(gen):
    matrix = torch.randn(4, 32, generator=gen)
    matrix[2] = 0
    quantized, scale = quantize_rows(matrix)
    assert bool(torch.isfinite(scale).all()) and bool((quantized[2].float() == 0).all())


@pytest.mark.parametrize(("tokens", "k", "n"), [(1, 64, 48), (37, 576, 1728), (8, 4096, 256)])
def test_linear_reference_is_within_fp8_error_of_the_exact_product(gen, tokens, k, n):
    x = torch.randn(tokens, k, generator=gen)
    weight = torch.randn(n, k, generator=gen) * 0.02
    bias = torch.randn(n, generator=gen)
    exact = x.double() @ weight.double().t()
    out = fp8_linear_reference(x, *quantize_rows(weight), None)
    assert out.shape == (tokens, n) and rel_err(out, exact) < 0.05
    with_bias = fp8_linear_reference(x, *quantize_rows(weight), bias)
    torch.testing.assert_close(with_bias, out + bias, rtol=1e-5, atol=1e-5)


def test_linear_keeps_leading_dims_and_dtype(gen):
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    weight = torch.randn(32, 64, generator=gen)
    out = fp8_linear(x, *quantize_rows(weight), None)
    assert out.shape == (2, 3, 32) and out.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_matches_the_reference_on_fp8_tensor_cores(with_bias):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores on this GPU")
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(77, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    weight = torch.randn(1024, 4096, generator=gen, device="cuda") * 0.02
    bias = torch.randn(1024, generator=gen, device="cuda").to(torch.bfloat16) if with_bias else None
    qweight, scale = quantize_rows(weight)
    out = fp8_linear(x, qweight, scale, bias)
    ref = fp8_linear_reference(x, qweight, scale, bias)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2  # the same products; bf16 output rounding
