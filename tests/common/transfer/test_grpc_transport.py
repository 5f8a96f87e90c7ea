"""The grpc transport end to end through a real grpc.aio server on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.config import TransferConfig
from common.transfer import GrpcKVSender, KVTransferHeader, TransferResult
from common.transfer.grpc_transport import ChunkFilter
from tests.common.transfer.conftest import Recorder, random_kv, run, serving

CHUNK = 4096  # small chunks, so modest tensors span many messages


def config(chunk_bytes: int = CHUNK) -> TransferConfig:
    return TransferConfig(transport="grpc", grpc_chunk_bytes=chunk_bytes, timeout_s=5.0)


async def push(
    kv: torch.Tensor, on_kv: Recorder, chunk_filter: ChunkFilter | None = None, request_id: str = "req-1"
) -> TransferResult:
    """Send ``kv`` once to a fresh receiver; block ids are 10, 11, ... (one per kv.shape[2])."""
    async with serving(on_kv, CHUNK) as address:
        sender = GrpcKVSender(config(), chunk_filter=chunk_filter)
        try:
            block_ids = list(range(10, 10 + kv.shape[2]))
            return await sender.send(address, request_id, "resv-1", block_ids, kv)
        finally:
            await sender.close()


SHAPES = [(1, 2, 1, 4, 1, 8), (2, 2, 3, 16, 2, 8), (4, 2, 5, 16, 2, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_round_trip_is_bit_identical(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    kv = random_kv(shape, dtype, seed=sum(shape))
    recorder = Recorder()
    result = run(push(kv, recorder))
    assert result.ok, result.error
    assert result.bytes == kv.numel() * kv.element_size()
    [(header, got)] = recorder.calls
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert header.request_id == "req-1" and header.reservation_id == "resv-1"
    assert header.block_ids == tuple(range(10, 10 + shape[2]))
    assert header.transport == "grpc" and header.num_bytes == result.bytes


def test_multi_chunk_stream() -> None:
    kv = random_kv((4, 2, 5, 16, 2, 16), torch.bfloat16)
    assert kv.numel() * kv.element_size() > 3 * CHUNK
    seen: list[int] = []
    recorder = Recorder()

    def count(index: int, data: bytes) -> bytes:
        seen.append(index)
        return data

    assert run(push(kv, recorder, count)).ok
    assert len(seen) > 3 and torch.equal(recorder.calls[0][1], kv)


def test_corrupted_byte_fails_checksum_and_skips_on_kv() -> None:
    def corrupt(index: int, data: bytes) -> bytes:
        if index != 2:
            return data
        flipped = bytearray(data)
        flipped[100] ^= 0x10
        return bytes(flipped)

    recorder = Recorder()
    result = run(push(random_kv((2, 2, 4, 16, 2, 16), torch.float32), recorder, corrupt))
    assert not result.ok and "checksum" in result.error
    assert result.bytes == 0 and recorder.calls == []


@pytest.mark.parametrize("cut", ["drop", "truncate"])
def test_truncated_stream_is_short(cut: str) -> None:
    def truncate(index: int, data: bytes) -> bytes:
        if index != 1:
            return data
        return b"" if cut == "drop" else data[:-7]

    recorder = Recorder()
    result = run(push(random_kv((2, 2, 4, 16, 2, 16), torch.float32), recorder, truncate))
    assert not result.ok and "short" in result.error
    assert recorder.calls == []


def test_oversized_stream_is_rejected() -> None:
    recorder = Recorder()
    result = run(push(random_kv((2, 2, 4, 16, 2, 16), torch.float32), recorder, lambda i, d: d + b"\x01"))
    assert not result.ok and "oversized" in result.error
    assert recorder.calls == []


def test_on_kv_value_error_becomes_the_reply() -> None:
    async def refuse(header: KVTransferHeader, kv: torch.Tensor) -> None:
        raise ValueError(f"unknown reservation {header.reservation_id}")

    async def go() -> TransferResult:
        async with serving(refuse, CHUNK) as address:
            sender = GrpcKVSender(config())
            try:
                return await sender.send(address, "r", "resv-9", [0], random_kv((1, 2, 1, 4, 1, 8), torch.float32))
            finally:
                await sender.close()

    result = run(go())
    assert not result.ok and result.error == "unknown reservation resv-9"


def test_header_block_ids_must_match_shape() -> None:
    async def go() -> TransferResult:
        async with serving(Recorder(), CHUNK) as address:
            sender = GrpcKVSender(config())
            try:
                return await sender.send(address, "r", "v", [0, 1, 2], random_kv((1, 2, 1, 4, 1, 8), torch.float32))
            finally:
                await sender.close()

    result = run(go())
    assert not result.ok and "block ids" in result.error


def test_unreachable_receiver_is_a_failed_result() -> None:
    async def go() -> TransferResult:
        sender = GrpcKVSender(TransferConfig(grpc_chunk_bytes=CHUNK, timeout_s=0.5))
        try:
            return await sender.send("127.0.0.1:1", "r", "v", [0], random_kv((1, 2, 1, 4, 1, 8), torch.float32))
        finally:
            await sender.close()

    result = run(go())
    assert not result.ok and result.error.startswith("grpc ")


def test_concurrent_transfers_overlap() -> None:
    """A slow on_kv for one request does not hold back another request's transfer to the same receiver."""
    slow_entered = asyncio.Event()
    release_slow = asyncio.Event()
    done: list[str] = []

    async def on_kv(header: KVTransferHeader, kv: torch.Tensor) -> None:
        if header.request_id == "slow":
            slow_entered.set()
            await release_slow.wait()
        done.append(header.request_id)

    async def go() -> tuple[TransferResult, TransferResult]:
        async with serving(on_kv, CHUNK) as address:
            sender = GrpcKVSender(config())
            try:
                slow_kv = random_kv((2, 2, 4, 16, 2, 16), torch.bfloat16, seed=1)
                fast_kv = random_kv((2, 2, 4, 16, 2, 16), torch.bfloat16, seed=2)
                slow = asyncio.ensure_future(sender.send(address, "slow", "a", range(4), slow_kv))
                await asyncio.wait_for(slow_entered.wait(), 5)
                fast = await sender.send(address, "fast", "b", range(4), fast_kv)
                assert done == ["fast"]  # finished while "slow" is still inside on_kv
                release_slow.set()
                return await slow, fast
            finally:
                await sender.close()

    slow_result, fast_result = run(go())
    assert slow_result.ok and fast_result.ok
    assert done == ["fast", "slow"]
