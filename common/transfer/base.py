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
import collections
import concurrent.futures
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
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
_ENDED_VERDICTS_KEPT = 1024  # parallel transfers whose late parts still get their verdict
KV_SERVICE = "tandem.kv.KVTransfer"


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


# ``KVChunk(data=...)`` on the wire is this tag (field 2, length-delimited), a varint length, then the bytes.
_DATA_TAG = 0x12


def encode_data_chunk(data: bytes | memoryview) -> bytes:
    """``KVChunk(data=data).SerializeToString()`` with one copy of ``data`` (protobuf would make three)."""
    return b"".join((bytes((_DATA_TAG,)), _varint(len(data)), data))


def decode_kv_chunk(message: bytes) -> pb.KVChunk | memoryview:
    """A received ``KVChunk``: a zero-copy view of its bytes when it is exactly one ``data`` field (what
    ``encode_data_chunk`` and protobuf both write), else the protobuf parse (headers, anything unusual)."""
    if message[:1] == bytes((_DATA_TAG,)):
        length, start = _read_varint(message, 1)
        if length is not None and start + length == len(message):
            return memoryview(message)[start:]
    return pb.KVChunk.FromString(message)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(message: bytes, start: int) -> tuple[int | None, int]:
    """(value, end) of the varint at ``start``; value None when it is cut off or longer than 10 bytes."""
    value = 0
    for index in range(start, min(start + 10, len(message))):
        value |= (message[index] & 0x7F) << (7 * (index - start))
        if message[index] < 0x80:
            return value, index + 1
    return None, start


class HostBufferPool:
    """Reusable uint8 host staging buffers, page-locked when ``pinned``, so a gRPC transfer does not pay for
    allocating, pinning and first-touching a fresh buffer each time (on a GPU host that costs more than the
    copies themselves).

    Invariants: ``take`` hands out a buffer no one else holds until it is ``give``n back; at most
    ``capacity_bytes`` are kept idle: ``give`` keeps the returned buffer (unless it alone exceeds that) and
    frees the least recently returned ones to make room. Thread-safe.
    """

    GRANULE = 16 * 2**20  # sizes round up to this, so transfers of similar sizes share buffers

    def __init__(self, capacity_bytes: int, pinned: bool) -> None:
        self._capacity = capacity_bytes
        self._pinned = pinned
        self._idle: list[torch.Tensor] = []  # least recently returned first
        self._leased: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> its whole block
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        return sum(block.numel() for block in self._idle)

    @property
    def leased(self) -> int:
        return len(self._leased)

    def take(self, num_bytes: int) -> torch.Tensor:
        """A buffer of exactly ``num_bytes`` (a view of a pooled block, reused when one fits)."""
        with self._lock:
            fits = [block for block in self._idle if block.numel() >= num_bytes]
            block = min(fits, key=torch.Tensor.numel) if fits else None
            if block is not None:
                self._idle.remove(block)
        if block is None:
            size = -(-max(num_bytes, 1) // self.GRANULE) * self.GRANULE
            block = torch.empty(size, dtype=torch.uint8, pin_memory=self._pinned)
        view = block[:num_bytes]
        with self._lock:
            self._leased[view.data_ptr()] = block
        return view

    def give(self, view: torch.Tensor) -> None:
        """Return a buffer from ``take`` for reuse."""
        with self._lock:
            block = self._leased.pop(view.data_ptr())
            if block.numel() > self._capacity:
                return
            self._idle.append(block)
            while self.idle_bytes > self._capacity:
                self._idle.pop(0)


class KVReceiver(pb_grpc.KVTransferServicer):
    """The decode worker's ``tandem.kv.KVTransfer`` servicer: verifies each transfer, then calls ``on_kv``.

    ``on_kv(header, kv)`` gets ``kv`` on ``device``; raising ``ValueError`` (e.g. unknown reservation) turns
    into ``KVAck(ok=false, error=str(exc))``. Transfers are independent: a slow ``on_kv`` for one request does
    not delay another's. The hosting server must admit messages of the sender's chunk size
    (``grpc_message_options``). NCCL transfers are refused unless ``nccl`` is given. ``on_outcome``, when given,
    hears of every transfer, accepted or rejected (metrics); it must not raise. A CUDA receiver stages gRPC
    bytes in page-locked buffers from a pool that keeps at most ``host_pool_bytes`` idle. A transfer sent on
    parallel streams waits at most ``part_timeout_s`` for its other parts once a part arrived.
    """

    def __init__(
        self,
        on_kv: OnKV,
        device: torch.device | str = "cpu",
        nccl: NcclReceiveSide | None = None,
        max_bytes: int | None = None,
        on_outcome: OnOutcome | None = None,
        host_pool_bytes: int = 512 * 2**20,
        part_timeout_s: float = 60.0,
    ) -> None:
        self._on_kv = on_kv
        self._device = torch.device(device)
        # On CPU the received buffer becomes ``kv`` itself (handed to on_kv), so only CUDA staging is pooled.
        self._host_pool = HostBufferPool(host_pool_bytes, pinned=True) if self._device.type == "cuda" else None
        self._copy_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-grpc-copy")
        self._gatherings: dict[str, _Gathering] = {}  # transfers arriving on parallel streams, by transfer_id
        # Verdicts of recently ended parallel transfers: a late part gets the verdict, not a second report.
        self._ended: collections.OrderedDict[str, pb.KVAck] = collections.OrderedDict()
        self._part_timeout_s = part_timeout_s
        self._nccl = nccl
        self._max_bytes = max_bytes
        self._on_outcome = on_outcome

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve ``tandem.kv.KVTransfer`` as generated, except that ``PushKV`` data chunks are not parsed
        into protobuf messages (``decode_kv_chunk``: same wire, one copy fewer)."""
        handlers = {
            "PushKV": grpc.stream_unary_rpc_method_handler(
                self.PushKV, request_deserializer=decode_kv_chunk, response_serializer=pb.KVAck.SerializeToString
            ),
            "Control": grpc.stream_stream_rpc_method_handler(
                self.Control,
                request_deserializer=pb.ControlMessage.FromString,
                response_serializer=pb.ControlAck.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(KV_SERVICE, handlers),))
        server.add_registered_method_handlers(KV_SERVICE, handlers)

    async def close(self) -> None:
        self._copy_executor.shutdown(wait=False)
        if self._nccl is not None:
            await self._nccl.close()

    async def PushKV(
        self, request_iterator: AsyncIterator[pb.KVChunk | memoryview], context: grpc.aio.ServicerContext
    ) -> pb.KVAck:
        start = time.perf_counter()
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if isinstance(first, pb.KVChunk) and first.WhichOneof("payload") == "header" and first.header.stream_count > 1:
            return await self._push_part(first.header, messages, start)
        return await self._push_whole(_prepend(first, messages), start)

    async def _push_whole(self, messages: AsyncIterator[pb.KVChunk | memoryview], start: float) -> pb.KVAck:
        """A transfer on one stream: assemble, upload and verify, ``on_kv``."""
        header: KVTransferHeader | None = None
        staging = _Staging(self._host_pool)
        try:
            header, buffer = await _assemble_stream(messages, self._max_bytes, staging.take, self._copy_executor)
            kv = await asyncio.to_thread(_tensor_from_buffer, header, buffer, self._device)
            staging.release()  # kv is on the device and verified: the host bytes are free for the next transfer
            await self._on_kv(header, kv)
        except ValueError as exc:  # TransferError included
            return self._reject("grpc", header, exc, start)
        finally:
            staging.release()  # also on a broken stream or a cancelled call
        return self._accept("grpc", header, start)

    async def _push_part(self, proto: pb.KVHeader, messages: AsyncIterator[Any], start: float) -> pb.KVAck:
        """One of several parallel streams of a transfer: read its byte range into the shared buffer; the
        stream completing the last part verifies and calls ``on_kv``; every stream replies the one verdict."""
        header = KVTransferHeader.from_proto(proto)
        settled = self._settled_verdict(proto.transfer_id)
        if settled is not None:  # a part of a transfer that already failed (and was counted once)
            return settled
        try:
            gathering = self._join_gathering(proto, header, start)
        except ValueError as exc:
            return self._reject("grpc", header, exc, start)
        try:
            await _read_part(gathering, proto.stream_index, messages, self._copy_executor)
            if gathering.complete():
                await self._finish_gathering(gathering)
            await self._await_parts(gathering)
            return await asyncio.shield(gathering.verdict)  # settled, or on_kv of the last part still running
        except ValueError as exc:
            self._fail_gathering(gathering, exc)
            return gathering.verdict.result()
        except BaseException:  # cancelled: this part will never arrive
            self._fail_gathering(gathering, TransferError(f"stream {proto.stream_index} of the transfer broke"))
            raise
        finally:
            gathering.attached -= 1
            if gathering.attached == 0:  # no stream writes into the buffer any more
                self._gatherings.pop(gathering.key, None)
                gathering.staging.release()
                self._remember_verdict(gathering)

    def _settled_verdict(self, transfer_id: str) -> pb.KVAck | None:
        gathering = self._gatherings.get(transfer_id)
        if gathering is not None and gathering.verdict.done():
            return gathering.verdict.result()
        return self._ended.get(transfer_id)

    def _remember_verdict(self, gathering: _Gathering) -> None:
        if gathering.verdict.done():
            self._ended[gathering.key] = gathering.verdict.result()
            while len(self._ended) > _ENDED_VERDICTS_KEPT:
                self._ended.popitem(last=False)

    async def _await_parts(self, gathering: _Gathering) -> None:
        """Wait until the verdict is settled or every part arrived; a part missing too long fails the transfer."""
        try:
            await asyncio.wait_for(asyncio.shield(gathering.verdict), self._part_timeout_s)
        except TimeoutError:
            if not gathering.complete():
                missing = sorted(set(range(gathering.count)) - gathering.done)
                raise TransferError(f"parts {missing} missing after {self._part_timeout_s} s") from None

    def _join_gathering(self, proto: pb.KVHeader, header: KVTransferHeader, start: float) -> _Gathering:
        """The gathering of ``proto``'s transfer, created by its first part; refuses inconsistent parts."""
        _check_part(proto)
        header.validate(self._max_bytes)
        key = proto.transfer_id
        gathering = self._gatherings.get(key)
        if gathering is None:
            staging = _Staging(self._host_pool)
            buffer = staging.take(header.num_bytes)
            gathering = self._gatherings[key] = _Gathering(key, header, proto.stream_count, staging, buffer, start)
        gathering.admit(header, proto.stream_index, proto.stream_count)
        return gathering

    async def _finish_gathering(self, gathering: _Gathering) -> None:
        """Every part arrived: upload and verify, ``on_kv``, then settle the verdict (ok or not)."""
        try:
            kv = await asyncio.to_thread(_tensor_from_buffer, gathering.header, gathering.buffer, self._device)
            await self._on_kv(gathering.header, kv)
        except ValueError as exc:
            self._fail_gathering(gathering, exc)
            return
        if not gathering.verdict.done():
            gathering.verdict.set_result(self._accept("grpc", gathering.header, gathering.start))

    def _fail_gathering(self, gathering: _Gathering, exc: Exception) -> None:
        """Settle the verdict as a refusal (the first failure wins; later ones are not reported again)."""
        if not gathering.verdict.done():
            gathering.verdict.set_result(self._reject("grpc", gathering.header, exc, gathering.start))

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


MAX_STREAMS = 64  # parallel streams per transfer a receiver accepts


@dataclass(eq=False)
class _Gathering:
    """One gRPC transfer arriving as ``count`` parallel streams into one staging ``buffer``.

    Invariants: each part index is admitted at most once and only with the first part's header; ``verdict``
    is settled once (the first failure, or the ack after the last part's verify and ``on_kv``); the buffer
    goes back to its pool only when no stream is attached (none can still be writing into it)."""

    key: str
    header: KVTransferHeader
    count: int
    staging: _Staging
    buffer: torch.Tensor
    start: float
    parts: set[int] = field(default_factory=set)  # admitted part indices
    done: set[int] = field(default_factory=set)  # parts read completely
    attached: int = 0
    verdict: asyncio.Future[pb.KVAck] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def admit(self, header: KVTransferHeader, index: int, count: int) -> None:
        if self.verdict.done():
            raise TransferError(f"transfer {self.key!r} already ended")
        if header != self.header or count != self.count:
            raise TransferError(f"stream {index} of transfer {self.key!r} disagrees with its first header")
        if index in self.parts:
            raise TransferError(f"stream {index} of transfer {self.key!r} arrived twice")
        self.parts.add(index)
        self.attached += 1

    def complete(self) -> bool:
        return len(self.done) == self.count

    def bounds(self, index: int) -> tuple[int, int]:
        return stream_part_bounds(self.header.num_bytes, index, self.count)


def stream_part_bounds(num_bytes: int, index: int, count: int) -> tuple[int, int]:
    """Bytes [start, end) of part ``index`` of ``count`` (the split ``KVHeader.stream_index`` documents)."""
    return num_bytes * index // count, num_bytes * (index + 1) // count


def _check_part(proto: pb.KVHeader) -> None:
    if not proto.transfer_id:
        raise TransferError("a stream of a parallel transfer needs a transfer_id")
    if proto.stream_count > MAX_STREAMS or proto.stream_index >= proto.stream_count:
        raise TransferError(f"bad stream {proto.stream_index} of {proto.stream_count} (at most {MAX_STREAMS})")


async def _read_part(
    gathering: _Gathering, index: int, messages: AsyncIterator[Any], executor: Executor | None
) -> None:
    """Copy part ``index``'s data into its range of the shared buffer; it must fill the range exactly."""
    start, end = gathering.bounds(index)
    target = gathering.buffer.numpy()[start:end]
    copier = _ChunkCopier(executor)
    filled = 0
    try:
        async for chunk in messages:
            if gathering.verdict.done():
                raise TransferError("another stream of this transfer failed")
            if not isinstance(chunk, memoryview) and chunk.WhichOneof("payload") == "header":
                raise TransferError("stream carries a second header")
            filled = await copier.write(target, filled, chunk if isinstance(chunk, memoryview) else chunk.data)
    finally:
        copier.settle()
    if filled != end - start:
        raise TransferError(f"short stream: part {index} got {filled} of {end - start} bytes")
    gathering.done.add(index)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for message in rest:
        yield message


class _Staging:
    """The host buffer of one received transfer: from ``pool`` when there is one (given back by ``release``,
    which is idempotent), else a fresh buffer that simply becomes the tensor."""

    def __init__(self, pool: HostBufferPool | None) -> None:
        self._pool = pool
        self._buffer: torch.Tensor | None = None

    def take(self, num_bytes: int) -> torch.Tensor:
        if self._pool is None:
            return torch.empty(num_bytes, dtype=torch.uint8)
        self._buffer = self._pool.take(num_bytes)
        return self._buffer

    def release(self) -> None:
        if self._pool is not None and self._buffer is not None:
            self._pool.give(self._buffer)
            self._buffer = None


class _ChunkCopier:
    """Copies received chunks into the staging buffer on ``executor`` threads (numpy releases the GIL for
    them), so the event loop takes in the next message meanwhile; at most ``depth`` copies are in flight.

    Invariant: after ``settle`` no copy is pending or running (the buffer may then be reused or freed)."""

    def __init__(self, executor: Executor | None, depth: int = 4) -> None:
        self._executor = executor
        self._depth = depth
        self._pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()

    async def write(self, buffer: np.ndarray, filled: int, data: bytes | memoryview) -> int:
        """Copy ``data`` at ``filled`` (now or on a thread); an overflow raises ``TransferError`` at once.
        Returns the new fill level."""
        end = _checked_end(buffer, filled, data)
        if self._executor is None:
            _copy_into(buffer, filled, data)
            return end
        while len(self._pending) >= self._depth:
            await asyncio.wrap_future(self._pending.popleft())
        self._pending.append(self._executor.submit(_copy_into, buffer, filled, data))
        return end

    def settle(self) -> None:
        """Wait for every copy still in flight (each takes about a millisecond); their errors surface here."""
        done, _ = concurrent.futures.wait(self._pending)
        self._pending.clear()
        for future in done:
            if not future.cancelled() and future.exception() is not None:
                raise TransferError(f"copying a received chunk failed: {future.exception()}")


async def _assemble_stream(
    chunks: AsyncIterator[pb.KVChunk | memoryview],
    max_bytes: int | None,
    allocate: Callable[[int], torch.Tensor] | None = None,
    copy_executor: Executor | None = None,
) -> tuple[KVTransferHeader, torch.Tensor]:
    """Read one header then exactly ``num_bytes`` of data into one uint8 buffer from ``allocate`` (default: a
    fresh one), copied straight in (no per-chunk tensors), on ``copy_executor`` threads when given. A chunk is
    a ``KVChunk`` or, for data decoded by ``decode_kv_chunk``, a view of its bytes. ``allocate`` is called at
    most once, after the header passed. On return or raise no copy into the buffer is left running."""
    copier = _ChunkCopier(copy_executor)
    try:
        header, host, filled = await _read_stream(chunks, max_bytes, allocate or _fresh_buffer, copier)
    finally:
        copier.settle()
    if header is None:
        raise TransferError("stream ended without a header")
    if filled != header.num_bytes:
        raise TransferError(f"short stream: got {filled} of {header.num_bytes} bytes")
    return header, host


async def _read_stream(
    chunks: AsyncIterator[pb.KVChunk | memoryview],
    max_bytes: int | None,
    allocate: Callable[[int], torch.Tensor],
    copier: _ChunkCopier,
) -> tuple[KVTransferHeader | None, torch.Tensor, int]:
    """The header, the buffer and how many bytes went into it (see ``_assemble_stream``)."""
    header: KVTransferHeader | None = None
    host = torch.empty(0, dtype=torch.uint8)
    buffer = host.numpy()
    filled = 0
    async for chunk in chunks:
        data = chunk if isinstance(chunk, memoryview) else None
        if data is None and chunk.WhichOneof("payload") == "header":
            if header is not None:
                raise TransferError("stream carries a second header")
            header = KVTransferHeader.from_proto(chunk.header)
            header.validate(max_bytes)
            host = allocate(header.num_bytes)
            buffer = host.numpy()  # a view: chunks are copied straight into ``host``
            continue
        if header is None:
            raise TransferError("stream sent data before its header")
        filled = await copier.write(buffer, filled, chunk.data if data is None else data)
    return header, host, filled


def _fresh_buffer(num_bytes: int) -> torch.Tensor:
    return torch.empty(num_bytes, dtype=torch.uint8)


def _checked_end(buffer: np.ndarray, filled: int, data: bytes | memoryview) -> int:
    """Where ``data`` written at ``filled`` ends; past the buffer's end raises ``TransferError``."""
    end = filled + len(data)
    if end > buffer.size:
        raise TransferError(f"oversized stream: {end} bytes or more, header says {buffer.size}")
    return end


def _copy_into(buffer: np.ndarray, offset: int, data: bytes | memoryview) -> None:
    buffer[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)


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
