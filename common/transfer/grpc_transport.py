"""KV transfer over a gRPC client stream: works between any two hosts and devices.

Wire format (``KVTransfer.PushKV``): one ``KVChunk(header)``, then the tensor's row-major bytes in order as
``KVChunk(data)`` messages of at most ``TransferConfig.grpc_chunk_bytes``. The decode side reassembles them
in ``base.KVReceiver`` into one preallocated buffer and verifies before ``on_kv``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import torch

from common.config import TransferConfig
from common.transfer.base import KVSender, KVTransferHeader, TransferResult, grpc_message_options
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc

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

    async def send(
        self, target_address: str, request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor
    ) -> TransferResult:
        start = time.perf_counter()
        try:
            header, host_kv = await asyncio.to_thread(_prepare, request_id, reservation_id, block_ids, kv)
            stub = pb_grpc.KVTransferStub(self._channel(target_address))
            ack = await stub.PushKV(self._chunks(header, host_kv), timeout=self._config.timeout_s)
        except (grpc.aio.AioRpcError, ValueError) as exc:
            return TransferResult(False, 0, time.perf_counter() - start, _describe(exc))
        seconds = time.perf_counter() - start
        return TransferResult(ack.ok, ack.bytes if ack.ok else 0, seconds, None if ack.ok else ack.error)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(channel.close() for channel in channels.values()))

    def _channel(self, address: str) -> grpc.aio.Channel:
        """The cached channel to ``address``; its message limit admits one chunk."""
        if address not in self._channels:
            options = grpc_message_options(self._config.grpc_chunk_bytes)
            self._channels[address] = grpc.aio.insecure_channel(address, options=options)
        return self._channels[address]

    async def _chunks(self, header: KVTransferHeader, host_kv: torch.Tensor) -> AsyncIterator[pb.KVChunk]:
        """The header, then the bytes of ``host_kv`` as memoryview slices (protobuf copies each once)."""
        yield pb.KVChunk(header=header.to_proto())
        view = _byte_view(host_kv)
        step = self._config.grpc_chunk_bytes
        for index, offset in enumerate(range(0, len(view), step)):
            data = bytes(view[offset : offset + step])
            if self._chunk_filter is not None:
                data = self._chunk_filter(index, data)
                if not data:
                    continue
            yield pb.KVChunk(data=data)


def _prepare(
    request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor
) -> tuple[KVTransferHeader, torch.Tensor]:
    """Header (checksum on ``kv``'s own device, so it also covers the device->host copy) and a CPU copy,
    in page-locked memory for a GPU tensor (the download then runs at full PCIe speed)."""
    header = KVTransferHeader.for_tensor(request_id, reservation_id, block_ids, kv, "grpc")
    if not kv.is_cuda:
        return header, kv.detach().contiguous()
    host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
    host.copy_(kv.detach())  # the checksum above synced the device; this copy is synchronous
    return header, host


def _byte_view(host_kv: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (kept alive by the caller)."""
    flat = host_kv.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc {exc.code().name}: {exc.details()}"
    return str(exc)
