"""The engine's LoRA adapters: the names requests may use and their folders, the GPU slot pool, and how many live
requests use each adapter.

Unloading an adapter that live requests use finishes them first: ``remove`` refuses new requests for it at once,
the requests already admitted (waiting or running) keep it until they finish, and then its slot and host image
are dropped. (vLLM's ``remove_lora`` drops the adapter under running requests; finishing them is the choice that
never changes a request's output half-way.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from common.config import LoRAConfig
from common.lora.adapter import LoRAAdapter, LoRABaseShapes, load_adapter
from common.lora.slots import LoRASlotPool, LoRASlotsExhausted, UnknownAdapter


class LoRAAdapters:
    """Invariants: a name in ``_paths`` and not in ``_removing`` is accepted for new requests; a removing name has
    live users (``_users``) and is dropped when the last one finishes; the pool loads only names in ``_paths``."""

    def __init__(self, config: LoRAConfig, shapes: LoRABaseShapes, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.config, self.shapes = config, shapes
        self._paths: dict[str, str] = {}
        self._removing: set[str] = set()
        self._users: Counter[str] = Counter()
        self.pool = LoRASlotPool(shapes, config.max_loras, config.max_lora_rank, config.max_cpu_loras, self._load,
                                 device, dtype)
        for name, path in config.lora_modules:  # checked (and cached on the host) at startup
            self.add(name, path)

    # ------------------------------------------------------------------------------------------------ names

    def names(self) -> list[str]:
        """The adapters new requests may use, in the order they were added."""
        return [name for name in self._paths if name not in self._removing]

    def path_of(self, name: str) -> str | None:
        return self._paths.get(name) if name not in self._removing else None

    def check(self, name: str) -> None:
        """ValueError unless new requests may use ``name``."""
        if name in self._removing:
            raise ValueError(f"lora_request: LoRA adapter {name!r} is being unloaded")
        if name not in self._paths:
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"lora_request: no LoRA adapter named {name!r} is loaded (loaded: {known})")

    def add(self, name: str, path: str | Path) -> None:
        """Register ``name`` for the PEFT folder ``path``, after reading and checking it (``AdapterError``, a
        ValueError, says what is wrong: missing files, unsupported features, shapes of another model, rank)."""
        if not isinstance(name, str) or not name:
            raise ValueError("lora_name must be a non-empty string")
        if name in self._paths:
            state = "is being unloaded" if name in self._removing else "is already loaded"
            raise ValueError(f"LoRA adapter {name!r} {state} (from {self._paths[name]})")
        self._paths[name] = str(path)
        try:
            self.pool.prefetch(name)
        except BaseException:
            del self._paths[name]
            raise

    def remove(self, name: str) -> bool:
        """Unload ``name``: True when it is gone now, False when its live requests finish first (new ones are
        refused from now on). ValueError for a name that is not loaded."""
        self.check(name)
        if self._users[name]:
            self._removing.add(name)
            return False
        self._drop(name)
        return True

    def _drop(self, name: str) -> None:
        self.pool.forget(name)
        self._paths.pop(name, None)
        self._removing.discard(name)
        self._users.pop(name, None)

    def _load(self, name: str) -> LoRAAdapter:
        if name not in self._paths:
            raise UnknownAdapter(f"no LoRA adapter named {name!r}")
        return load_adapter(name, self._paths[name], self.shapes, self.config.max_lora_rank)

    # ------------------------------------------------------------------------------------------------ requests

    def admit(self, name: str) -> None:
        """A live request (sample) uses ``name`` from now until ``finished``."""
        self._users[name] += 1

    def finished(self, name: str) -> None:
        self._users[name] -= 1
        if self._users[name] <= 0:
            del self._users[name]
            if name in self._removing:
                self._drop(name)

    def acquire(self, name: str) -> int | None:
        """Pin ``name`` in a GPU slot and return it; None while every slot is pinned by other running requests."""
        try:
            return self.pool.acquire(name)
        except LoRASlotsExhausted:
            return None

    def release(self, name: str) -> None:
        self.pool.release(name)
