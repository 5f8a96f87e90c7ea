"""Weight quantization of a loaded model (``--quantization fp8``) and FP8 checkpoints as vLLM reads them.

``fp8``: every decoder projection (fused q|k|v, o, fused gate|up, down) keeps its weight as e4m3 with one scale per
output channel and multiplies through ``kernels.fp8.fp8_linear`` (dynamic per-token activation scales; FP8 tensor
cores on Hopper). The embedding, the LM head and the norms stay in the model dtype, as in vLLM. A bf16/fp16
checkpoint is quantized at load; so are random (``--load-format dummy``) weights, so benchmarks measure the FP8
path. Tensor-parallel shards quantize their own rows (each rank's output channels have their own scales).

Pre-quantized checkpoints (``quantization_config`` with ``quant_method`` ``fp8`` or ``compressed-tensors`` with
8-bit float weights): the e4m3 ``weight`` tensors come with a ``weight_scale`` (one per tensor or one per output
channel). They are dequantized while loading and quantized again per output channel afterwards: exact for
per-channel checkpoints, and for per-tensor ones within one e4m3 rounding of the stored value. Static
``input_scale`` tensors are read and not used: activations are always scaled per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from common.models.parallel_layers import RowParallelLinear
from kernels.fp8 import FP8_DTYPE, fp8_linear, quantize_rows

QUANTIZATION_METHODS = ("fp8",)
_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_FP8_CHECKPOINT_METHODS = ("fp8", "compressed-tensors")
_UNUSED_SUFFIXES = (".input_scale",)  # static activation scales: we scale activations per token instead


class Fp8Linear(nn.Module):
    """An ``nn.Linear`` (or a row-parallel one) with e4m3 weights and per-output-channel scales.

    ``reduce``: the row-parallel all-reduce, run on the partial product before the bias is added once.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        # Parameters (frozen) rather than buffers, so weight-byte accounting and .to() see them.
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.reduce = reduce

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        qweight, scale = quantize_rows(linear.weight.detach())
        reduce = linear.tp.all_reduce if isinstance(linear, RowParallelLinear) else None
        return cls(qweight, scale, linear.bias, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return fp8_linear(x, self.qweight, self.weight_scale, self.bias)
        out = self.reduce(fp8_linear(x, self.qweight, self.weight_scale, None))
        return out if self.bias is None else out + self.bias


@torch.no_grad()
def quantize_model_fp8(model: nn.Module) -> int:
    """Replace every decoder layer's projections with ``Fp8Linear``; returns how many were replaced."""
    replaced = 0
    for layer in model.model.layers:
        for path in _PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name)))
            replaced += 1
    return replaced


def checkpoint_quantization(hf_config: Any) -> str | None:
    """``"fp8"`` for an FP8 checkpoint, None for an unquantized one; ValueError for one we cannot read."""
    quant = getattr(hf_config, "quantization_config", None)
    if not quant:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    if method not in _FP8_CHECKPOINT_METHODS or (method == "compressed-tensors" and not _fp8_weights(quant)):
        raise ValueError(
            f"checkpoint quantization {method!r} is not supported (FP8 checkpoints are: quant_method fp8, "
            "or compressed-tensors with 8-bit float weights)"
        )
    return "fp8"


def _fp8_weights(quant: dict) -> bool:
    groups = quant.get("config_groups") or {}
    schemes = [group.get("weights") or {} for group in groups.values()]
    return bool(schemes) and all(s.get("num_bits") == 8 and s.get("type") == "float" for s in schemes)


def resolve_quantization(requested: str | None, hf_config: Any) -> str | None:
    """The quantization to run: the checkpoint's when it has one (an FP8 checkpoint runs FP8 unasked, as in vLLM),
    else the requested one. ValueError for an unknown method."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={requested!r}: expected one of {QUANTIZATION_METHODS}")
    return checkpoint_quantization(hf_config) or requested


def dequantize_fp8_checkpoint(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with each e4m3 ``X.weight`` turned into ``weight * weight_scale`` (float32) and its
    ``X.weight_scale`` consumed; everything else passes through. Either of a pair may come first."""
    pending: dict[str, torch.Tensor] = {}  # module prefix -> the half of its pair seen so far
    for name, tensor in weights:
        if name.endswith(_UNUSED_SUFFIXES):
            continue
        if name.endswith(".weight_scale") or (name.endswith(".weight") and _is_fp8(tensor)):
            prefix = name.rsplit(".", 1)[0]
            tensor = tensor if isinstance(tensor, torch.Tensor) else tensor[:]  # a lazy slice: pairs are read whole
            if prefix not in pending:
                pending[prefix] = tensor
                continue
            other = pending.pop(prefix)
            qweight, scale = (other, tensor) if name.endswith(".weight_scale") else (tensor, other)
            yield f"{prefix}.weight", _dequantize(qweight, scale, prefix)
            continue
        yield name, tensor
    if pending:
        raise ValueError(f"FP8 checkpoint: weight without weight_scale (or the reverse) for {sorted(pending)[:3]}")


def _is_fp8(tensor: Any) -> bool:
    """For a torch tensor or a lazy safetensors slice (whose dtype is a safetensors name)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.dtype == FP8_DTYPE
    return tensor.get_dtype() == "F8_E4M3"


def _dequantize(qweight: torch.Tensor, scale: torch.Tensor, prefix: str) -> torch.Tensor:
    """``qweight * scale`` with a per-tensor (one value) or per-output-channel (``[out]`` / ``[out, 1]``) scale."""
    scale = scale.float()
    if scale.numel() == qweight.shape[0] and qweight.shape[0] != 1:
        scale = scale.reshape(-1, 1)
    elif scale.numel() != 1:
        raise ValueError(
            f"{prefix}.weight_scale: {tuple(scale.shape)} is neither one scale nor one per output channel "
            f"of a {tuple(qweight.shape)} weight (block-wise FP8 is not supported)"
        )
    return qweight.float() * scale
