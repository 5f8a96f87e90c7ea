"""Helpers for KV transfer tests: bounded asyncio runs, random KV tensors, a real grpc.aio receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
import torch

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
    server = grpc.aio.server(options=grpc_message_options(chunk_bytes))
    KVReceiver(on_kv, device=device).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
