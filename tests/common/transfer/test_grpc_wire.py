"""The gRPC KV wire: hand-serialized data chunks, the receiver's refusals of bad streams, pooled staging."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import grpc
import pytest
import torch

from common.config import TransferConfig
from common.metrics import WorkerMetrics
from common.transfer import GrpcKVSender, KVTransferHeader
from common.transfer.base import (
    KV_SERVICE,
    HostBufferPool,
    KVReceiver,
    OnKV,
    _assemble_stream,
    decode_kv_chunk,
    encode_data_chunk,
    grpc_message_options,
    stream_part_bounds,
)
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc
from tests.common.transfer.conftest import Recorder, random_kv, run, serving

CHUNK = 4096


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 2**21 + 3])
def test_encoded_data_chunk_is_protobufs_bytes_and_decodes_to_a_view(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = encode_data_chunk(memoryview(data))
    assert encoded == pb.KVChunk(data=data).SerializeToString()
    decoded = decode_kv_chunk(encoded)
    assert isinstance(decoded, memoryview) and decoded.tobytes() == data


def test_anything_but_one_data_field_is_parsed_by_protobuf() -> None:
    header = pb.KVChunk(header=pb.KVHeader(request_id="r", num_bytes=4))
    assert decode_kv_chunk(header.SerializeToString()) == header
    data_then_header = pb.KVChunk(data=b"abcd").SerializeToString() + header.SerializeToString()
    assert decode_kv_chunk(data_then_header) == header  # protobuf semantics: the last oneof field wins
    with pytest.raises(Exception):  # noqa: B017, PT011 - protobuf's DecodeError: a length past the end
        decode_kv_chunk(b"\x12\x05abc")


def header_message(kv: torch.Tensor, **changes: object) -> bytes:
    header = KVTransferHeader.for_tensor("req", "resv", range(kv.shape[2]), kv, "grpc").to_proto()
    for name, value in changes.items():
        setattr(header, name, value)
    return pb.KVChunk(header=header).SerializeToString()


def data_messages(kv: torch.Tensor) -> list[bytes]:
    raw = kv.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    return [encode_data_chunk(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK)]


async def push_raw(address: str, messages: Sequence[bytes]) -> pb.KVAck:
    """Send already-serialized ``KVChunk``s as they are (bad streams a GrpcKVSender never writes)."""
    async with grpc.aio.insecure_channel(address, options=grpc_message_options(CHUNK)) as channel:
        push = channel.stream_unary(
            f"/{KV_SERVICE}/PushKV", request_serializer=None, response_deserializer=pb.KVAck.FromString
        )
        return await push(iter(messages), timeout=5.0)


def refusal(messages_of: object, max_bytes: int | None = None) -> str:
    kv = random_kv((2, 2, 3, 16, 2, 8), torch.float32)
    recorder = Recorder()

    async def go() -> pb.KVAck:
        server = grpc.aio.server(options=grpc_message_options(CHUNK))
        KVReceiver(recorder, max_bytes=max_bytes).add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await push_raw(f"127.0.0.1:{port}", messages_of(kv))
        finally:
            await server.stop(grace=None)

    ack = run(go())
    assert not ack.ok and ack.bytes == 0 and recorder.calls == []
    return ack.error


def test_raw_stream_with_the_right_bytes_is_accepted() -> None:
    kv = random_kv((2, 2, 3, 16, 2, 8), torch.float32)
    recorder = Recorder()

    async def go() -> pb.KVAck:
        async with serving(recorder, CHUNK) as address:
            return await push_raw(address, [header_message(kv), *data_messages(kv)])

    ack = run(go())
    assert ack.ok and ack.bytes == kv.numel() * 4
    assert torch.equal(recorder.calls[0][1], kv)


def test_second_header_is_refused() -> None:
    error = refusal(lambda kv: [header_message(kv), *data_messages(kv)[:2], header_message(kv)])
    assert "second header" in error


def test_data_before_header_is_refused() -> None:
    assert "before its header" in refusal(lambda kv: [*data_messages(kv), header_message(kv)])


def test_missing_header_is_refused() -> None:
    assert "without a header" in refusal(lambda kv: [])


def test_inconsistent_header_is_refused() -> None:
    assert "num_bytes" in refusal(lambda kv: [header_message(kv, num_bytes=12), *data_messages(kv)])


def test_unknown_dtype_is_refused() -> None:
    assert "dtype" in refusal(lambda kv: [header_message(kv, dtype="complex64"), *data_messages(kv)])


def test_header_over_the_receiver_limit_is_refused_before_any_data() -> None:
    error = refusal(lambda kv: [header_message(kv), *data_messages(kv)], max_bytes=1000)
    assert "exceeds the receiver limit 1000" in error


def test_checksum_mismatch_in_the_header_is_refused() -> None:
    assert "checksum" in refusal(lambda kv: [header_message(kv, checksum=12345), *data_messages(kv)])


def test_protobuf_client_still_works() -> None:
    """A sender using the generated stub (protobuf-serialized chunks) speaks the same wire."""
    kv = random_kv((1, 2, 2, 4, 1, 8), torch.bfloat16)
    recorder = Recorder()
    raw = kv.view(torch.uint8).reshape(-1).numpy().tobytes()
    header = KVTransferHeader.for_tensor("req", "resv", [3, 4], kv, "grpc").to_proto()
    chunks = [pb.KVChunk(header=header)] + [pb.KVChunk(data=raw[i : i + 50]) for i in range(0, len(raw), 50)]

    async def go() -> pb.KVAck:
        async with serving(recorder, CHUNK) as address, grpc.aio.insecure_channel(address) as channel:
            return await pb_grpc.KVTransferStub(channel).PushKV(iter(chunks), timeout=5.0)

    assert run(go()).ok and torch.equal(recorder.calls[0][1], kv)


def test_pool_reuses_buffers_and_keeps_at_most_its_capacity_idle() -> None:
    pool = HostBufferPool(capacity_bytes=3 * HostBufferPool.GRANULE, pinned=False)
    first = pool.take(1000)
    ptr = first.data_ptr()
    assert first.numel() == 1000 and pool.leased == 1
    pool.give(first)
    second = pool.take(HostBufferPool.GRANULE)  # the same granule-sized block fits
    assert second.data_ptr() == ptr and second.numel() == HostBufferPool.GRANULE
    third = pool.take(10)  # the idle list is empty: a new block
    assert third.data_ptr() != ptr
    big = pool.take(3 * HostBufferPool.GRANULE)
    huge = pool.take(4 * HostBufferPool.GRANULE)
    for buffer in (second, third, huge):
        pool.give(buffer)
    assert pool.leased == 1 and pool.idle_bytes == 2 * HostBufferPool.GRANULE  # huge alone exceeds the cap
    big_ptr = big.data_ptr()
    pool.give(big)  # makes room by freeing the least recently returned blocks
    assert pool.leased == 0 and pool.idle_bytes == 3 * HostBufferPool.GRANULE
    assert pool.take(HostBufferPool.GRANULE + 1).data_ptr() == big_ptr


def pooled_receiver(on_kv: Recorder, pool: HostBufferPool) -> KVReceiver:
    """A CPU receiver staged through ``pool`` like a CUDA one (only to watch the pool: on CPU the staged
    buffer would be handed to on_kv, which is why real CPU receivers do not pool)."""
    receiver = KVReceiver(on_kv)
    receiver._host_pool = pool
    return receiver


@pytest.mark.parametrize("cut", ["none", "short", "corrupt", "cancel"])
def test_staging_buffer_goes_back_to_the_pool_whatever_the_outcome(cut: str) -> None:
    kv = random_kv((2, 2, 4, 16, 2, 16), torch.float32)
    pool = HostBufferPool(capacity_bytes=2**30, pinned=False)
    recorder = Recorder()
    stalled = asyncio.Event()

    async def messages() -> object:
        data = data_messages(kv)
        yield header_message(kv)
        for index, message in enumerate(data):
            if index == 2 and cut == "short":
                return
            if index == 2 and cut == "corrupt":
                message = message[:-1] + bytes([message[-1] ^ 1])
            if index == 2 and cut == "cancel":
                stalled.set()
                await asyncio.sleep(30)
            yield message

    async def go() -> pb.KVAck | None:
        server = grpc.aio.server(options=grpc_message_options(CHUNK))
        pooled_receiver(recorder, pool).add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                push = channel.stream_unary(f"/{KV_SERVICE}/PushKV", response_deserializer=pb.KVAck.FromString)
                call = push(messages(), timeout=5.0)
                if cut != "cancel":
                    return await call
                await stalled.wait()
                await asyncio.sleep(0.2)  # the receiver holds a staging buffer now
                assert pool.leased == 1
                call.cancel()
                for _ in range(100):  # the servicer sees the cancellation asynchronously
                    if pool.leased == 0:
                        break
                    await asyncio.sleep(0.02)
                return None
        finally:
            await server.stop(grace=None)

    ack = run(go())
    assert pool.leased == 0 and pool.idle_bytes == HostBufferPool.GRANULE
    if cut == "none":
        assert ack.ok and len(recorder.calls) == 1
    else:
        assert recorder.calls == [] and (ack is None or not ack.ok)


def test_sender_stages_nothing_for_a_cpu_tensor_and_its_pool_follows_the_config() -> None:
    config = TransferConfig(grpc_chunk_bytes=CHUNK, grpc_host_pool_bytes=123 * 2**20, timeout_s=5.0)
    sender = GrpcKVSender(config)
    kv = random_kv((1, 2, 2, 4, 1, 8), torch.float32)

    async def go() -> bool:
        async with serving(Recorder(), CHUNK) as address:
            try:
                return (await sender.send(address, "r", "v", [0, 1], kv)).ok
            finally:
                await sender.close()

    assert run(go())
    assert sender._host_pool.leased == 0 and sender._host_pool.idle_bytes == 0
    assert sender._host_pool._capacity == 123 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_cuda_round_trip_returns_both_staging_buffers() -> None:
    kv = random_kv((2, 2, 4, 16, 2, 16), torch.bfloat16).cuda()
    recorder = Recorder()
    config = TransferConfig(grpc_chunk_bytes=CHUNK, timeout_s=10.0)

    async def go() -> object:
        async with serving(recorder, CHUNK, device="cuda") as address:
            sender = GrpcKVSender(config)
            try:
                results = [await sender.send(address, f"r{i}", "v", range(4), kv) for i in range(3)]
            finally:
                await sender.close()
            return results, sender._host_pool

    results, sender_pool = run(go())
    assert all(r.ok for r in results) and len(recorder.calls) == 3
    assert all(torch.equal(got, kv) for _, got in recorder.calls)
    assert sender_pool.leased == 0 and sender_pool.idle_bytes == HostBufferPool.GRANULE  # one block, reused


def test_grpc_transfers_are_counted_in_the_worker_metrics_on_both_ends() -> None:
    """Sender result and receiver outcome of real gRPC transfers land in tandem_kv_transfer_* (bytes, seconds)."""
    prefill, decode = WorkerMetrics("m", "prefill"), WorkerMetrics("m", "decode")
    kv = random_kv((2, 2, 4, 16, 2, 16), torch.float32)

    def corrupt(index: int, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if index == 1 else data

    async def go() -> None:
        server = grpc.aio.server(options=grpc_message_options(CHUNK))
        outcome = lambda o: decode.observe_transfer(o.transport, o, o.checksum_mismatch)  # noqa: E731
        KVReceiver(Recorder(), on_outcome=outcome).add_to_server(server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            for chunk_filter in (None, corrupt):
                sender = GrpcKVSender(TransferConfig(grpc_chunk_bytes=CHUNK, timeout_s=5.0), chunk_filter)
                result = await sender.send(address, "r", "v", range(4), kv)
                prefill.observe_transfer(sender.transport, result)
                await sender.close()
        finally:
            await server.stop(grace=None)

    run(go())
    for metrics, role in ((prefill, "prefill"), (decode, "decode")):
        assert grpc_sample(metrics, role, "tandem_kv_transfer_bytes_total") == kv.numel() * 4  # the verified one
        assert grpc_sample(metrics, role, "tandem_kv_transfer_duration_seconds_count") == 2
        assert grpc_sample(metrics, role, "tandem_kv_transfer_duration_seconds_sum") > 0
        assert grpc_sample(metrics, role, "tandem_kv_transfer_failures_total") == 1
    assert grpc_sample(decode, "decode", "tandem_kv_transfer_checksum_mismatches_total") == 1


def grpc_sample(metrics: WorkerMetrics, role: str, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "m", "role": role, "transport": "grpc"})


class JitteryExecutor(ThreadPoolExecutor):
    """Runs each copy after a random short sleep, so copies finish out of order; remembers every future."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.futures: list[concurrent.futures.Future] = []
        self._random = random.Random(0)

    def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
        delay = self._random.uniform(0, 0.02)
        future = super().submit(lambda: (time.sleep(delay), fn(*args, **kwargs))[1])
        self.futures.append(future)
        return future


async def chunk_stream(kv: torch.Tensor, fail_after: int | None = None) -> AsyncIterator[pb.KVChunk | memoryview]:
    yield decode_kv_chunk(header_message(kv))
    for index, message in enumerate(data_messages(kv)):
        if index == fail_after:
            raise RuntimeError("the stream broke")
        yield decode_kv_chunk(message)


def test_threaded_copies_land_in_order_and_all_finish_before_the_buffer_is_returned() -> None:
    kv = random_kv((2, 2, 8, 16, 2, 16), torch.float32)
    with JitteryExecutor() as executor:
        header, buffer = run(_assemble_stream(chunk_stream(kv), None, None, executor))
        assert all(future.done() for future in executor.futures) and len(executor.futures) > 10
    assert torch.equal(buffer.view(torch.float32).view(kv.shape), kv)


def test_a_broken_stream_leaves_no_copy_running() -> None:
    kv = random_kv((2, 2, 8, 16, 2, 16), torch.float32)
    with JitteryExecutor() as executor:
        with pytest.raises(RuntimeError, match="broke"):
            run(_assemble_stream(chunk_stream(kv, fail_after=9), None, None, executor))
        assert len(executor.futures) == 9 and all(future.done() for future in executor.futures)


# ---------------------------------------------------------------- parallel streams


@asynccontextmanager
async def pooled_server(on_kv: OnKV, pool: HostBufferPool, **receiver_args: object) -> AsyncIterator[tuple]:
    """A real server with a pooled receiver; yields (address, receiver)."""
    server = grpc.aio.server(options=grpc_message_options(CHUNK))
    receiver = KVReceiver(on_kv, **receiver_args)
    receiver._host_pool = pool  # see pooled_receiver
    receiver.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", receiver
    finally:
        await server.stop(grace=None)


def parallel_config(streams: int) -> TransferConfig:
    return TransferConfig(grpc_chunk_bytes=CHUNK, grpc_streams=streams, timeout_s=5.0)


@pytest.mark.parametrize("streams", [2, 3, 7])
def test_parallel_streams_reassemble_in_order(streams: int) -> None:
    kv = random_kv((3, 2, 5, 16, 2, 16), torch.bfloat16)  # 61440 bytes: 15 chunks, parts not chunk-aligned
    recorder, pool, outcomes = Recorder(), HostBufferPool(2**30, pinned=False), []
    seen: list[int] = []

    def count(index: int, data: bytes) -> bytes:
        seen.append(index)
        return data

    async def go() -> object:
        async with pooled_server(recorder, pool, on_outcome=outcomes.append) as (address, receiver):
            sender = GrpcKVSender(parallel_config(streams), chunk_filter=count)
            try:
                return await sender.send(address, "req", "resv", range(5), kv), receiver
            finally:
                await sender.close()

    result, receiver = run(go())
    assert result.ok and result.bytes == kv.numel() * 2
    [(header, got)] = recorder.calls
    assert torch.equal(got, kv) and header.block_ids == tuple(range(5))
    assert sorted(seen) == list(range(len(seen))) and len(seen) >= streams  # chunk numbers span the parts
    assert [(o.ok, o.bytes) for o in outcomes] == [(True, kv.numel() * 2)]  # one outcome per transfer
    assert receiver._gatherings == {} and pool.leased == 0


@pytest.mark.parametrize("fault", ["corrupt", "truncate", "extra"])
def test_one_bad_stream_fails_the_whole_transfer_and_leaks_nothing(fault: str) -> None:
    kv = random_kv((2, 2, 8, 16, 2, 16), torch.float32)  # 16 chunks over 4 streams: chunk 10 is in part 2

    def spoil(index: int, data: bytes) -> bytes:
        if index != 10:
            return data
        if fault == "corrupt":
            return data[:-1] + bytes([data[-1] ^ 1])
        return data[:-5] if fault == "truncate" else data + b"\x00"

    recorder, pool, outcomes = Recorder(), HostBufferPool(2**30, pinned=False), []

    async def go() -> object:
        async with pooled_server(recorder, pool, on_outcome=outcomes.append) as (address, receiver):
            sender = GrpcKVSender(parallel_config(4), chunk_filter=spoil)
            try:
                return await sender.send(address, "req", "resv", range(8), kv), receiver
            finally:
                await sender.close()

    result, receiver = run(go())
    expected = {"corrupt": "checksum mismatch", "truncate": "short stream: part 2", "extra": "oversized"}[fault]
    assert not result.ok and expected in result.error and result.bytes == 0
    assert recorder.calls == [] and len(outcomes) == 1 and not outcomes[0].ok
    assert receiver._gatherings == {} and pool.leased == 0


def part_messages(kv: torch.Tensor, index: int, count: int, transfer_id: str = "t1", **changes: object) -> list:
    start, end = stream_part_bounds(kv.numel() * kv.element_size(), index, count)
    raw = kv.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()[start:end]
    header = header_message(kv, stream_index=index, stream_count=count, transfer_id=transfer_id, **changes)
    return [header, *(encode_data_chunk(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK))]


def push_parts(kv: torch.Tensor, parts: list[list[bytes]], part_timeout_s: float = 5.0) -> tuple[list, object]:
    """Send each message list on its own stream at once to a pooled receiver; returns (acks, receiver)."""
    recorder, pool = Recorder(), HostBufferPool(2**30, pinned=False)

    async def go() -> tuple[list, object]:
        async with pooled_server(recorder, pool, part_timeout_s=part_timeout_s) as (address, receiver):
            acks = await asyncio.gather(*(push_raw(address, messages) for messages in parts))
            return acks, receiver

    acks, receiver = run(go())
    assert receiver._gatherings == {} and pool.leased == 0
    if not all(ack.ok for ack in acks):
        assert recorder.calls == []
    return acks, recorder


def test_raw_parallel_parts_in_any_order_are_accepted() -> None:
    kv = random_kv((2, 2, 3, 16, 2, 8), torch.float32)
    acks, recorder = push_parts(kv, [part_messages(kv, i, 3) for i in (2, 0, 1)])
    assert all(ack.ok for ack in acks) and torch.equal(recorder.calls[0][1], kv)


def test_a_missing_part_times_out_and_fails_the_transfer() -> None:
    kv = random_kv((2, 2, 3, 16, 2, 8), torch.float32)
    acks, _ = push_parts(kv, [part_messages(kv, i, 3) for i in (0, 2)], part_timeout_s=0.3)
    assert [ack.ok for ack in acks] == [False, False] and "parts [1] missing" in acks[0].error


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ([(0, 2, {}), (0, 2, {})], "arrived twice"),
        ([(0, 2, {}), (1, 2, {"request_id": "other"})], "disagrees with its first header"),
        ([(2, 2, {})], "bad stream 2 of 2"),
        ([(0, 65, {})], "bad stream 0 of 65"),
        ([(0, 2, {"transfer_id": ""})], "needs a transfer_id"),
    ],
)
def test_inconsistent_parts_are_refused(parts: list, error: str) -> None:
    kv = random_kv((2, 2, 3, 16, 2, 8), torch.float32)
    messages = [part_messages(kv, index, count, **changes) for index, count, changes in parts]
    acks, _ = push_parts(kv, messages, part_timeout_s=0.3)
    assert any(error in ack.error for ack in acks) and not any(ack.ok for ack in acks)


def test_a_cancelled_part_fails_the_transfer_and_frees_its_buffer() -> None:
    kv = random_kv((2, 2, 3, 16, 2, 8), torch.float32)
    recorder, pool = Recorder(), HostBufferPool(2**30, pinned=False)
    whole, stalled = part_messages(kv, 0, 2), part_messages(kv, 1, 2)
    started = asyncio.Event()

    async def stall() -> AsyncIterator[bytes]:
        yield stalled[0]
        yield stalled[1]
        started.set()
        await asyncio.sleep(30)

    async def go() -> tuple[pb.KVAck, object]:
        async with pooled_server(recorder, pool) as (address, receiver), grpc.aio.insecure_channel(address) as channel:
            push = channel.stream_unary(f"/{KV_SERVICE}/PushKV", response_deserializer=pb.KVAck.FromString)
            broken = push(stall(), timeout=5.0)
            await started.wait()
            waiting = asyncio.ensure_future(push_raw(address, whole))
            await asyncio.sleep(0.2)
            broken.cancel()
            return await waiting, receiver

    ack, receiver = run(go())
    # grpc ends the cancelled stream's request iterator early (a short part) or cancels its handler
    assert not ack.ok and ("short stream: part 1" in ack.error or "stream 1 of the transfer broke" in ack.error)
    assert recorder.calls == [] and receiver._gatherings == {} and pool.leased == 0
