"""The engine on its own thread, driven from asyncio: services stream outputs without blocking their loop.

Every engine mutation runs on the engine thread (between steps), so the scheduler and block pool
stay single-threaded; asyncio callers get results through futures and per-request queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from common.engine.engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.engine.stats import EngineStats, StepClock

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineClosedError(RuntimeError):
    """The engine thread stopped (shutdown or a crash); nothing more will run."""


class AsyncEngine:
    """Runs ``LLMEngine.step`` in a loop on a dedicated thread while any request is unfinished."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self.step_clock = StepClock()  # written by the engine thread only; read a snapshot()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- asyncio side
    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_blocks(self) -> int:
        return self.engine.kv_cache_manager.pool.num_blocks

    @property
    def kv_cache(self):
        return self.engine.kv_cache

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(engine, *args, **kwargs)`` on the engine thread between steps; its exception is re-raised here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine, *args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(set_future_exception, future, error)
            else:
                loop.call_soon_threadsafe(set_future_result, future, result)

        self._submit(command)
        return await future

    async def stream(self, request_id: str, fn: Callable[..., str], /, *args: Any,
                     **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Start ``request_id`` with ``fn(engine, *args, **kwargs)`` and yield its outputs until finished.

        Leaving the iterator early (client gone, task cancelled) aborts the request and frees its blocks.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def start(engine: LLMEngine) -> str:
            return self._register(start_request(engine, request_id, fn, args, kwargs), loop, outputs)

        await self.call(start)
        finished = False
        try:
            async for item in outputs_until_finished(outputs):
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.is_alive:
                self._submit(lambda: self.engine.abort_request(request_id))

    async def stats(self) -> EngineStats:
        return await self.call(LLMEngine.stats)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ----------------------------------------------------------------- engine thread
    def _register(self, request_id: str, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue) -> str:
        self._streams[request_id] = (loop, outputs)
        return request_id

    def _submit(self, command: Callable[[], None]) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineClosedError(f"engine loop is not running: {self._error!r}")
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    if outputs:
                        self.step_clock.record(time.perf_counter() - started, len(outputs))
                    self._deliver(outputs)
                    if not outputs and not self.engine.step_in_flight:  # nothing schedulable now
                        self._wake.wait(timeout=0.005)
                        self._wake.clear()
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as error:  # noqa: BLE001 - reported to every waiting stream
            logger.exception("engine loop crashed")
            self._error = error
            for loop, outputs in list(self._streams.values()):
                loop.call_soon_threadsafe(outputs.put_nowait, EngineClosedError(f"engine crashed: {error!r}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        deliver_step(self._streams, outputs)


def start_request(engine: LLMEngine, request_id: str, fn: Callable[..., str], args: tuple, kwargs: dict) -> str:
    """Run a stream's start call on the engine side; it must start exactly ``request_id`` (its outputs are routed
    by that id), else what it started is aborted and this raises."""
    started = fn(engine, *args, **kwargs)
    if started != request_id:
        engine.abort_request(started)
        raise RuntimeError(f"the engine started {started!r}, not {request_id!r}")
    return started


async def outputs_until_finished(outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
    """A stream's queued outputs up to its finished one; an exception put in the queue is raised here."""
    while True:
        item = await outputs.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return


def deliver_step(streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]],
                 outputs: list[RequestOutput]) -> None:
    """Hand one step's outputs to their streams with one wake-up per event loop, not one per request (each
    wake-up is a syscall and a GIL hand-off that the next step would otherwise wait behind)."""
    batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
    for output in outputs:
        target = streams.get(output.request_id)
        if target is not None:
            loop, stream = target
            batches.setdefault(loop, []).append((stream, output))
    for loop, batch in batches.items():
        loop.call_soon_threadsafe(put_all, batch)


def put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    """On the event loop: one step's outputs into their streams' queues."""
    for stream, output in batch:
        stream.put_nowait(output)


def set_future_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def set_future_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
