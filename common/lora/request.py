"""``LoRARequest``: which adapter a request runs under, in vLLM's offline API shape."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)``. The engine keys adapters by name: an unknown name
    with a path is loaded on first use; ``lora_int_id`` is accepted for compatibility (vLLM's id, unused here)."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_request: lora_name must be a non-empty string")
