"""A fake worker state and a polling wait, shared by the coordination tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from common.coord import WorkerInfo


@dataclass
class FakeWorker:
    """Stands in for a worker's live state; ``info()`` is the registration's info_provider."""

    worker_id: str = "w1"
    role: str = "decode"
    model: str = "smollm2"
    started_at: float = field(default_factory=time.time)
    free_blocks: int = 100
    running: int = 0
    waiting: int = 0
    draining: bool = False

    def info(self) -> WorkerInfo:
        base = WorkerInfo(worker_id=self.worker_id, role=self.role, model=self.model,  # type: ignore[arg-type]
                          grpc_address=f"127.0.0.1:{5000 + len(self.worker_id)}", device="cpu", host_id="host-a",
                          block_size=16, total_blocks=128, started_at=self.started_at)
        return replace(base, free_blocks=self.free_blocks, running=self.running, waiting=self.waiting,
                       draining=self.draining)


async def eventually(predicate: Callable[[], object], timeout_s: float, what: str = "condition") -> float:
    """Poll predicate (sync or async) every 5 ms; return seconds until it held, fail after timeout_s."""
    start = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.005)
