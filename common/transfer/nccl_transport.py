"""KV transfer GPU->GPU with NCCL point-to-point (no host copy), one 2-rank group per (prefill, decode) pair.

Pairs: each ``NcclKVSender`` (rank 0) hosts one ``TCPStore``; a pair ``"<sender_id>-><target_address>"``
rendezvouses under the store prefix ``tandem-kv/<pair_id>/<generation>``. The store address travels in the
channel's ``ChannelOpen`` and is also published in Redis under ``<ns>:nccl:<sender_id>:<receiver_id>`` (with
a TTL). Groups are built directly from the store, so one process holds many independent pairs and no default
process group exists. The group flavour is injectable (``pair_backend``): NCCL in production, gloo on CPU in
tests, same code otherwise.

Control channel: one long-lived ``KVTransfer.Control`` bidirectional gRPC stream per pair generation. It opens
with ``ChannelOpen`` (the receiver builds its half of the group, both exchange a one-element handshake so the
blocking communicator set-up is over, the receiver acks id 0). Then each transfer is one
``TransferDescriptor`` (id 1, 2, ...) after which the sender at once posts its sends: the pieces of ``kv``
(``placement.piece_runs``: one op per (layer, k, run of the receiver's consecutive block ids), all in one NCCL
group; one op of the whole tensor when the ids form more than ``MAX_DIRECT_RUNS`` runs) and its 16-byte
checksum sums (a one-pass Triton kernel on the sender's stream, overlapping the data send). The receiver posts
the matching recvs in descriptor order on its own side stream: straight into the reserved cache blocks when
the injected ``place`` maps the header's reservation (``DirectPlacement``), else into the same pieces of a
fresh buffer; it checksums what arrived (over the pieces, weighted at their positions in ``kv``), stages the
sums to pinned host memory and records an event, which the loop polls (no thread, no host sync per
transfer); acks go by id, several transfers are in flight at once and acks may come in any order.

Invariants:
- Sends and recvs of one pair are posted in descriptor order on both sides (the sender posts under a lock,
  the receiver in its read loop), so NCCL matches them without tags; gloo gets per-transfer tags as well.
  Both sides derive the piece list from the header alone, so their op lists always match.
- A transfer that is refused after its descriptor (unknown reservation, checksum mismatch) is still fully
  received (drained), so it fails alone and the channel stays in step. Only a desync risk breaks the channel:
  an oversized header (cannot be drained), an NCCL error or timeout, a broken stream, or a protocol error.
  A broken channel fails every in-flight transfer on the sender (``ok=False``), aborts the group, and the
  next send opens generation + 1; the receiver drops an older generation when it sees a newer one.
- Only an ok ack proves the data arrived; ``on_kv`` only ever sees checksum-verified bytes, and a direct
  placement is committed (its reservation filled) only after the same verification; any failure abandons it,
  so corrupt bytes sitting in reserved blocks never reach an adopted request.
Not yet done (issue 11, deliverable 3): chunk-/layer-wise pipelining. Design: a descriptor may describe one
slice ``(layer range, block range)`` of a request's KV; the reservation is filled when the slices cover it (the
receiver tracks coverage per reservation and verifies each slice's in-band sums). Prefill side, chunk-wise:
the engine exposes per-step "blocks completed" for an ``export_kv`` request (block ids full after this step),
and ``_ship`` posts a slice per chunk on the same channel while the next chunk computes; layer-wise: the model
runner records a CUDA event after each layer's KV write and ``post_send`` for layer l makes the NCCL stream
wait on it. Decode side: a slice lands directly like a whole transfer (its pieces are a subset of the runs).
NVLink multicast (NVLS) is always disabled (``pair_backend``), and ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
defaults to 2 (abort the failed communicator, keep the process alive): a dead peer must not kill a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import torch
import torch.distributed as dist

from common.config import CoordConfig, TransferConfig
from common.transfer.base import (
    ChecksumMismatchError,
    Deliver,
    KVSender,
    KVTransferHeader,
    Place,
    TransferError,
    TransferResult,
    WriteAck,
)
from common.transfer.checksum import kv_checksum_sums
from common.transfer.pair_backend import LocalSums, PairBackend, ReceivedSums, abort_group, default_backend
from common.transfer.placement import (
    BlockRun,
    DirectPlacement,
    cache_piece_sums,
    fits_cache,
    piece_runs,
    pieces,
)
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# Blocking calls (group set-up, handshakes) run here, never on the loop; transfers complete by polling instead.
_EXECUTOR_THREADS = 32
_TAG_SPACE = 1 << 30  # gloo tags: 2 * transfer_id (data) and + 1 (sums), wrapped; 0 is the handshake
_SPIN_S = 0.002  # a receive is polled at every loop turn this long, then every _POLL_S (asyncio's ~1 ms floor)
_POLL_S = 0.0005
T = TypeVar("T")


def nccl_store_key(namespace: str, sender_id: str, receiver_id: str) -> str:
    """The Redis key under which a sender publishes its TCPStore ``host:port`` for one pair."""
    return f"{namespace}:nccl:{sender_id}:{receiver_id}"


async def publish_store_address(
    redis: Any, coord: CoordConfig, sender_id: str, receiver_id: str, address: str, ttl_s: float
) -> None:
    """Publish ``address`` (host:port) for the pair, expiring after ``ttl_s`` unless refreshed."""
    await redis.set(nccl_store_key(coord.namespace, sender_id, receiver_id), address, px=int(ttl_s * 1000))


async def lookup_store_address(redis: Any, coord: CoordConfig, sender_id: str, receiver_id: str) -> str | None:
    """The published TCPStore ``host:port`` of a pair, or None when absent or expired."""
    raw = await redis.get(nccl_store_key(coord.namespace, sender_id, receiver_id))
    return raw.decode() if isinstance(raw, bytes) else raw


def transfer_tag(transfer_id: int) -> int:
    """The data op's tag of a transfer (its sums use tag + 1); never 0, the handshake's."""
    return 2 * (transfer_id % _TAG_SPACE) + 2


def _store_prefix(pair_id: str, generation: int) -> str:
    return f"tandem-kv/{pair_id}/{generation}"


class _Runner:
    """Runs blocking calls on a small private pool, so a stuck set-up never starves ``asyncio.to_thread``."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="tandem-kv-pair")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def wait(self, fn: Callable[[], T], deadline: float) -> T:
        """``fn()`` on a pool thread; ``TimeoutError`` past ``deadline`` (the thread is freed by an abort)."""
        waiter = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        try:
            return await asyncio.wait_for(waiter, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise TimeoutError("transfer timed out") from None

    def abort_later(self, group: dist.ProcessGroup | None) -> None:
        """Abort ``group`` off the event loop (an abort can take about 0.5 s); never raises."""
        if group is not None:
            self._pool.submit(abort_group, group)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- sender side


@dataclass
class _Channel:
    """One open generation of a pair: its group, its Control stream, and the acks still awaited."""

    generation: int
    group: dist.ProcessGroup
    call: Any  # grpc.aio.StreamStreamCall
    acks: dict[int, asyncio.Future] = field(default_factory=dict)
    sends: dict[int, Any] = field(default_factory=dict)  # posted ops, kept alive until acked (gloo needs it)
    next_id: int = 1
    reader: asyncio.Task | None = None
    broken: str | None = None


@dataclass
class _SenderPair:
    """Sender-side state of one pair. ``channel is None`` means the next transfer opens a new generation."""

    pair_id: str
    generation: int = 0
    channel: _Channel | None = None
    published_at: float = 0.0
    open_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    post_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NcclKVSender(KVSender):
    """Prefill-side sender (rank 0 of every pair it opens). ``kv`` must be a contiguous tensor on ``device``.

    Concurrent ``send`` calls to one target share the pair's channel and are in flight together.
    ``redis`` (a ``redis.asyncio.Redis``) and ``coord`` are optional: with them, each pair's store address is
    published under ``nccl_store_key`` with TTL ``coord.ttl_s`` and refreshed by traffic. ``backend``
    defaults to NCCL on CUDA (gloo on CPU, for tests).
    """

    transport = "nccl"

    def __init__(
        self,
        config: TransferConfig,
        sender_id: str,
        device: torch.device | str,
        store_host: str = "127.0.0.1",
        redis: Any = None,
        coord: CoordConfig | None = None,
        backend: PairBackend | None = None,
    ) -> None:
        self._device = torch.device(device)
        self._backend = backend or default_backend(self._device)
        self._config = config
        self._sender_id = sender_id
        self._store_host = store_host
        self._redis = redis
        self._coord = coord or CoordConfig()
        self._store: dist.TCPStore | None = None
        self._pairs: dict[str, _SenderPair] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._runner = _Runner()

    async def send(
        self, target_address: str, request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor
    ) -> TransferResult:
        start = time.perf_counter()
        pair = self._pairs.setdefault(target_address, _SenderPair(f"{self._sender_id}->{target_address}"))
        try:
            self._check_tensor(kv)
            # checksum 0: the sums travel in band after the data (module docstring).
            header = KVTransferHeader.describe(request_id, reservation_id, block_ids, kv, "nccl", 0)
            ack = await self._transfer(pair, target_address, header, kv)
        except (TransferError, TimeoutError, grpc.aio.AioRpcError, RuntimeError) as exc:
            return TransferResult(False, 0, time.perf_counter() - start, _describe(exc))
        seconds = time.perf_counter() - start
        return TransferResult(ack.ok, ack.bytes if ack.ok else 0, seconds, None if ack.ok else ack.error)

    async def close(self) -> None:
        for pair in self._pairs.values():
            if pair.channel is not None:
                self._break(pair, pair.channel, "sender closed")
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(channel.close() for channel in channels.values()))
        self._runner.shutdown()

    def _check_tensor(self, kv: torch.Tensor) -> None:
        if kv.device.type != self._device.type or (kv.is_cuda and kv.device.index != self._device.index):
            raise TransferError(f"sender on {self._device} got a tensor on {kv.device}")
        if not kv.is_contiguous():
            raise TransferError("pair transfers need a contiguous tensor (gather blocks first)")

    async def _transfer(self, pair: _SenderPair, target: str, header: KVTransferHeader, kv: torch.Tensor) -> pb.KVAck:
        """Post one transfer on the pair's channel and await its ack; a timeout breaks the channel."""
        deadline = time.monotonic() + self._config.timeout_s
        channel = await self._open(pair, target, deadline)
        ack = await self._post(pair, channel, header, kv)
        try:
            return await asyncio.wait_for(asyncio.shield(ack), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self._break(pair, channel, "transfer timed out")
            raise TimeoutError("transfer timed out") from None

    async def _post(
        self, pair: _SenderPair, channel: _Channel, header: KVTransferHeader, kv: torch.Tensor
    ) -> asyncio.Future:
        """Write the descriptor and enqueue the sends, both in channel order; returns the ack's future."""
        async with pair.post_lock:
            if channel.broken is not None:
                raise TransferError(f"channel broken: {channel.broken}")
            transfer_id, channel.next_id = channel.next_id, channel.next_id + 1
            ack = channel.acks[transfer_id] = asyncio.get_running_loop().create_future()
            descriptor = pb.TransferDescriptor(transfer_id=transfer_id, header=header.to_proto())
            await channel.call.write(pb.ControlMessage(transfer=descriptor))
            if kv.numel():
                tag = transfer_tag(transfer_id)
                runs = piece_runs(header.shape, kv.element_size(), header.block_ids)
                parts = [kv] if runs is None else pieces(kv, runs, by_block_id=False)
                channel.sends[transfer_id] = self._backend.post_send(channel.group, kv, parts, tag, self._checksum_sums)
        return ack

    def _checksum_sums(self, kv: torch.Tensor) -> torch.Tensor:
        """The in-band checksum sums of ``kv`` (a method so tests can send wrong ones)."""
        return kv_checksum_sums(kv)

    async def _open(self, pair: _SenderPair, target: str, deadline: float) -> _Channel:
        """The pair's open channel, opening generation + 1 (group, stream, handshake) when it has none."""
        async with pair.open_lock:
            await self._publish(pair, target)
            if pair.channel is not None and pair.channel.broken is None:
                return pair.channel
            pair.generation += 1
            channel = await self._handshake(pair, target, deadline)
            channel.reader = asyncio.get_running_loop().create_task(self._read_acks(pair, channel))
            pair.channel = channel
            return channel

    async def _handshake(self, pair: _SenderPair, target: str, deadline: float) -> _Channel:
        store = await self._host_store()
        call = self._stub(target).Control()
        group = None
        try:
            await call.write(pb.ControlMessage(open=self._open_message(pair)))
            prefix = _store_prefix(pair.pair_id, pair.generation)
            group = await self._runner.call(self._backend.new_group, store, prefix, 0, self._config.timeout_s)
            token = torch.tensor([pair.generation], dtype=torch.int64, device=self._device)
            await self._runner.wait(lambda: self._backend.exchange(group, token, 0)(), deadline)
            opened = await asyncio.wait_for(call.read(), max(deadline - time.monotonic(), 0.0))
            if opened is grpc.aio.EOF or not opened.ack.ok:
                raise TransferError(f"receiver refused the channel: {getattr(opened, 'ack', None)}")
        except BaseException:
            call.cancel()
            self._runner.abort_later(group)
            raise
        return _Channel(pair.generation, group, call)

    def _open_message(self, pair: _SenderPair) -> pb.ChannelOpen:
        assert self._store is not None
        return pb.ChannelOpen(
            store_host=self._store_host, store_port=self._store.port, pair_id=pair.pair_id, generation=pair.generation
        )

    async def _read_acks(self, pair: _SenderPair, channel: _Channel) -> None:
        """Resolve ack futures by id until the stream ends; then the channel is broken."""
        reason = "receiver closed the channel"
        try:
            while (message := await channel.call.read()) is not grpc.aio.EOF:
                channel.sends.pop(message.transfer_id, None)
                future = channel.acks.pop(message.transfer_id, None)
                if future is not None and not future.done():
                    future.set_result(message.ack)
                if message.closing:
                    reason = f"receiver closed the channel: {message.ack.error}"
                    break
        except grpc.aio.AioRpcError as exc:
            reason = _describe(exc)
        except asyncio.CancelledError:
            reason = "channel closed"
        self._break(pair, channel, reason)

    def _break(self, pair: _SenderPair, channel: _Channel, reason: str) -> None:
        """Fail every in-flight transfer of ``channel`` and abort its group (idempotent)."""
        if channel.broken is None:
            channel.broken = reason
            if channel.acks:
                logger.warning("pair %s generation %d broken: %s", pair.pair_id, channel.generation, reason)
            self._runner.abort_later(channel.group)
            channel.call.cancel()
        for future in channel.acks.values():
            if not future.done():
                future.set_exception(TransferError(f"channel broken: {reason}"))
                future.exception()  # retrieved: a sender that already timed out does not await it
        channel.acks.clear()
        channel.sends.clear()
        if pair.channel is channel:
            pair.channel = None

    async def _host_store(self) -> dist.TCPStore:
        if self._store is None:
            timeout = timedelta(seconds=self._config.timeout_s)
            self._store = await self._runner.call(_host_tcp_store, self._store_host, timeout)
        return self._store

    async def _publish(self, pair: _SenderPair, target: str) -> None:
        """Refresh the pair's Redis key when it is older than half its TTL (no-op without Redis)."""
        ttl = self._coord.ttl_s
        if self._redis is None or time.monotonic() - pair.published_at < ttl / 2:
            return
        store = await self._host_store()
        address = f"{self._store_host}:{store.port}"
        await publish_store_address(self._redis, self._coord, self._sender_id, target, address, ttl)
        pair.published_at = time.monotonic()

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.KVTransferStub(self._channels[address])


def _host_tcp_store(host: str, timeout: timedelta) -> dist.TCPStore:
    """The sender's rendezvous store on a free port of ``host``."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)


# ---------------------------------------------------------------- receiver side


@dataclass
class _ReceiverPair:
    """Receiver-side state of one pair generation (lives as long as its Control stream)."""

    generation: int
    store_address: str
    group: dist.ProcessGroup
    next_id: int = 1
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task] = field(default_factory=set)


class NcclReceiver:
    """Decode-side endpoint (rank 1 of every pair); plug it into ``KVReceiver(nccl=...)``, which hands it each
    ``Control`` stream. Received bytes land in the reserved blocks that ``place`` claims (then committed,
    ``deliver`` gets None) or in fresh buffers on ``device`` (``deliver`` passes them on), checksum-verified on
    its side stream (never the engine's) either way.
    """

    def __init__(
        self,
        device: torch.device | str,
        timeout_s: float,
        backend: PairBackend | None = None,
        place: Place | None = None,
    ) -> None:
        self._device = torch.device(device)
        self._place = place
        self._backend = backend or default_backend(self._device, side_stream=True)
        self._timeout_s = timeout_s
        self._pairs: dict[str, _ReceiverPair] = {}
        self._runner = _Runner()

    async def serve(
        self, messages: AsyncIterator[pb.ControlMessage], write: WriteAck, deliver: Deliver, max_bytes: int | None
    ) -> None:
        """Run one Control stream: join the pair, then receive descriptors in order until the stream or the
        pair breaks. In-flight transfers of a broken pair fail (their acks may not be written)."""
        first = await anext(aiter(messages), None)
        if first is None or first.WhichOneof("kind") != "open":
            await write(_ack(0, pb.KVAck(ok=False, error="a Control stream must start with ChannelOpen")))
            return
        try:
            pair_id, pair = first.open.pair_id, await self._join(first.open)
        except (TransferError, TimeoutError, RuntimeError) as exc:
            await write(_ack(0, pb.KVAck(ok=False, error=_describe(exc))))
            return
        await write(_ack(0, pb.KVAck(ok=True)))
        reading = asyncio.ensure_future(self._read(pair, messages, write, deliver, max_bytes))
        broken = asyncio.ensure_future(pair.broken.wait())
        try:
            await asyncio.wait({reading, broken}, return_when="FIRST_COMPLETED")
            if reading.done():
                reading.result()
                await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            for task in (reading, broken, *pair.tasks):
                task.cancel()
            self._drop(pair_id, pair)

    async def close(self) -> None:
        for pair_id, pair in list(self._pairs.items()):
            self._drop(pair_id, pair)
        self._runner.shutdown()

    async def _join(self, request: pb.ChannelOpen) -> _ReceiverPair:
        """Become rank 1 of the pair's new generation (dropping an older one) and finish the handshake."""
        address = f"{request.store_host}:{request.store_port}"
        current = self._pairs.get(request.pair_id)
        if current is not None and current.store_address == address and current.generation >= request.generation:
            raise TransferError(f"stale generation {request.generation} <= {current.generation}")
        if current is not None:
            self._drop(request.pair_id, current)
        deadline = time.monotonic() + self._timeout_s
        store = await self._runner.call(_client_tcp_store, request.store_host, request.store_port, self._timeout_s)
        prefix = _store_prefix(request.pair_id, request.generation)
        group = await self._runner.call(self._backend.new_group, store, prefix, 1, self._timeout_s)
        pair = _ReceiverPair(request.generation, address, group)
        self._pairs[request.pair_id] = pair
        token = torch.zeros(1, dtype=torch.int64, device=self._device)
        await self._runner.wait(lambda: self._backend.exchange(group, token, 1)(), deadline)
        if int(token.item()) != request.generation:
            raise TransferError(f"handshake carried generation {int(token.item())}, expected {request.generation}")
        return pair

    async def _read(
        self,
        pair: _ReceiverPair,
        messages: AsyncIterator[pb.ControlMessage],
        write: WriteAck,
        deliver: Deliver,
        max_bytes: int | None,
    ) -> None:
        """Post each descriptor's recvs in order; verification and delivery run as one task per transfer."""
        async for message in messages:
            descriptor = message.transfer
            if message.WhichOneof("kind") != "transfer" or descriptor.transfer_id != pair.next_id:
                raise TransferError(f"protocol error: expected transfer {pair.next_id}, got {message}")
            pair.next_id += 1
            start = time.perf_counter()
            header = KVTransferHeader.from_proto(descriptor.header)
            try:
                header.validate(max_bytes)
            except TransferError as exc:  # its sends are posted and cannot be drained: the pair breaks
                ack = await deliver(header, _raise(exc), start)
                await write(pb.ControlAck(transfer_id=descriptor.transfer_id, ack=ack, closing=True))
                return
            received = self._post(pair, header, descriptor.transfer_id)
            finish = self._finish(descriptor.transfer_id, header, received, start, write, deliver)
            task = asyncio.ensure_future(finish)
            pair.tasks.add(task)
            task.add_done_callback(pair.tasks.discard)

    def _post(self, pair: _ReceiverPair, header: KVTransferHeader, transfer_id: int) -> Awaitable[torch.Tensor | None]:
        """Enqueue the transfer's recvs now (descriptor order): straight into the reserved blocks when
        ``place`` maps them, else into a fresh buffer; the awaitable verifies what arrived."""
        runs = piece_runs(header.shape, header.torch_dtype.itemsize, header.block_ids)
        placement = self._placement(header, runs)
        if placement is not None and runs is not None:
            parts = pieces(placement.cache, runs, by_block_id=True)
            sums = functools.partial(cache_piece_sums, placement.cache, runs, header.shape[2])
            return self._landed(pair, parts, sums, transfer_id, placement, None)
        buffer = torch.empty(header.shape, dtype=header.torch_dtype, device=self._device)
        if not buffer.numel():
            return _value(buffer)
        parts = [buffer] if runs is None else pieces(buffer, runs, by_block_id=False)
        return self._landed(pair, parts, functools.partial(kv_checksum_sums, buffer), transfer_id, None, buffer)

    def _placement(self, header: KVTransferHeader, runs: list[BlockRun] | None) -> DirectPlacement | None:
        """The claimed cache blocks of ``header``'s reservation when the bytes can land there, else None."""
        if runs is None or self._place is None:
            return None
        placement = self._place(header)
        if placement is None:
            return None
        cache = placement.cache
        if cache.device != self._device or not fits_cache(cache, header.shape, header.torch_dtype, header.block_ids):
            placement.abandon()  # claimed but unusable: the buffer path (and on_kv) decide
            return None
        return placement

    def _landed(
        self,
        pair: _ReceiverPair,
        parts: list[torch.Tensor],
        local_sums: LocalSums,
        transfer_id: int,
        placement: DirectPlacement | None,
        buffer: torch.Tensor | None,
    ) -> Awaitable[torch.Tensor | None]:
        """Post the recvs into ``parts`` and start verifying them as a task of its own, so a placement is
        settled however the transfer ends (even when its delivery is cancelled before it awaits the task)."""
        committed: list[bool] = []
        try:
            received = self._backend.post_recv(pair.group, parts, transfer_tag(transfer_id), local_sums)
        except BaseException:
            if placement is not None:
                placement.abandon()
            raise
        deadline = time.monotonic() + self._timeout_s
        task = asyncio.ensure_future(self._verified(pair, received, deadline, placement, committed, buffer))
        task.add_done_callback(functools.partial(_settle, placement, committed))
        return task

    async def _verified(
        self,
        pair: _ReceiverPair,
        received: ReceivedSums,
        deadline: float,
        placement: DirectPlacement | None,
        committed: list[bool],
        buffer: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """``buffer`` once its bytes arrived and match the sender's sums, or None once a direct placement
        holds them and is committed (filled; ``committed`` says so); an op failure breaks the pair."""
        try:
            remote, local = await _completion(received, deadline)
        except (TimeoutError, RuntimeError) as exc:
            pair.broken.set()
            raise TransferError(f"receive failed: {_describe(exc)}") from exc
        if remote != local:
            raise ChecksumMismatchError(
                f"checksum mismatch: sender sums ({remote[0]:#x}, {remote[1]:#x}), "
                f"received bytes ({local[0]:#x}, {local[1]:#x})"
            )
        if placement is not None:
            committed.append(True)
            placement.commit()  # may refuse (ValueError): it then cleans up itself
        return buffer

    async def _finish(
        self,
        transfer_id: int,
        header: KVTransferHeader,
        received: Awaitable[torch.Tensor | None],
        start: float,
        write: WriteAck,
        deliver: Deliver,
    ) -> None:
        ack = await deliver(header, received, start)
        with contextlib.suppress(Exception):  # the stream may be gone; the sender then fails this transfer
            await write(_ack(transfer_id, ack))

    def _drop(self, pair_id: str, pair: _ReceiverPair) -> None:
        if self._pairs.get(pair_id) is pair:
            del self._pairs[pair_id]
        self._runner.abort_later(pair.group)


def _ack(transfer_id: int, ack: pb.KVAck) -> pb.ControlAck:
    return pb.ControlAck(transfer_id=transfer_id, ack=ack)


async def _raise(exc: Exception) -> torch.Tensor:
    raise exc


async def _value(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _settle(placement: DirectPlacement | None, committed: list[bool], task: asyncio.Task) -> None:
    """A verification task's end: abandon its placement unless committed; retrieve an unawaited failure."""
    if placement is not None and not committed:
        placement.abandon()
    if not task.cancelled():
        task.exception()


async def _completion(received: ReceivedSums, deadline: float) -> tuple[list[int], list[int]]:
    """Both sums of a receive once it completed, polled from the loop (no thread, no host sync): yield to the
    loop for the first ``_SPIN_S`` (a typical transfer), then sleep ``_POLL_S`` between polls."""
    start = time.monotonic()
    while not received.ready():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError("transfer timed out")
        await asyncio.sleep(0 if now - start < _SPIN_S else _POLL_S)
    return received.sums()


def _client_tcp_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc {exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransferError) else str(exc)
