"""The decode service's reservations receiving pair transfers over gloo on CPU: straight into the reserved
blocks when their ids form few runs, through a buffer and the BlockWriter otherwise.

One process plays both ends (sender: rank 0; receiver: rank 1 behind a real grpc.aio server whose
``NcclReceiver`` maps reservations with ``DecodeService.place_kv``); the service runs on a stand-in runtime
whose cache is a CPU tensor filled with a sentinel, so untouched blocks are visible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
import torch

from common.config import TransferConfig
from common.transfer.base import KVReceiver, KVTransferHeader
from common.transfer.nccl_transport import NcclKVSender, NcclReceiver
from common.transfer.pair_backend import GlooBackend
from services.decode.service import DecodeService, Reservation
from tests.common.transfer.conftest import hosting, random_kv, run

CONFIG = TransferConfig(transport="nccl", timeout_s=8.0)
CACHE_SHAPE = (2, 2, 12, 4, 2, 8)  # [layers, 2, blocks, block_size, heads, dim]
SENTINEL = -7.0


def kv_for(num_blocks: int, seed: int) -> torch.Tensor:
    return random_kv((*CACHE_SHAPE[:2], num_blocks, *CACHE_SHAPE[3:]), torch.float32, seed=seed)


class CorruptibleSender(NcclKVSender):
    """Sends wrong in-band sums for the tensors whose first value is in ``corrupt``."""

    corrupt: set[float] = set()  # noqa: RUF012 - per-test override

    def _checksum_sums(self, kv: torch.Tensor) -> torch.Tensor:
        sums = super()._checksum_sums(kv)
        return sums + 1 if float(kv.reshape(-1)[0]) in self.corrupt else sums


def decode_service() -> DecodeService:
    """A DecodeService on a stand-in runtime (no engine: reservations are added directly)."""
    cache = torch.full(CACHE_SHAPE, SENTINEL)
    runtime = SimpleNamespace(
        engine=SimpleNamespace(kv_cache=cache),
        settings=SimpleNamespace(transfer=CONFIG),
        device="cpu",
        metrics=None,
        kv_cache_sharded=False,
    )
    return DecodeService(runtime)


def reserve(service: DecodeService, reservation_id: str, block_ids: list[int]) -> Reservation:
    reservation = Reservation(reservation_id, tuple(block_ids), time.monotonic() + 60)
    service.reservations[reservation_id] = reservation
    return reservation


class GatedOnKV:
    """The service's ``on_kv`` (the buffered path), recording calls and held while ``gate`` is clear."""

    def __init__(self, service: DecodeService) -> None:
        self.service = service
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, header: KVTransferHeader, kv: torch.Tensor) -> None:
        self.calls.append(header.reservation_id)
        await self.gate.wait()
        await self.service.on_kv(header, kv)


@asynccontextmanager
async def receiving(
    service: DecodeService, on_kv: GatedOnKV, timeout_s: float = CONFIG.timeout_s
) -> AsyncIterator[str]:
    nccl = NcclReceiver("cpu", timeout_s, backend=GlooBackend(), place=service.place_kv)
    try:
        async with hosting(KVReceiver(on_kv, nccl=nccl)) as address:
            yield address
    finally:
        await nccl.close()
        await service.close()


def sender() -> CorruptibleSender:
    return CorruptibleSender(CONFIG, "prefill-test", "cpu", backend=GlooBackend())


def untouched(cache: torch.Tensor, written: list[int]) -> bool:
    others = [b for b in range(cache.shape[2]) if b not in written]
    return bool((cache[:, :, others] == SENTINEL).all())


def test_direct_receive_lands_in_the_contiguous_reserved_blocks_without_on_kv() -> None:
    async def scenario() -> None:
        service = decode_service()
        on_kv = GatedOnKV(service)
        reservation = reserve(service, "resv", [3, 4, 5, 6])
        kv = kv_for(3, seed=1)  # fewer blocks than reserved, like a prompt whose last token is decoded
        async with receiving(service, on_kv) as address:
            tx = sender()
            try:
                result = await tx.send(address, "req", "resv", [3, 4, 5], kv)
            finally:
                await tx.close()
        cache = service.block_writer.cache
        assert result.ok, result
        assert on_kv.calls == []  # no buffer, no scatter: the bytes landed in place
        assert reservation.filled and reservation.writing.done()
        assert torch.equal(cache[:, :, 3:6], kv)
        assert untouched(cache, [3, 4, 5])

    run(scenario(), timeout=30)


def test_two_runs_land_directly_and_scattered_ids_fall_back_to_the_block_writer() -> None:
    async def scenario() -> None:
        service = decode_service()
        on_kv = GatedOnKV(service)
        two_runs = reserve(service, "two", [9, 10, 0, 1])
        scattered = reserve(service, "scattered", [8, 6, 4, 2, 11])  # five runs: more than MAX_DIRECT_RUNS
        first, second = kv_for(4, seed=2), kv_for(5, seed=3)
        async with receiving(service, on_kv) as address:
            tx = sender()
            try:
                results = [
                    await tx.send(address, "a", "two", [9, 10, 0, 1], first),
                    await tx.send(address, "b", "scattered", [8, 6, 4, 2, 11], second),
                ]
            finally:
                await tx.close()
        cache = service.block_writer.cache
        assert all(r.ok for r in results), results
        assert on_kv.calls == ["scattered"]
        assert two_runs.filled and scattered.filled
        assert torch.equal(cache[:, :, [9, 10, 0, 1]], first)
        assert torch.equal(cache[:, :, [8, 6, 4, 2, 11]], second)
        assert untouched(cache, [9, 10, 0, 1, 8, 6, 4, 2, 11])

    run(scenario(), timeout=30)


def test_corrupt_direct_transfer_is_refused_unfilled_and_the_channel_carries_the_retry() -> None:
    async def scenario() -> None:
        service = decode_service()
        on_kv = GatedOnKV(service)
        reservation = reserve(service, "resv", [2, 3, 4])
        bad, good = kv_for(3, seed=4), kv_for(3, seed=5)
        async with receiving(service, on_kv) as address:
            tx = sender()
            tx.corrupt = {float(bad.reshape(-1)[0])}
            try:
                refused = await tx.send(address, "req", "resv", [2, 3, 4], bad)
                assert not reservation.filled and reservation.writing.done()  # refused and unclaimed
                retried = await tx.send(address, "req", "resv", [2, 3, 4], good)
                generation = tx._pairs[address].generation
            finally:
                await tx.close()
        assert not refused.ok and "checksum mismatch" in refused.error
        assert retried.ok, retried
        assert generation == 1  # the mismatch failed alone: the same channel carried the retry
        assert reservation.filled and on_kv.calls == []
        assert torch.equal(service.block_writer.cache[:, :, 2:5], good)

    run(scenario(), timeout=30)


def test_a_second_transfer_into_a_claimed_reservation_is_refused() -> None:
    async def scenario() -> None:
        service = decode_service()
        reservation = reserve(service, "resv", [0, 1])
        header = KVTransferHeader.describe("req", "resv", [0, 1], kv_for(2, seed=6), "nccl", 0)
        placement = service.place_kv(header)
        assert placement is not None and service.place_kv(header) is None  # claimed once
        with pytest.raises(ValueError, match="being written"):
            await service.on_kv(header, kv_for(2, seed=6))
        placement.abandon()
        assert not reservation.filled and service.place_kv(header) is not None
        await service.close()

    run(scenario(), timeout=30)


def test_many_in_flight_mixed_direct_and_buffered_complete_in_any_order() -> None:
    async def scenario() -> None:
        service = decode_service()
        on_kv = GatedOnKV(service)
        # s1: five runs, buffered; d3: three runs of one block, still direct.
        plans = {"s1": [11, 9, 7, 5, 3], "d1": [0, 1], "d2": [4], "d3": [10, 8, 6]}
        reservations = {rid: reserve(service, rid, ids) for rid, ids in plans.items()}
        tensors = {rid: kv_for(len(ids), seed=10 + i) for i, (rid, ids) in enumerate(plans.items())}
        async with receiving(service, on_kv) as address:
            tx = sender()
            try:
                on_kv.gate.clear()  # hold the buffered one: the direct ones posted after it finish first
                sends = [asyncio.ensure_future(tx.send(address, rid, rid, plans[rid], tensors[rid])) for rid in plans]
                while not all(reservations[rid].filled for rid in ("d1", "d2", "d3")):
                    await asyncio.sleep(0.01)
                assert not reservations["s1"].filled and on_kv.calls == ["s1"]
                on_kv.gate.set()
                results = await asyncio.gather(*sends)
                generation = tx._pairs[address].generation
            finally:
                await tx.close()
        assert all(r.ok for r in results), results
        assert generation == 1
        cache = service.block_writer.cache
        for rid, ids in plans.items():
            assert reservations[rid].filled
            assert torch.equal(cache[:, :, ids], tensors[rid])
        assert untouched(cache, [b for ids in plans.values() for b in ids])

    run(scenario(), timeout=30)


class SilentBackend(GlooBackend):
    """Writes descriptors but never sends the data: the receiver's recvs into the blocks never complete."""

    def post_send(self, group, kv, pieces, tag, sums_of):  # noqa: ANN001, ANN201 - the PairBackend signature
        return lambda: None


def test_a_direct_receive_that_never_completes_times_out_and_releases_its_claim() -> None:
    async def scenario() -> None:
        service = decode_service()
        reservation = reserve(service, "resv", [4, 5])
        async with receiving(service, GatedOnKV(service), timeout_s=1.0) as address:
            quick = TransferConfig(transport="nccl", timeout_s=1.5)
            tx = NcclKVSender(quick, "prefill-test", "cpu", backend=SilentBackend())
            try:
                result = await tx.send(address, "req", "resv", [4, 5], kv_for(2, seed=7))
            finally:
                await tx.close()
            while not reservation.writing.done():  # the receiver's own deadline abandons the placement
                await asyncio.sleep(0.05)
        assert not result.ok and not reservation.filled
        assert untouched(service.block_writer.cache, [])  # nothing arrived
        header = KVTransferHeader.describe("req", "resv", [4, 5], kv_for(2, seed=7), "nccl", 0)
        assert service.place_kv(header) is not None  # the claim is gone: a retry may land there

    run(scenario(), timeout=30)
