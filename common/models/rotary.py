"""Rotary position embedding (neox / HF-Llama "rotate half" style) with Llama-3 and linear scaling.

Frequencies are computed exactly as HF transformers does (float32, ``position * inv_freq``), so
cos/sin match HF bit for bit in float32. The rotation itself is ``kernels.rotary.apply_rope``: a Triton
kernel on CUDA (in place), HF's torch code elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kernels.rotary import apply_rope

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config as one dict with ``rope_type`` and ``rope_theta``.

    Reads ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` + ``rope_theta`` (4.x).
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """HF's ``1 / theta^(2i/d)`` for i in [0, d/2), float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth blend between."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32) for the given rope settings."""
    rope_type = params["rope_type"]
    inv_freq = default_inv_freq(head_dim, float(params["rope_theta"]))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, params)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    """Applies rope to q and k at arbitrary (per-token) positions; no position limit, no cos/sin table."""

    def __init__(self, head_dim: int, params: dict[str, Any]) -> None:
        super().__init__()
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        # float32 whatever the model dtype (built under the caller's device context); not persistent
        # so state dicts never carry it. Do not .to(dtype) the model: that would round it.
        self.register_buffer("inv_freq", compute_inv_freq(head_dim, params), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]`` by their token's position ``[T]``.

        On CUDA the given tensors are rotated in place; use the returned ones.
        """
        return apply_rope(positions, q, k, self.inv_freq)
