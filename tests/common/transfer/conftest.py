"""Helpers for KV transfer tests: bounded asyncio runs, random KV tensors, a real grpc.aio receiver, and the
two-process harness of the NCCL GPU tests (a receiver child on GPU 1, the sender in the test process)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import torch

from common.config import TransferConfig
from common.transfer.base import KVReceiver, KVTransferHeader, OnKV, grpc_message_options

T = TypeVar("T")
TEST_TIMEOUT_S = 10.0


def run(coro: Awaitable[T], timeout: float = TEST_TIMEOUT_S) -> T:
    """Run ``coro`` on a fresh event loop, failing the test if it takes longer than ``timeout``."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def random_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values with no zeros, so a dropped or zero-filled byte range can never pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator) + 0.5
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (values * sign).to(dtype)


class Recorder:
    """An ``on_kv`` that records what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[KVTransferHeader, torch.Tensor]] = []

    async def __call__(self, header: KVTransferHeader, kv: torch.Tensor) -> None:
        self.calls.append((header, kv))


@asynccontextmanager
async def serving(on_kv: OnKV, chunk_bytes: int, device: str = "cpu") -> AsyncIterator[str]:
    """A real grpc.aio server on a free 127.0.0.1 port hosting one KVReceiver; yields its address."""
    async with hosting(KVReceiver(on_kv, device=device), grpc_message_options(chunk_bytes)) as address:
        yield address


@asynccontextmanager
async def hosting(receiver: KVReceiver, options: list[tuple[str, int]] | None = None) -> AsyncIterator[str]:
    """``receiver`` on a real grpc.aio server on a free 127.0.0.1 port; yields its address."""
    server = grpc.aio.server(options=options)
    receiver.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def kv_digest(kv: torch.Tensor) -> str:
    """A digest of the tensor's bytes (child processes queue this, not the bytes: large queue items would block
    the child's exit until the parent reads them)."""
    return hashlib.sha256(kv.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def corruptible_nccl_sender(*args: Any) -> Any:
    """An ``NcclKVSender(*args)`` whose in-band checksum sums are off by one while its ``corrupt`` is set."""
    from common.transfer.nccl_transport import NcclKVSender

    class CorruptibleSender(NcclKVSender):
        corrupt = False

        def _checksum_sums(self, kv: torch.Tensor) -> torch.Tensor:
            sums = super()._checksum_sums(kv)
            return sums + 1 if self.corrupt else sums

    return CorruptibleSender(*args)


# The receiver a child process serves: built on the child's event loop from the queue its events go to.
BuildReceiver = Callable[[Any], KVReceiver]


def run_with_receiver_child(build: BuildReceiver, send_all: Callable[[str], Awaitable[T]]) -> tuple[T, list[Any]]:
    """Serve ``build(result_queue)`` in a spawned child until ``send_all(address)`` (run here, bounded) is done;
    returns its result and every item the child queued (a failure in the child is an ``("error", traceback)``).
    ``build`` must be a module-level function (spawn pickles it by name)."""
    import torch.multiprocessing as mp

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    ctx = mp.get_context("spawn")
    port_queue, result_queue, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    process = ctx.Process(target=_serve_in_child, args=(build, port_queue, result_queue, stop))
    process.start()
    try:
        port = port_queue.get(timeout=60)
        results = asyncio.run(asyncio.wait_for(send_all(f"127.0.0.1:{port}"), 120))
    finally:
        stop.set()
        process.join(30)
    items = []
    while not result_queue.empty():
        items.append(result_queue.get())
    return results, items


def _serve_in_child(build: BuildReceiver, port_queue: Any, result_queue: Any, stop: Any) -> None:
    try:
        asyncio.run(_serve_until_stopped(build, port_queue, result_queue, stop))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        result_queue.put(("error", traceback.format_exc()))


async def _serve_until_stopped(build: BuildReceiver, port_queue: Any, result_queue: Any, stop: Any) -> None:
    receiver = build(result_queue)
    server = grpc.aio.server(options=grpc_message_options(TransferConfig().grpc_chunk_bytes))
    receiver.add_to_server(server)
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await receiver.close()
    await server.stop(grace=None)
