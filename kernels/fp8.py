"""FP8 (e4m3) weights with per-output-channel scales and activations with dynamic per-token scales.

A linear layer stores ``qweight = round_e4m3(weight / scale[:, None])`` with ``scale = amax(|row|) / 448`` per output
channel; each forward quantizes the activations per token the same way and multiplies in FP8 with float32
accumulation: on Hopper (and Ada) ``torch._scaled_mm`` with row-wise scales (``scale_a`` ``[T, 1]``, ``scale_b``
``[1, N]``) runs the product on the FP8 tensor cores and applies both scales and the bias in its epilogue, reading
half the weight bytes of bf16. Elsewhere (CPU, older GPUs) the reference dequantizes and multiplies in float32: the
same numbers up to the order of the float32 sums.

e4m3 keeps 3 mantissa bits: one element's relative rounding error is at most 2^-4 (below 2^-6 of the row's scale,
where e4m3 turns subnormal, the absolute error is at most 2^-10 of the scale). A dot product of random data then
carries about 3.5-4% relative error whatever its length (measured: 3.5% at K=64, 3.8% at K=4096), since both
operands' rounding errors add and do not average out relative to the sum (tests bound it at 5%).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row or token gets this scale instead of 0 (no division by zero, stays zero)
_SCALED_MM_ALIGN = 16  # torch._scaled_mm wants both matrix dims of the weight divisible by 16


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` -> (``[R, C]`` e4m3, float32 ``[R, 1]`` scales) with ``matrix ~= q.float() * scale``.

    One scale per row, so a row's largest magnitude maps onto 448 (the e4m3 maximum). Used for weights (rows are
    output channels) and for activations (rows are tokens).
    """
    amax = matrix.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    quantized = (matrix.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def dequantize_rows(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``quantize_rows``'s inverse up to rounding: ``q.float() * scale`` in ``dtype``."""
    return (quantized.float() * scale).to(dtype)


def fp8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` and ``x`` quantized as the FP8 path quantizes them, summed in float32.

    ``x`` ``[..., K]``; ``qweight`` ``[N, K]`` e4m3; ``weight_scale`` float32 ``[N, 1]``. Output in ``x.dtype``.
    """
    rows = x.reshape(-1, x.shape[-1])
    qx, x_scale = quantize_rows(rows)
    out = (qx.float() * x_scale) @ (qweight.float() * weight_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``torch._scaled_mm`` where the device has FP8 tensor cores, the reference elsewhere."""
    if not (x.is_cuda and scaled_mm_supported(x.device, qweight.shape)):
        return fp8_linear_reference(x, qweight, weight_scale, bias)
    rows = x.reshape(-1, x.shape[-1])
    qx, x_scale = quantize_rows(rows)
    out = torch._scaled_mm(
        qx,
        qweight.t(),  # [K, N] column-major: the layout _scaled_mm wants for its second operand
        scale_a=x_scale,
        scale_b=weight_scale.view(1, -1),
        bias=bias,
        out_dtype=x.dtype,
    )
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def scaled_mm_supported(device: torch.device, weight_shape: torch.Size | tuple[int, ...]) -> bool:
    """FP8 tensor cores (compute capability 8.9 or newer) and a weight whose dims _scaled_mm accepts."""
    major, minor = torch.cuda.get_device_capability(device)
    aligned = all(dim % _SCALED_MM_ALIGN == 0 for dim in weight_shape)
    return (major, minor) >= (8, 9) and aligned
