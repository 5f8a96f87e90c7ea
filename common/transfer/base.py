"""KV transfer: typed messages, the sender interface, the decode-side receiver servicer, transport choice.

The prefill worker gathers one request's blocks into a contiguous tensor
``kv = cache[:, :, block_ids]`` of shape ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]`` and a
``KVSender`` delivers it to the decode worker's reserved block ids. On the decode side one ``KVReceiver``
serves ``proto/kv_transfer.proto`` for every transport.

Invariant: ``on_kv`` sees a tensor only after its shape, dtype, byte count and checksum all matched the
header; on any mismatch the RPC replies ``ok=false`` with a reason and ``on_kv`` is never called. An nccl
transfer that landed straight in the reserved blocks (``placement.DirectPlacement``) never reaches ``on_kv``:
its placement is committed after the same verification instead, and only then are its blocks filled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grpc
import numpy as np
import torch

from common.transfer.checksum import kv_checksum
from common.transfer.placement import DirectPlacement
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Transport = Literal["grpc", "nccl"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
# Protobuf overhead on top of one data chunk (field tags, oneof, lengths).
GRPC_MESSAGE_SLACK = 64 * 1024


class TransferError(ValueError):
    """A transfer that failed verification or was rejected; its message goes back in ``KVAck.error``."""


class ChecksumMismatchError(TransferError):
    """The received bytes do not match the sender's checksum: corrupted on the way (counted apart in metrics)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the wire name)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TransferError(f"unsupported KV dtype {dtype}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """The inverse of ``dtype_name``; unknown names raise ``TransferError``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise TransferError(f"unsupported KV dtype {name!r}") from None


@dataclass(frozen=True)
class KVTransferHeader:
    """Everything the decode side needs to verify and place one request's KV blocks.

    Invariant (checked by ``validate``): ``num_bytes == prod(shape) * itemsize(dtype)`` and, for the 6-d KV
    layout, ``shape[2] == len(block_ids)``.
    """

    request_id: str
    reservation_id: str
    block_ids: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    num_bytes: int
    checksum: int
    transport: str

    @classmethod
    def for_tensor(
        cls, request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor, transport: str
    ) -> KVTransferHeader:
        """The header describing ``kv``; computes the checksum on ``kv``'s device (one device sync)."""
        return cls.describe(request_id, reservation_id, block_ids, kv, transport, kv_checksum(kv))

    @classmethod
    def describe(
        cls,
        request_id: str,
        reservation_id: str,
        block_ids: Sequence[int],
        kv: torch.Tensor,
        transport: str,
        checksum: int,
    ) -> KVTransferHeader:
        """The header describing ``kv`` with a given ``checksum`` (no device work; nccl passes 0, see there)."""
        header = cls(
            request_id=request_id,
            reservation_id=reservation_id,
            block_ids=tuple(int(b) for b in block_ids),
            shape=tuple(kv.shape),
            dtype=dtype_name(kv.dtype),
            num_bytes=kv.numel() * kv.element_size(),
            checksum=checksum,
            transport=transport,
        )
        header.validate()
        return header

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def validate(self, max_bytes: int | None = None) -> None:
        """Raise ``TransferError`` unless the header is self-consistent (and within ``max_bytes``)."""
        expected = math.prod(self.shape) * self.torch_dtype.itemsize
        if any(d < 0 for d in self.shape):
            raise TransferError(f"negative dimension in shape {self.shape}")
        if self.num_bytes != expected:
            raise TransferError(f"num_bytes {self.num_bytes} != {expected} for shape {self.shape} {self.dtype}")
        if len(self.shape) == 6 and self.shape[2] != len(self.block_ids):
            raise TransferError(f"shape[2]={self.shape[2]} blocks but {len(self.block_ids)} block ids")
        if max_bytes is not None and self.num_bytes > max_bytes:
            raise TransferError(f"transfer of {self.num_bytes} bytes exceeds the receiver limit {max_bytes}")

    def verify(self, kv: torch.Tensor) -> None:
        """Raise ``TransferError`` unless ``kv`` matches this header (shape, dtype, bytes, checksum)."""
        if tuple(kv.shape) != self.shape or kv.dtype != self.torch_dtype:
            raise TransferError(f"tensor {tuple(kv.shape)} {kv.dtype} != header {self.shape} {self.dtype}")
        got = kv_checksum(kv)
        if got != self.checksum:
            raise ChecksumMismatchError(f"checksum mismatch: header {self.checksum:#018x}, received {got:#018x}")

    def to_proto(self) -> pb.KVHeader:
        return pb.KVHeader(
            request_id=self.request_id,
            reservation_id=self.reservation_id,
            block_ids=self.block_ids,
            shape=self.shape,
            dtype=self.dtype,
            num_bytes=self.num_bytes,
            checksum=self.checksum,
            transport=self.transport,
        )

    @classmethod
    def from_proto(cls, msg: pb.KVHeader) -> KVTransferHeader:
        return cls(
            request_id=msg.request_id,
            reservation_id=msg.reservation_id,
            block_ids=tuple(msg.block_ids),
            shape=tuple(msg.shape),
            dtype=msg.dtype,
            num_bytes=msg.num_bytes,
            checksum=msg.checksum,
            transport=msg.transport,
        )


@dataclass(frozen=True)
class TransferResult:
    """The outcome of one send as the sender saw it. ``bytes`` counts tensor bytes delivered (0 on failure)."""

    ok: bool
    bytes: int
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class TransferOutcome:
    """One transfer as the receiver saw it, for metrics: ``bytes`` counts verified bytes (0 when rejected)."""

    transport: str
    ok: bool
    bytes: int
    seconds: float
    checksum_mismatch: bool = False


OnKV = Callable[[KVTransferHeader, torch.Tensor], Awaitable[None]]
OnOutcome = Callable[[TransferOutcome], None]
# The receiver's verdict on one transfer: (header, awaitable of the verified tensor, start) -> its ack; the
# awaitable yields None when the bytes landed in the reserved blocks and their placement was committed.
Deliver = Callable[[KVTransferHeader, Awaitable[torch.Tensor | None], float], Awaitable[pb.KVAck]]
# Decode side: the claimed cache blocks a transfer may land in directly, or None (buffer, then on_kv).
Place = Callable[[KVTransferHeader], DirectPlacement | None]
WriteAck = Callable[[pb.ControlAck], Awaitable[None]]


class KVSender(ABC):
    """Ships one request's KV tensor to a decode worker's ``KVReceiver``.

    Invariants: ``send`` never raises for transport or verification failures; it returns
    ``TransferResult(ok=False, error=...)``. ``kv`` must not be modified until ``send`` returns.
    """

    transport: Transport

    @abstractmethod
    async def send(
        self, target_address: str, request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor
    ) -> TransferResult:
        """Deliver ``kv`` (``[L, 2, len(block_ids), bs, H, D]``) into ``block_ids`` of the worker at host:port."""

    @abstractmethod
    async def close(self) -> None:
        """Release channels and communicators; the sender is unusable afterwards."""


class NcclReceiveSide(Protocol):
    """The decode side of the pair transport (see ``nccl_transport.NcclReceiver``)."""

    async def serve(
        self, messages: AsyncIterator[pb.ControlMessage], write: WriteAck, deliver: Deliver, max_bytes: int | None
    ) -> None:
        """Run one ``Control`` stream: join the pair, receive each described transfer (checksum-verified, else
        the awaitable raises ``TransferError``; None once it landed in its reserved blocks and was committed),
        ``deliver`` it and write its ack."""
        ...

    async def close(self) -> None: ...


def choose_transport(
    config_transport: str, sender_device: str, receiver_device: str, same_host: bool, same_gpu: bool | None = None
) -> Transport:
    """Pick ``"nccl"`` or ``"grpc"`` for one prefill->decode pair.

    ``auto`` picks nccl iff both ends are CUDA devices on one host and on different GPUs (NCCL cannot pair two
    ranks on one GPU). ``same_gpu`` defaults to comparing device indices, which is only right when both
    processes see the same ``CUDA_VISIBLE_DEVICES``; pass it explicitly when it is known (e.g. GPU UUIDs).
    An explicit ``nccl`` that cannot work raises ``ValueError``.
    """
    if config_transport == "grpc":
        return "grpc"
    if config_transport not in ("auto", "nccl"):
        raise ValueError(f"unknown transport {config_transport!r}; expected auto, grpc or nccl")
    reason = _nccl_obstacle(sender_device, receiver_device, same_host, same_gpu)
    if reason is None:
        return "nccl"
    if config_transport == "nccl":
        raise ValueError(f"transport nccl cannot work here: {reason}")
    return "grpc"


def _nccl_obstacle(sender: str, receiver: str, same_host: bool, same_gpu: bool | None) -> str | None:
    """Why NCCL cannot connect these two devices, or None when it can."""
    a, b = torch.device(sender), torch.device(receiver)
    if a.type != "cuda" or b.type != "cuda":
        return f"needs CUDA on both ends, got {sender} -> {receiver}"
    if not same_host:
        return "sender and receiver are on different hosts"
    if same_gpu is None:
        same_gpu = (a.index or 0) == (b.index or 0)
    if same_gpu:
        return f"sender and receiver share one GPU ({sender} -> {receiver})"
    return None


def grpc_message_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options that admit one ``KVChunk`` of ``chunk_bytes``; pass them to ``grpc.aio.server``."""
    limit = chunk_bytes + GRPC_MESSAGE_SLACK
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class KVReceiver(pb_grpc.KVTransferServicer):
    """The decode worker's ``tandem.kv.KVTransfer`` servicer: verifies each transfer, then calls ``on_kv``.

    ``on_kv(header, kv)`` gets ``kv`` on ``device``; raising ``ValueError`` (e.g. unknown reservation) turns
    into ``KVAck(ok=false, error=str(exc))``. Transfers are independent: a slow ``on_kv`` for one request does
    not delay another's. The hosting server must admit messages of the sender's chunk size
    (``grpc_message_options``). NCCL transfers are refused unless ``nccl`` is given. ``on_outcome``, when given,
    hears of every transfer, accepted or rejected (metrics); it must not raise.
    """

    def __init__(
        self,
        on_kv: OnKV,
        device: torch.device | str = "cpu",
        nccl: NcclReceiveSide | None = None,
        max_bytes: int | None = None,
        on_outcome: OnOutcome | None = None,
    ) -> None:
        self._on_kv = on_kv
        self._device = torch.device(device)
        self._nccl = nccl
        self._max_bytes = max_bytes
        self._on_outcome = on_outcome

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_KVTransferServicer_to_server(self, server)

    async def close(self) -> None:
        if self._nccl is not None:
            await self._nccl.close()

    async def PushKV(self, request_iterator: AsyncIterator[pb.KVChunk], context: grpc.aio.ServicerContext) -> pb.KVAck:
        start = time.perf_counter()
        header: KVTransferHeader | None = None
        try:
            pinned = self._device.type == "cuda"
            header, buffer = await _assemble_stream(request_iterator, self._max_bytes, pinned)
            kv = await asyncio.to_thread(_tensor_from_buffer, header, buffer, self._device)
            await self._on_kv(header, kv)
        except ValueError as exc:  # TransferError included
            return self._reject("grpc", header, exc, start)
        return self._accept("grpc", header, start)

    async def Control(
        self, request_iterator: AsyncIterator[pb.ControlMessage], context: grpc.aio.ServicerContext
    ) -> None:
        if self._nccl is None:
            error = "this receiver does not accept nccl transfers"
            await context.write(pb.ControlAck(transfer_id=0, ack=pb.KVAck(ok=False, error=error)))
            return
        lock = asyncio.Lock()

        async def write(ack: pb.ControlAck) -> None:
            async with lock:  # acks come from one task per transfer
                await context.write(ack)

        await self._nccl.serve(_read_all(context), write, self._deliver_nccl, self._max_bytes)

    async def _deliver_nccl(
        self, header: KVTransferHeader, received: Awaitable[torch.Tensor | None], start: float
    ) -> pb.KVAck:
        try:
            kv = await received  # checksum-verified on the GPU; None: already in its blocks, committed
            if kv is not None:
                await self._on_kv(header, kv)
        except ValueError as exc:
            return self._reject("nccl", header, exc, start)
        return self._accept("nccl", header, start)

    def _accept(self, transport: str, header: KVTransferHeader, start: float) -> pb.KVAck:
        seconds = time.perf_counter() - start
        self._report(TransferOutcome(transport, True, header.num_bytes, seconds))
        return pb.KVAck(ok=True, bytes=header.num_bytes, seconds=seconds)

    def _reject(self, transport: str, header: KVTransferHeader | None, exc: Exception, start: float) -> pb.KVAck:
        request_id = header.request_id if header is not None else "?"
        logger.warning("KV transfer for request %s rejected: %s", request_id, exc)
        seconds = time.perf_counter() - start
        self._report(TransferOutcome(transport, False, 0, seconds, isinstance(exc, ChecksumMismatchError)))
        return pb.KVAck(ok=False, error=str(exc) or type(exc).__name__, seconds=seconds)

    def _report(self, outcome: TransferOutcome) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome)


async def _read_all(context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The request messages via ``context.read`` (gRPC forbids mixing the request iterator with ``write``)."""
    while (message := await context.read()) is not grpc.aio.EOF:
        yield message


async def _assemble_stream(
    chunks: AsyncIterator[pb.KVChunk], max_bytes: int | None, pinned: bool = False
) -> tuple[KVTransferHeader, torch.Tensor]:
    """Read one header then exactly ``num_bytes`` of data into a preallocated uint8 buffer (no per-chunk
    tensors); ``pinned`` puts it in page-locked memory so the copy to the GPU runs at full PCIe speed."""
    header: KVTransferHeader | None = None
    host = torch.empty(0, dtype=torch.uint8)
    buffer = host.numpy()
    filled = 0
    async for chunk in chunks:
        if chunk.WhichOneof("payload") == "header":
            if header is not None:
                raise TransferError("stream carries a second header")
            header = KVTransferHeader.from_proto(chunk.header)
            header.validate(max_bytes)
            host = torch.empty(header.num_bytes, dtype=torch.uint8, pin_memory=pinned)
            buffer = host.numpy()  # a view: chunks are copied straight into ``host``
            continue
        if header is None:
            raise TransferError("stream sent data before its header")
        filled = _write_chunk(buffer, filled, chunk.data)
    if header is None:
        raise TransferError("stream ended without a header")
    if filled != header.num_bytes:
        raise TransferError(f"short stream: got {filled} of {header.num_bytes} bytes")
    return header, host


def _write_chunk(buffer: np.ndarray, filled: int, data: bytes) -> int:
    """Copy ``data`` at offset ``filled``; an overflow raises ``TransferError``. Returns the new fill level."""
    end = filled + len(data)
    if end > buffer.size:
        raise TransferError(f"oversized stream: {end} bytes or more, header says {buffer.size}")
    buffer[filled:end] = np.frombuffer(data, dtype=np.uint8)
    return end


def _tensor_from_buffer(header: KVTransferHeader, buffer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The received bytes as the header's tensor on ``device``, verified there: on CUDA the checksum runs as
    the one-pass GPU kernel after a (pinned, asynchronous) upload, on CPU as the torch reference."""
    if not header.num_bytes:
        kv = _empty(header).to(device)
    else:
        flat = buffer.to(device, non_blocking=True) if device.type == "cuda" else buffer
        kv = flat.view(header.torch_dtype).reshape(header.shape)
    header.verify(kv)  # syncs the device: kv is ready for any stream afterwards
    return kv


def _empty(header: KVTransferHeader) -> torch.Tensor:
    return torch.empty(header.shape, dtype=header.torch_dtype)
