"""AsyncEngine: the engine thread hands each step's outputs to asyncio streams, one wake-up per step."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

from common.engine.async_engine import AsyncEngine


@dataclass
class _Output:
    request_id: str
    step: int
    finished: bool


@dataclass
class _StepEngine:
    """Stands in for LLMEngine: each request finishes after `steps` steps; records aborts."""

    steps: int
    remaining: dict[str, int] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    step_count: int = 0

    def add(self, request_id: str) -> str:
        self.remaining[request_id] = self.steps
        return request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self.remaining)

    def step(self) -> list[_Output]:
        self.step_count += 1
        outputs = []
        for request_id in list(self.remaining):
            self.remaining[request_id] -= 1
            finished = self.remaining[request_id] == 0
            if finished:
                del self.remaining[request_id]
            outputs.append(_Output(request_id, self.step_count, finished))
        return outputs

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.remaining.pop(request_id, None)


async def _collect(engine: AsyncEngine, request_id: str) -> list[_Output]:
    return [output async for output in engine.stream(request_id, _StepEngine.add, request_id)]


def test_streams_get_every_step_in_order_with_one_wakeup_per_step():
    fake = _StepEngine(steps=5)
    engine = AsyncEngine(fake)
    wakeups = []

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wakeups.append(args[0]), original(*args))[1]
        return await asyncio.gather(*(_collect(engine, f"r{i}") for i in range(4)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for outputs in results:
        assert [o.finished for o in outputs] == [False] * 4 + [True]
        assert [o.step for o in outputs] == sorted(o.step for o in outputs)
    deliveries = [fn for fn in wakeups if getattr(fn, "__name__", "") == "put_all"]
    assert len(deliveries) == fake.step_count  # one per step, not one per request per step


def test_leaving_a_stream_early_aborts_the_request():
    fake = _StepEngine(steps=1000)
    engine = AsyncEngine(fake)

    async def main():
        async with contextlib.aclosing(engine.stream("gone", _StepEngine.add, "gone")) as outputs:
            async for _ in outputs:
                break
        for _ in range(100):
            if fake.aborted:
                return
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert fake.aborted == ["gone"]


def test_a_call_raises_its_error_in_the_caller():
    engine = AsyncEngine(_StepEngine(steps=1))

    def fail(_engine):
        raise ValueError("bad request")

    try:
        with pytest.raises(ValueError, match="bad request"):
            asyncio.run(engine.call(fail))
    finally:
        engine.shutdown()
