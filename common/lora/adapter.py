"""PEFT LoRA adapters (a folder with ``adapter_config.json`` and ``adapter_model.safetensors``) for Llama models.

``load_adapter`` reads and checks a folder against the base model's shapes and returns its A/B tensors keyed by our
fused projections: q/k/v -> ``qkv_proj`` (3 slices), gate/up -> ``gate_up_proj`` (2 slices), ``o_proj``,
``down_proj``. What PEFT supports but this server does not (DoRA, trained biases, ``modules_to_save``, embedding or
``lm_head`` targets, per-module rank/alpha patterns) is refused with an ``AdapterError`` naming the setting.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# Our fused projections, their HF parts in output order, and which side of the model holds them.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
HF_MODULES = tuple(part for parts in FUSED_PROJECTIONS.values() for part in parts)
_UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT's saved names carry no adapter name)
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


class AdapterError(ValueError):
    """An adapter folder that cannot be served: missing files, unsupported PEFT features, wrong shapes."""


@dataclass(frozen=True)
class LoRABaseShapes:
    """The base model's projection shapes a LoRA adapter must fit (full, unsharded widths)."""

    num_layers: int
    hidden_size: int
    q_size: int  # heads * head_dim
    kv_size: int  # kv heads * head_dim
    intermediate_size: int

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> LoRABaseShapes:
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(hf_config.num_hidden_layers, hf_config.hidden_size, heads * head_dim, kv_heads * head_dim,
                   hf_config.intermediate_size)

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of an HF projection (``q_proj`` ... ``down_proj``)."""
        h, q, kv, inter = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}[module]

    def slice_starts(self, projection: str) -> tuple[int, ...]:
        """Column offsets of a fused projection's parts in its output, ending with its width."""
        starts = [0]
        for part in FUSED_PROJECTIONS[projection]:
            starts.append(starts[-1] + self.module_shape(part)[1])
        return tuple(starts)

    def in_features(self, projection: str) -> int:
        return self.module_shape(FUSED_PROJECTIONS[projection][0])[0]


@dataclass(frozen=True)
class FusedLoRAWeights:
    """One layer's LoRA of one fused projection, unpadded (rank ``r``); parts the adapter does not target are zero.

    ``a``: ``[num_slices, r, in]`` (part ``i``'s PEFT ``lora_A.weight``); ``b``: ``[r, out]`` with part ``i``'s
    ``lora_B.weight.T`` in the columns ``slice_starts[i] .. slice_starts[i + 1]`` of the fused output.
    """

    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded adapter: ``weights[layer][projection]`` for the projections it targets in that layer."""

    name: str
    path: str
    rank: int
    scale: float  # PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    target_modules: tuple[str, ...]  # HF names present in the weights
    weights: tuple[dict[str, FusedLoRAWeights], ...]


def load_adapter(name: str, path: str | Path, shapes: LoRABaseShapes, max_lora_rank: int) -> LoRAAdapter:
    """Read, check and fuse a PEFT LoRA folder. Raises ``AdapterError`` with the reason when it cannot be served."""
    folder = Path(path)
    config = read_adapter_config(folder)
    rank = check_adapter_config(config, max_lora_rank)
    tensors = read_adapter_tensors(folder)
    parts = _parts_by_layer(tensors, shapes, rank)
    if not parts:
        raise AdapterError(f"LoRA adapter {folder}: its weights file holds no LoRA tensors")
    weights = tuple(_fuse_layer(parts.get(layer, {}), shapes, rank) for layer in range(shapes.num_layers))
    present = tuple(m for m in HF_MODULES if any(m in layer_parts for layer_parts in parts.values()))
    return LoRAAdapter(name, str(folder), rank, adapter_scale(config), present, weights)


def adapter_scale(config: dict[str, Any]) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilized LoRA."""
    rank, alpha = config["r"], config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"LoRA adapter {folder}: no {CONFIG_FILE} (a PEFT adapter folder has one)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"LoRA adapter {folder}: {CONFIG_FILE} is not valid JSON: {exc}") from None


def check_adapter_config(config: dict[str, Any], max_lora_rank: int) -> int:
    """The adapter's rank, after refusing every PEFT feature this server does not implement."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, not peft_type {config['peft_type']!r}")
    refusals = {
        "use_dora": "DoRA adapters (use_dora) are not supported",
        "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported",
        "lora_bias": "adapters with trained LoRA biases (lora_bias) are not supported",
        "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models) are not supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "layer_replication": "layer_replication is not supported",
        "trainable_token_indices": "trainable_token_indices is not supported",
        "target_parameters": "target_parameters is not supported",
    }
    for key, reason in refusals.items():
        if config.get(key):
            raise AdapterError(reason)
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapters with bias={config['bias']!r} are not supported (only 'none')")
    _check_targets(config.get("target_modules"))
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter rank r={rank!r} is not a positive integer")
    if rank > max_lora_rank:
        raise AdapterError(f"adapter rank {rank} exceeds --max-lora-rank {max_lora_rank}")
    return rank


def _check_targets(targets: Any) -> None:
    """Refuse embedding and lm_head targets (a list of names, a regex string, or "all-linear")."""
    if targets is None:
        raise AdapterError("adapter_config.json names no target_modules")
    names = [targets] if isinstance(targets, str) else list(targets)
    for name in names:
        if any(bad in name for bad in _UNSUPPORTED_TARGETS):
            raise AdapterError(f"LoRA on {name!r} is not supported (only q/k/v/o/gate/up/down projections)")


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors``, else ``adapter_model.bin`` (loaded with ``weights_only=True``)."""
    if (folder / SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / SAFETENSORS_FILE))
    if (folder / BIN_FILE).is_file():
        return torch.load(folder / BIN_FILE, map_location="cpu", weights_only=True)
    raise AdapterError(f"LoRA adapter {folder}: neither {SAFETENSORS_FILE} nor {BIN_FILE} is there")


def _parts_by_layer(
    tensors: dict[str, torch.Tensor], shapes: LoRABaseShapes, rank: int
) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """``{layer: {hf_module: {"A": [r, in], "B": [out, r]}}}``, every tensor checked against the base shapes."""
    parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match.group(2) not in HF_MODULES:
            raise AdapterError(f"unsupported tensor {key!r} in the adapter (only LoRA A/B of q/k/v/o/gate/up/down "
                               "projections are served)")
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= shapes.num_layers:
            raise AdapterError(f"adapter tensor {key!r} is for layer {layer}; the base model has "
                               f"{shapes.num_layers} layers")
        _check_shape(key, tensor, shapes, module, side, rank)
        parts.setdefault(layer, {}).setdefault(module, {})[side] = tensor
    for layer, modules in parts.items():
        for module, sides in modules.items():
            if len(sides) != 2:
                raise AdapterError(f"layer {layer} {module}: the adapter has lora_{''.join(sides)} but not both")
    return parts


def _check_shape(key: str, tensor: torch.Tensor, shapes: LoRABaseShapes, module: str, side: str, rank: int) -> None:
    in_features, out_features = shapes.module_shape(module)
    expected = (rank, in_features) if side == "A" else (out_features, rank)
    if tuple(tensor.shape) != expected:
        raise AdapterError(f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, but the base model needs "
                           f"{expected} (rank {rank}): was it trained for another model?")


def _fuse_layer(
    modules: dict[str, dict[str, torch.Tensor]], shapes: LoRABaseShapes, rank: int
) -> dict[str, FusedLoRAWeights]:
    """The layer's targeted fused projections; untargeted parts of a fused one stay zero."""
    fused = {}
    for projection, hf_parts in FUSED_PROJECTIONS.items():
        if not any(part in modules for part in hf_parts):
            continue
        starts = shapes.slice_starts(projection)
        a = torch.zeros(len(hf_parts), rank, shapes.in_features(projection))
        b = torch.zeros(rank, starts[-1])
        for i, part in enumerate(hf_parts):
            if part in modules:
                a[i] = modules[part]["A"].float()
                b[:, starts[i] : starts[i + 1]] = modules[part]["B"].float().T
        fused[projection] = FusedLoRAWeights(a, b)
    return fused
