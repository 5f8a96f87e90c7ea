"""One step's LoRA context, handed explicitly down the model's forward: which slot each token row uses, the rows
grouped by slot (built once per step, shared by every layer), and the slot pool's weights.

A model applies it after each projection it owns, additively (``out = proj(x)`` then ``layer.add(name, out, x)``),
so the projection modules themselves stay whatever they are (plain, FP8, ...). A step without LoRA rows gets no
context at all (``lora=None``): the base model's code path, with no extra op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.lora.slots import LoRASlotPool
from kernels.lora import LoRABatch, add_lora, make_lora_batch


@dataclass(frozen=True)
class LoRAStep:
    """``batch.token_slots[t]``: row ``t``'s slot in ``pool`` (-1: the base model)."""

    batch: LoRABatch
    pool: LoRASlotPool

    @classmethod
    def from_token_slots(cls, token_slots: torch.Tensor, pool: LoRASlotPool) -> LoRAStep:
        """Group the rows by slot on the device (no host sync: capturable in a CUDA graph over a static buffer)."""
        return cls(make_lora_batch(token_slots, pool.max_loras), pool)

    def layer(self, index: int) -> LayerLoRA:
        return LayerLoRA(self, index)


@dataclass(frozen=True)
class LayerLoRA:
    """The step's LoRA for one decoder layer."""

    step: LoRAStep
    index: int

    def add(self, projection: str, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out += LoRA delta`` of ``projection`` (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) for
        this layer, in place, where ``out`` is the projection's output for input ``x`` (both ``[T, features]``)."""
        pool = self.step.pool
        lora_a, lora_b = pool.layer_weights(self.index, projection)
        return add_lora(out, x, lora_a, lora_b, self.step.batch, pool.scales, pool.slice_starts(projection),
                        pool.slice_starts_device[projection])
