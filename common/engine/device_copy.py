"""Host <-> device copies that never make the host wait for the device.

A blocking upload (``torch.tensor(..., device="cuda")``, ``.to("cuda")`` from pageable memory) synchronizes the
stream, so the host would stall behind every kernel already enqueued; async scheduling depends on the host
running a step ahead. Uploads go through pinned memory with ``non_blocking``; downloads land in pinned memory
and are read only after an event recorded behind them has completed.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(host: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``, the copy enqueued on the current stream (CPU devices get the tensor itself)."""
    tensor = torch.from_numpy(host) if isinstance(host, np.ndarray) else host
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host_async(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies into pinned host memory enqueued on the current stream; CPU tensors pass through unchanged.

    Read them only after ``record_event()`` (recorded after this call) has completed.
    """
    return [t.to("cpu", non_blocking=True) if t.is_cuda else t for t in tensors]


def record_event(device: torch.device) -> torch.cuda.Event | None:
    """An event behind everything enqueued so far on the current stream of ``device`` (None on CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
