"""Multi-LoRA: PEFT adapter loading and the GPU slot pool the batched LoRA kernels (``kernels.lora``) read."""

from common.lora.adapter import (
    FUSED_PROJECTIONS,
    AdapterError,
    FusedLoRAWeights,
    LoRAAdapter,
    LoRABaseShapes,
    load_adapter,
)
from common.lora.registry import LoRAAdapters
from common.lora.request import LoRARequest
from common.lora.slots import LoRASlotPool, LoRASlotsExhausted, UnknownAdapter, loader_from_paths

__all__ = [
    "FUSED_PROJECTIONS",
    "AdapterError",
    "FusedLoRAWeights",
    "LoRAAdapter",
    "LoRAAdapters",
    "LoRABaseShapes",
    "LoRARequest",
    "LoRASlotPool",
    "LoRASlotsExhausted",
    "UnknownAdapter",
    "load_adapter",
    "loader_from_paths",
]
