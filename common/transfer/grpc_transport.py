"""KV transfer over a gRPC client stream: works between any two hosts and devices.

Wire format (``KVTransfer.PushKV``): one ``KVChunk(header)``, then the tensor's row-major bytes in order as
``KVChunk(data)`` messages of at most ``TransferConfig.grpc_chunk_bytes``. The decode side reassembles them
in ``base.KVReceiver`` into one preallocated buffer and verifies before ``on_kv``.

Speed: the messages are serialized by hand (``encode_data_chunk``: byte-identical to protobuf's, one copy of
the data instead of three) and the receiver views data chunks without parsing them; a GPU tensor is staged
in page-locked host memory from a pool (``HostBufferPool``), not allocated and pinned per transfer. With
``TransferConfig.grpc_streams`` > 1 a large transfer is split into that many byte ranges, each sent as its own
``PushKV`` stream on its own connection (``KVHeader.stream_index/stream_count/transfer_id``); the receiver
gathers them into one buffer and verifies the whole, and all streams get the same verdict.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import torch

from common.config import TransferConfig
from common.transfer.base import (
    KV_SERVICE,
    MAX_STREAMS,
    HostBufferPool,
    KVSender,
    KVTransferHeader,
    TransferResult,
    encode_data_chunk,
    grpc_message_options,
    stream_part_bounds,
)
from proto import kv_transfer_pb2 as pb

ChunkFilter = Callable[[int, bytes], bytes]


class GrpcKVSender(KVSender):
    """Streams KV tensors to ``KVReceiver``s over cached ``grpc.aio`` channels (one per target address).

    ``chunk_filter(index, data) -> data`` is a TEST-ONLY fault-injection hook applied to every data chunk just
    before it is sent: return altered bytes to corrupt, shorter bytes to truncate, ``b""`` to drop the chunk.
    Production code leaves it ``None``.
    """

    transport = "grpc"

    def __init__(self, config: TransferConfig, chunk_filter: ChunkFilter | None = None) -> None:
        if config.grpc_chunk_bytes <= 0:
            raise ValueError(f"grpc_chunk_bytes must be positive, got {config.grpc_chunk_bytes}")
        if not 1 <= config.grpc_streams <= MAX_STREAMS:
            raise ValueError(f"grpc_streams must be in 1..{MAX_STREAMS}, got {config.grpc_streams}")
        self._config = config
        self._chunk_filter = chunk_filter
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self._host_pool = HostBufferPool(config.grpc_host_pool_bytes, pinned=True)

    async def send(
        self, target_address: str, request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor
    ) -> TransferResult:
        start = time.perf_counter()
        staged: torch.Tensor | None = None
        try:
            describe = KVTransferHeader.for_tensor  # the checksum, on kv's own device
            header = await asyncio.to_thread(describe, request_id, reservation_id, block_ids, kv, "grpc")
            if kv.is_cuda:
                staged = self._host_pool.take(header.num_bytes)
            host_kv = await asyncio.to_thread(_to_host, kv, staged)
            ack = await self._push_all(target_address, header, _byte_view(host_kv))
        except (grpc.aio.AioRpcError, ValueError) as exc:
            return TransferResult(False, 0, time.perf_counter() - start, _describe(exc))
        finally:
            if staged is not None:
                self._host_pool.give(staged)
        seconds = time.perf_counter() - start
        return TransferResult(ack.ok, ack.bytes if ack.ok else 0, seconds, None if ack.ok else ack.error)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(channel.close() for channel in channels.values()))

    async def _push_all(self, address: str, header: KVTransferHeader, view: memoryview) -> pb.KVAck:
        """Send ``view`` on one stream, or split on ``grpc_streams`` parallel streams (each on its own
        connection, so the network work spreads over cores); the first refusal among their acks is the answer."""
        count = min(self._config.grpc_streams, max(1, header.num_bytes // self._config.grpc_chunk_bytes))
        timeout = self._config.timeout_s
        if count == 1:
            return await self._push(address, 0)(self._chunks(header.to_proto(), view, 0), timeout=timeout)
        transfer_id, calls, first_chunk = uuid.uuid4().hex, [], 0
        for index in range(count):
            start, end = stream_part_bounds(header.num_bytes, index, count)
            part = header.to_proto()
            part.stream_index, part.stream_count, part.transfer_id = index, count, transfer_id
            calls.append(self._push(address, index)(self._chunks(part, view[start:end], first_chunk), timeout=timeout))
            first_chunk += -(-(end - start) // self._config.grpc_chunk_bytes)
        acks = await asyncio.gather(*calls, return_exceptions=True)
        for ack in acks:
            if isinstance(ack, BaseException):
                raise ack
        return next((ack for ack in acks if not ack.ok), acks[0])

    def _push(self, address: str, connection: int) -> grpc.aio.StreamUnaryMultiCallable:
        """``PushKV`` on the cached channel number ``connection`` to ``address`` (its own TCP connection; its
        message limit admits one chunk); requests go out as already-serialized ``KVChunk`` bytes."""
        key = (address, connection)
        if key not in self._channels:
            options = [*grpc_message_options(self._config.grpc_chunk_bytes), ("grpc.use_local_subchannel_pool", 1)]
            self._channels[key] = grpc.aio.insecure_channel(address, options=options)
        return self._channels[key].stream_unary(
            f"/{KV_SERVICE}/PushKV", request_serializer=None, response_deserializer=pb.KVAck.FromString
        )

    async def _chunks(self, header: pb.KVHeader, view: memoryview, first_chunk: int) -> AsyncIterator[bytes]:
        """The serialized header, then ``view`` as serialized data chunks (one copy each), numbered for the
        chunk filter from ``first_chunk`` on."""
        yield pb.KVChunk(header=header).SerializeToString()
        step = self._config.grpc_chunk_bytes
        for index, offset in enumerate(range(0, len(view), step), start=first_chunk):
            data: bytes | memoryview = view[offset : offset + step]
            if self._chunk_filter is not None:
                data = self._chunk_filter(index, bytes(data))
                if not data:
                    continue
            yield encode_data_chunk(data)


def _to_host(kv: torch.Tensor, staged: torch.Tensor | None) -> torch.Tensor:
    """``kv``'s bytes on the CPU: a CPU tensor as it is, a GPU tensor copied into ``staged`` (page-locked, so
    the download runs at full PCIe speed). The checksum was taken on ``kv``'s own device before, so it also
    covers this copy."""
    if staged is None:
        return kv.detach().contiguous()
    host = staged.view(kv.dtype).view(kv.shape)
    host.copy_(kv.detach())  # synchronous: the checksum synced the device and the target is ours alone
    return host


def _byte_view(host_kv: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (kept alive by the caller)."""
    flat = host_kv.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc {exc.code().name}: {exc.details()}"
    return str(exc)
