"""A fixed pool of GPU slots for LoRA adapters, with LRU eviction to host memory and pinning by running requests.

The pool allocates, once, per fused projection (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) an A
and a B tensor over all layers and ``max_loras`` slots, in the layouts ``kernels.lora`` reads: A
``[layers, slots, num_slices * max_lora_rank, in]``, B ``[layers, slots, max_lora_rank, out]``. An adapter in a slot
fills its rank and leaves the rest zero, so the padding and the projections it does not target add nothing. The
tensors never move or grow, so CUDA graphs captured over them stay valid while adapters come and go.

Adapters live in three tiers: a GPU slot (at most ``max_loras``), a host image ready to copy into a slot (at most
``max_cpu_loras``, page-locked on CUDA; every resident adapter keeps its image, so eviction from a slot is free),
and disk (``loader`` reads the PEFT folder again). An adapter acquired by a running request is pinned: it keeps
its slot until every acquirer has released it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from common.lora.adapter import FUSED_PROJECTIONS, LoRAAdapter, LoRABaseShapes, load_adapter


class LoRASlotsExhausted(RuntimeError):
    """Every GPU slot holds an adapter that a running request uses; the caller must wait for one to finish."""


class UnknownAdapter(KeyError):
    """No adapter of that name was registered (``--lora-modules``)."""


@dataclass(frozen=True)
class HostImage:
    """An adapter padded to the pool's layout on the host: per targeted projection, A and B over all layers."""

    scale: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # projection -> (A [L, S*R, in], B [L, R, out])


def loader_from_paths(paths: Mapping[str, str | Path], shapes: LoRABaseShapes,
                      max_lora_rank: int) -> Callable[[str], LoRAAdapter]:
    """``name -> LoRAAdapter`` reading ``paths[name]`` from disk each time (the pool caches the result)."""

    def load(name: str) -> LoRAAdapter:
        if name not in paths:
            raise UnknownAdapter(f"no LoRA adapter named {name!r}; known: {', '.join(sorted(paths)) or 'none'}")
        return load_adapter(name, paths[name], shapes, max_lora_rank)

    return load


class LoRASlotPool:
    """``max_loras`` GPU slots of stacked, zero-padded LoRA weights; LRU of residents; refcounted pins.

    Invariants: a slot's tensors hold exactly its adapter's weights (zero-padded) or zeros when free; a pinned
    adapter (``acquire`` without a matching ``release``) is never evicted; ``scales[slot]`` is its adapter's scale.
    """

    def __init__(self, shapes: LoRABaseShapes, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 loader: Callable[[str], LoRAAdapter], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if max_loras < 1 or max_lora_rank < 1 or max_cpu_loras < max_loras:
            raise ValueError(f"LoRA pool needs max_loras >= 1, max_lora_rank >= 1 and max_cpu_loras >= max_loras; "
                             f"got {max_loras}, {max_lora_rank}, {max_cpu_loras}")
        self.shapes, self.max_loras, self.max_lora_rank = shapes, max_loras, max_lora_rank
        self.max_cpu_loras, self.loader = max_cpu_loras, loader
        self.device, self.dtype = torch.device(device), dtype
        self.weights = {proj: self._allocate(proj) for proj in FUSED_PROJECTIONS}
        self.scales = torch.zeros(max_loras, dtype=torch.float32, device=self.device)
        # The fused projections' column offsets on the device, for the expand kernel (made once: graph-capturable).
        self.slice_starts_device = {proj: torch.tensor(shapes.slice_starts(proj), dtype=torch.int32,
                                                       device=self.device) for proj in FUSED_PROJECTIONS}
        self._slot_by_name: OrderedDict[str, int] = OrderedDict()  # residents, least recently used first
        self._pins: dict[str, int] = {}
        self._host: OrderedDict[str, HostImage] = OrderedDict()

    # ------------------------------------------------------------------------------------------------ public

    def layer_weights(self, layer: int, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [slots, num_slices * max_rank, in], B [slots, max_rank, out])`` of one layer: what the kernels take."""
        a, b = self.weights[projection]
        return a[layer], b[layer]

    def slice_starts(self, projection: str) -> tuple[int, ...]:
        return self.shapes.slice_starts(projection)

    def slot_of(self, name: str) -> int | None:
        """The adapter's GPU slot, or None when it is not resident."""
        return self._slot_by_name.get(name)

    def acquire(self, name: str) -> int:
        """Pin ``name`` in a GPU slot (loading it, evicting the least recently used unpinned adapter if needed) and
        return the slot. Raises ``LoRASlotsExhausted`` when every slot is pinned, ``UnknownAdapter`` or
        ``AdapterError`` when it cannot be loaded."""
        if name not in self._slot_by_name:
            self._load_into_slot(name, self._free_slot())
        self._slot_by_name.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return self._slot_by_name[name]

    def release(self, name: str) -> None:
        """Undo one ``acquire``; the adapter stays resident (evictable) until its slot is needed."""
        count = self._pins.get(name, 0)
        if count == 0:
            raise ValueError(f"LoRA adapter {name!r} is not acquired")
        if count == 1:
            del self._pins[name]
        else:
            self._pins[name] = count - 1

    def is_pinned(self, name: str) -> bool:
        return name in self._pins

    def prefetch(self, name: str) -> None:
        """Build (and cache) ``name``'s host image now: loads and checks the adapter, raising as ``acquire`` does."""
        self._host_image(name)

    def forget(self, name: str) -> None:
        """Drop ``name``'s slot and host image (an unloaded adapter; the next use reads its folder again). Its slot's
        weights stay until another adapter takes the slot: no row names a slot without a resident adapter."""
        if name in self._pins:
            raise ValueError(f"LoRA adapter {name!r} is in use by running requests")
        self._slot_by_name.pop(name, None)
        self._host.pop(name, None)

    def resident(self) -> dict[str, int]:
        """Resident adapters and their slots, least recently used first."""
        return dict(self._slot_by_name)

    def host_cached(self) -> list[str]:
        """Adapters with a host image, least recently used first."""
        return list(self._host)

    # ------------------------------------------------------------------------------------------------ slots

    def _allocate(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        layers, slots, rank = self.shapes.num_layers, self.max_loras, self.max_lora_rank
        num_slices = len(FUSED_PROJECTIONS[projection])
        a = torch.zeros(layers, slots, num_slices * rank, self.shapes.in_features(projection),
                        dtype=self.dtype, device=self.device)
        b = torch.zeros(layers, slots, rank, self.shapes.slice_starts(projection)[-1],
                        dtype=self.dtype, device=self.device)
        return a, b

    def _free_slot(self) -> int:
        """A slot no adapter holds, else the least recently used unpinned adapter's (evicted: its host image stays)."""
        taken = set(self._slot_by_name.values())
        for slot in range(self.max_loras):
            if slot not in taken:
                return slot
        for name, slot in self._slot_by_name.items():
            if name not in self._pins:
                del self._slot_by_name[name]
                return slot
        raise LoRASlotsExhausted(f"all {self.max_loras} LoRA slots (--max-loras) hold adapters of running "
                                 f"requests: {', '.join(self._slot_by_name)}")

    def _load_into_slot(self, name: str, slot: int) -> None:
        image = self._host_image(name)
        for projection, (a, b) in self.weights.items():
            if projection in image.tensors:
                host_a, host_b = image.tensors[projection]
                a[:, slot].copy_(host_a, non_blocking=True)
                b[:, slot].copy_(host_b, non_blocking=True)
            else:
                a[:, slot].zero_()
                b[:, slot].zero_()
        self.scales[slot] = image.scale
        self._slot_by_name[name] = slot

    # ------------------------------------------------------------------------------------------------ host

    def _host_image(self, name: str) -> HostImage:
        """The cached host image (refreshed as most recently used), else one built from disk and cached."""
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        image = self._build_image(self.loader(name))
        self._host[name] = image
        self._evict_host_images(keep=name)
        return image

    def _evict_host_images(self, keep: str) -> None:
        """Drop least recently used images of non-resident adapters down to ``max_cpu_loras``."""
        for name in list(self._host):
            if len(self._host) <= self.max_cpu_loras:
                return
            if name != keep and name not in self._slot_by_name:
                del self._host[name]

    def _build_image(self, adapter: LoRAAdapter) -> HostImage:
        if adapter.rank > self.max_lora_rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > max_lora_rank {self.max_lora_rank}")
        tensors = {}
        for projection in FUSED_PROJECTIONS:
            if any(projection in layer for layer in adapter.weights):
                tensors[projection] = self._pad_projection(adapter, projection)
        return HostImage(adapter.scale, tensors)

    def _pad_projection(self, adapter: LoRAAdapter, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's worth of A and B for all layers, zero past the adapter's rank and in untargeted layers."""
        pin = self.device.type == "cuda"
        a_shape, b_shape = self.weights[projection][0].shape, self.weights[projection][1].shape
        num_slices, rank = len(FUSED_PROJECTIONS[projection]), adapter.rank
        a = torch.zeros(a_shape[0], num_slices, self.max_lora_rank, a_shape[3], dtype=self.dtype, pin_memory=pin)
        b = torch.zeros(b_shape[0], b_shape[2], b_shape[3], dtype=self.dtype, pin_memory=pin)
        for layer, fused in enumerate(adapter.weights):
            if projection in fused:
                a[layer, :, :rank] = fused[projection].a
                b[layer, :rank] = fused[projection].b
        return a.view(a_shape[0], a_shape[2], a_shape[3]), b
