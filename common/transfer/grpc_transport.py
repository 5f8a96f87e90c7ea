"""KV transfer over a gRPC client stream: works between any two hosts and devices.

Wire format (``KVTransfer.PushKV``): one ``KVChunk(header)``, then the tensor's row-major bytes in order as
``KVChunk(data)`` messages of at most ``TransferConfig.grpc_chunk_bytes``. The decode side reassembles them
in ``base.KVReceiver`` into one preallocated buffer and verifies before ``on_kv``.

Speed: the messages are serialized by hand (``encode_data_chunk``: byte-identical to protobuf's, one copy of
the data instead of three) and the receiver views data chunks without parsing them; a GPU tensor is staged
in page-locked host memory from a pool (``HostBufferPool``), not allocated and pinned per transfer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import torch

from common.config import TransferConfig
from common.transfer.base import (
    KV_SERVICE,
    HostBufferPool,
    KVSender,
    KVTransferHeader,
    TransferResult,
    encode_data_chunk,
    grpc_message_options,
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
        self._config = config
        self._chunk_filter = chunk_filter
        self._channels: dict[str, grpc.aio.Channel] = {}
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
            ack = await self._push(target_address)(self._chunks(header, host_kv), timeout=self._config.timeout_s)
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

    def _push(self, address: str) -> grpc.aio.StreamUnaryMultiCallable:
        """``PushKV`` on the cached channel to ``address`` (its message limit admits one chunk); requests go
        out as already-serialized ``KVChunk`` bytes."""
        if address not in self._channels:
            options = grpc_message_options(self._config.grpc_chunk_bytes)
            self._channels[address] = grpc.aio.insecure_channel(address, options=options)
        return self._channels[address].stream_unary(
            f"/{KV_SERVICE}/PushKV", request_serializer=None, response_deserializer=pb.KVAck.FromString
        )

    async def _chunks(self, header: KVTransferHeader, host_kv: torch.Tensor) -> AsyncIterator[bytes]:
        """The serialized header, then the bytes of ``host_kv`` as serialized data chunks (one copy each)."""
        yield pb.KVChunk(header=header.to_proto()).SerializeToString()
        view = _byte_view(host_kv)
        step = self._config.grpc_chunk_bytes
        for index, offset in enumerate(range(0, len(view), step)):
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
