"""Async plumbing for the HTTP handlers: merge the n choices' streams, stop work when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (stream index, item) in arrival order from all streams; the first error cancels the rest.

    Leaving early (client disconnected) cancels every producer, which cancels their RPCs.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except BaseException as error:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((index, error))
            return
        await queue.put((index, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def until_disconnected(is_disconnected: Callable[[], Awaitable[bool]], work: Awaitable[T],
                             poll_s: float = 0.25) -> T | None:
    """Run ``work``; cancel it (and return None) as soon as the client is gone."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if not done and await is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        return task.result()
    finally:
        if not task.done():
            task.cancel()
