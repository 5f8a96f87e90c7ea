"""The pair transport's persistent control channel over gloo on CPU: the same code as NCCL, no GPU.

One process plays both ends (sender: rank 0, receiver: rank 1 behind a real grpc.aio server); gloo moves the
bytes. Checks: several transfers in flight complete with the right bytes in the right places; a refused
transfer or a checksum mismatch fails alone while the channel stays up; an oversized header breaks the
channel and the next send opens a new generation; a receiver that dies with transfers in flight fails every
one of them (nothing left pending) and a new receiver is reached by the next send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
import torch

from common.config import TransferConfig
from common.transfer.base import KVReceiver, KVTransferHeader
from common.transfer.nccl_transport import NcclKVSender, NcclReceiver
from common.transfer.pair_backend import GlooBackend
from tests.common.transfer.conftest import random_kv, run

CONFIG = TransferConfig(transport="nccl", timeout_s=8.0)
SHAPE = (2, 2, 3, 4, 2, 8)
MAX_BYTES = 64 * 1024


class Sink:
    """An ``on_kv`` that records verified tensors, refuses reservation "unknown", and can be held."""

    def __init__(self) -> None:
        self.received: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, header: KVTransferHeader, kv: torch.Tensor) -> None:
        if header.reservation_id == "unknown":
            raise ValueError("unknown reservation")
        await self.release.wait()
        self.received[header.request_id] = kv.clone()
        self.order.append(header.request_id)


@asynccontextmanager
async def receiving(sink: Sink, port: int = 0) -> AsyncIterator[tuple[str, grpc.aio.Server]]:
    server = grpc.aio.server()
    nccl = NcclReceiver("cpu", CONFIG.timeout_s, backend=GlooBackend())
    KVReceiver(sink, nccl=nccl, max_bytes=MAX_BYTES).add_to_server(server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        await server.stop(grace=None)
        await nccl.close()


class CorruptibleSender(NcclKVSender):
    corrupt: set[int] = set()  # noqa: RUF012 - per-test override

    def _checksum_sums(self, kv: torch.Tensor) -> torch.Tensor:
        sums = super()._checksum_sums(kv)
        return sums + 1 if int(kv.reshape(-1)[0].item() * 1000) in self.corrupt else sums


def sender() -> CorruptibleSender:
    return CorruptibleSender(CONFIG, "prefill-test", "cpu", backend=GlooBackend())


def kv(seed: int) -> torch.Tensor:
    return random_kv(SHAPE, torch.float32, seed=seed)


def ids() -> list[int]:
    return list(range(SHAPE[2]))


def test_many_in_flight_arrive_intact_on_one_channel() -> None:
    async def scenario() -> None:
        sink = Sink()
        async with receiving(sink) as (address, _):
            tx = sender()
            try:
                results = await asyncio.gather(*(tx.send(address, f"r{i}", "ok", ids(), kv(i)) for i in range(8)))
                generation = tx._pairs[address].generation
            finally:
                await tx.close()
        assert all(r.ok for r in results), results
        assert generation == 1  # one channel carried all eight
        for i in range(8):
            assert torch.equal(sink.received[f"r{i}"], kv(i))

    run(scenario(), timeout=60)


def test_refusal_and_checksum_mismatch_fail_alone() -> None:
    async def scenario() -> None:
        sink = Sink()
        async with receiving(sink) as (address, _):
            tx = sender()
            bad = kv(5)
            tx.corrupt = {int(bad.reshape(-1)[0].item() * 1000)}
            try:
                results = await asyncio.gather(
                    tx.send(address, "a", "ok", ids(), kv(1)),
                    tx.send(address, "refused", "unknown", ids(), kv(2)),
                    tx.send(address, "corrupt", "ok", ids(), bad),
                    tx.send(address, "b", "ok", ids(), kv(3)),
                )
                generation = tx._pairs[address].generation
            finally:
                await tx.close()
        assert [r.ok for r in results] == [True, False, False, True], results
        assert "unknown reservation" in results[1].error
        assert "checksum mismatch" in results[2].error
        assert set(sink.received) == {"a", "b"}  # the corrupt bytes never reached on_kv
        assert generation == 1  # neither failure broke the channel

    run(scenario(), timeout=60)


def test_oversized_header_breaks_the_channel_and_the_next_send_reopens() -> None:
    async def scenario() -> None:
        sink = Sink()
        big = random_kv((2, 2, 64, 16, 2, 8), torch.float32)  # 128 KiB > MAX_BYTES
        async with receiving(sink) as (address, _):
            tx = sender()
            try:
                too_big = await tx.send(address, "big", "ok", list(range(64)), big)
                after = await tx.send(address, "after", "ok", ids(), kv(7))
                generation = tx._pairs[address].generation
            finally:
                await tx.close()
        assert not too_big.ok and "exceeds" in too_big.error
        assert after.ok, after
        assert generation == 2
        assert torch.equal(sink.received["after"], kv(7))

    run(scenario(), timeout=60)


def test_receiver_dying_fails_every_in_flight_transfer_then_recovers() -> None:
    async def scenario() -> None:
        sink = Sink()
        sink.release.clear()  # on_kv holds: the transfers stay in flight, unacked
        tx = sender()
        try:
            async with receiving(sink) as (address, server):
                sends = [asyncio.ensure_future(tx.send(address, f"r{i}", "ok", ids(), kv(i))) for i in range(4)]
                await asyncio.sleep(1.0)
                assert not any(s.done() for s in sends)
                await server.stop(grace=None)  # the receiver dies with four transfers in flight
                results = await asyncio.gather(*sends)
                assert tx._pairs[address].channel is None
            assert not any(r.ok for r in results), results
            sink = Sink()
            port = int(address.rsplit(":", 1)[1])
            async with receiving(sink, port) as (address, _):
                again = await tx.send(address, "again", "ok", ids(), kv(9))
        finally:
            await tx.close()
        assert again.ok, again
        assert torch.equal(sink.received["again"], kv(9))

    run(scenario(), timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_in_one_process_many_in_flight_and_a_refusal() -> None:
    """The production backend: rank 0 on cuda:0, rank 1 on cuda:1 of one process, 4 in flight + a refusal."""
    from common.transfer.pair_backend import NcclBackend

    async def scenario() -> None:
        sink = Sink()
        server = grpc.aio.server()
        nccl = NcclReceiver("cuda:1", CONFIG.timeout_s, backend=NcclBackend(torch.device("cuda:1"), True))
        KVReceiver(sink, device="cuda:1", nccl=nccl).add_to_server(server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        tx = NcclKVSender(CONFIG, "prefill-gpu", "cuda:0")
        try:
            sends = [tx.send(address, f"r{i}", "ok", ids(), kv(i).cuda(0)) for i in range(4)]
            sends.append(tx.send(address, "refused", "unknown", ids(), kv(9).cuda(0)))
            results = await asyncio.gather(*sends)
            generation = tx._pairs[address].generation
        finally:
            await tx.close()
            await server.stop(grace=None)
            await nccl.close()
        assert [r.ok for r in results] == [True] * 4 + [False], results
        assert generation == 1
        for i in range(4):
            assert sink.received[f"r{i}"].device == torch.device("cuda:1")
            assert torch.equal(sink.received[f"r{i}"].cpu(), kv(i))

    run(scenario(), timeout=120)
