"""KV transfer GPU->GPU with NCCL point-to-point (no host copy), one 2-rank group per (prefill, decode) pair.

Pairs: each ``NcclKVSender`` (rank 0) hosts one ``TCPStore``; a pair ``"<sender_id>-><target_address>"``
rendezvouses under the store prefix ``tandem-kv/<pair_id>/<generation>``. The store address travels in every
``RecvNccl`` RPC and is also published in Redis under ``<ns>:nccl:<sender_id>:<receiver_id>`` (with a TTL).
Groups are ``ProcessGroupNCCL`` objects built directly from the store, so one process holds many independent
pairs and no default process group exists.

Per transfer: the sender calls ``RecvNccl`` (header with ``checksum=0``) and at once posts two sends on the
warm pair: ``kv``, then the 16-byte checksum sums ``[s1, s2]`` of ``kv`` (``kv_checksum_sums``), which a
one-pass Triton kernel computes on the sender's stream while NCCL moves the data. The receiver posts the two
matching recvs into fresh CUDA buffers, checksums the received bytes on its stream, and copies both pairs of
sums to pinned host memory behind one CUDA event; a waiter thread blocks on that event (no polling) and
``receive`` raises ``TransferError`` unless the sums match, so ``on_kv`` only ever sees verified bytes. The
checksum thus travels in band, after the data, instead of in the header: the sender never syncs before the
RPC. On a pair's first transfer of a generation both sides first exchange a one-element handshake, so
NCCL's (blocking) communicator set-up is finished before any header check can refuse the data; later NCCL
calls only enqueue work and are made on the event loop.

Invariants: transfers on one pair are serialized by a lock on each side (so sends and recvs match in order);
different pairs overlap freely. Only the receiver's ``ok`` ack proves the data arrived: NCCL may report a
send complete before the peer posted its recv (seen on H200 + NCCL 2.28 for an unmatched 8 MiB send), so a
send that is not acked ok may still be queued. Therefore every failed transfer (refusal, verification
failure, timeout, NCCL error) aborts the sender's group; the next transfer builds generation + 1 and the
receiver drops its older generation when it sees the newer one.
NVLink multicast (NVLS) is always disabled: ``NCCL_NVLS_ENABLE=0`` is forced before a group is made, and
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` defaults to 2 (abort the failed communicator, keep the process alive)
unless the operator set it: a dead peer must not kill a serving worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import torch
import torch.distributed as dist

from common.config import CoordConfig, TransferConfig
from common.transfer.base import ChecksumMismatchError, KVSender, KVTransferHeader, TransferError, TransferResult
from common.transfer.checksum import kv_checksum_sums
from proto import kv_transfer_pb2 as pb
from proto import kv_transfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_TAG = 0
# Blocking NCCL calls (communicator set-up) and CUDA event waits run here, never on the loop. A waiter of a
# stuck transfer holds its thread until the pair is aborted, so keep a margin over the pairs in flight.
_EXECUTOR_THREADS = 16
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


def _set_nccl_environment() -> None:
    """Force ``NCCL_NVLS_ENABLE=0`` (NVLink multicast stays off); default async error handling to CleanUpOnly.

    NCCL and ProcessGroupNCCL read these when a group/communicator is made, so this runs before each one.
    """
    if os.environ.get("NCCL_NVLS_ENABLE", "0") != "0":
        logger.warning("overriding NCCL_NVLS_ENABLE=%s with 0", os.environ["NCCL_NVLS_ENABLE"])
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def _new_group(store: dist.Store, pair_id: str, generation: int, rank: int, timeout_s: float) -> dist.ProcessGroup:
    """A fresh 2-rank NCCL group for one pair generation (its communicator is made lazily, on first use)."""
    _set_nccl_environment()
    prefixed = dist.PrefixStore(f"tandem-kv/{pair_id}/{generation}", store)
    options = dist.ProcessGroupNCCL.Options()
    # Our own deadline (timeout_s) aborts first; NCCL's watchdog is only the backstop.
    options._timeout = timedelta(seconds=2 * timeout_s + 30)
    return dist.ProcessGroupNCCL(prefixed, rank, 2, options)


def _abort_group(group: dist.ProcessGroup | None) -> None:
    """Abort a group's communicators so pending sends/recvs stop; errors are logged, never raised."""
    if group is None:
        return
    try:
        group.abort()
    except Exception:  # noqa: BLE001 - teardown must not mask the original failure
        logger.exception("aborting an NCCL pair group failed")


def _event_after(works: Sequence[dist.Work], device: torch.device) -> torch.cuda.Event:
    """Order ``device``'s current stream after ``works`` and return an event recorded behind them.

    After the event, any kernel on the current stream (checksum, scatter) sees the transferred bytes.
    """
    with torch.cuda.device(device):
        for work in works:
            work.wait()  # non-blocking for the host: the current stream waits for NCCL's
        done = torch.cuda.Event()
        done.record()
    return done


def _post_sends(group: dist.ProcessGroup, kv: torch.Tensor, sums_of: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Enqueue ``kv`` then its checksum sums on a warm pair; the checksum kernel overlaps the data send."""
    with torch.cuda.device(kv.device):
        data = group.send([kv], 1, _TAG)  # NCCL's stream waits for kv's producer first
        sums = sums_of(kv)  # on the current stream, concurrent with the send (both only read kv)
        tail = group.send([sums], 1, _TAG)  # ordered after the checksum kernel
        return _event_after([data, tail], kv.device)


def _post_recvs(group: dist.ProcessGroup, buffer: torch.Tensor) -> tuple[torch.cuda.Event, torch.Tensor]:
    """Enqueue the recvs for data and sums, checksum the data, stage ``[remote s1, s2, local s1, s2]`` on host."""
    with torch.cuda.device(buffer.device):
        remote = torch.empty(2, dtype=torch.int64, device=buffer.device)
        works = [group.recv([buffer], 0, _TAG), group.recv([remote], 0, _TAG)]
        for work in works:
            work.wait()
        staged = torch.empty(4, dtype=torch.int64, pin_memory=True)
        staged.copy_(torch.cat([remote, kv_checksum_sums(buffer)]), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    return done, staged


class _PairRunner:
    """Runs blocking NCCL calls on a small private pool, so a stuck set-up never starves ``asyncio.to_thread``."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="tandem-nccl")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def wait(self, event: torch.cuda.Event, deadline: float) -> None:
        """Block a pool thread (not the loop) on ``event``; ``TimeoutError`` past ``deadline``."""
        waiter = asyncio.get_running_loop().run_in_executor(self._pool, event.synchronize)
        try:
            await asyncio.wait_for(waiter, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise TimeoutError("nccl transfer timed out") from None

    def abort_later(self, group: dist.ProcessGroup | None) -> None:
        """Abort ``group`` off the event loop (an abort can take about 0.5 s); never raises."""
        if group is not None:
            self._pool.submit(_abort_group, group)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _SenderPair:
    """Sender-side state of one pair. ``group is None`` means the next transfer starts a new generation."""

    pair_id: str
    generation: int = 0
    group: dist.ProcessGroup | None = None
    published_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NcclKVSender(KVSender):
    """Prefill-side NCCL sender (rank 0 of every pair it opens). ``kv`` must be a CUDA tensor on ``device``.

    ``redis`` (a ``redis.asyncio.Redis``) and ``coord`` are optional: with them, each pair's store address is
    published under ``nccl_store_key`` with TTL ``coord.ttl_s`` and refreshed by traffic.
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
    ) -> None:
        if not dist.is_available() or not dist.is_nccl_available():
            raise ValueError("this torch build has no NCCL; use the grpc transport")
        self._config = config
        self._sender_id = sender_id
        self._device = torch.device(device)
        self._store_host = store_host
        self._redis = redis
        self._coord = coord or CoordConfig()
        self._store: dist.TCPStore | None = None
        self._pairs: dict[str, _SenderPair] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._runner = _PairRunner()

    async def send(
        self, target_address: str, request_id: str, reservation_id: str, block_ids: Sequence[int], kv: torch.Tensor
    ) -> TransferResult:
        start = time.perf_counter()
        pair = self._pairs.setdefault(target_address, _SenderPair(f"{self._sender_id}->{target_address}"))
        try:
            self._check_tensor(kv)
            # checksum 0: the sums travel in band after the data (module docstring).
            header = KVTransferHeader.describe(request_id, reservation_id, block_ids, kv, "nccl", 0)
            async with pair.lock:
                ack = await self._transfer(pair, target_address, header, kv)
        except (TransferError, TimeoutError, grpc.aio.AioRpcError, RuntimeError) as exc:
            return TransferResult(False, 0, time.perf_counter() - start, _describe(exc))
        seconds = time.perf_counter() - start
        return TransferResult(ack.ok, ack.bytes if ack.ok else 0, seconds, None if ack.ok else ack.error)

    async def close(self) -> None:
        for pair in self._pairs.values():
            _abort_group(pair.group)
            pair.group = None
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(channel.close() for channel in channels.values()))
        self._runner.shutdown()

    def _check_tensor(self, kv: torch.Tensor) -> None:
        if kv.device != self._device and not (kv.is_cuda and kv.device.index == self._device.index):
            raise TransferError(f"nccl sender on {self._device} got a tensor on {kv.device}")
        if not kv.is_contiguous():
            raise TransferError("nccl transfers need a contiguous tensor (gather blocks first)")

    async def _transfer(self, pair: _SenderPair, target: str, header: KVTransferHeader, kv: torch.Tensor) -> pb.KVAck:
        """One transfer under the pair lock. Anything but an ok ack aborts the pair (see module invariants)."""
        deadline = time.monotonic() + self._config.timeout_s
        fresh = await self._ensure_group(pair, target)
        request = self._request(pair, header)
        rpc = asyncio.ensure_future(self._stub(target).RecvNccl(request, timeout=self._config.timeout_s))
        send = asyncio.ensure_future(self._send(pair.group, pair.generation if fresh else None, kv))
        try:
            ack = await _ack_and_send(rpc, send, deadline)
        except BaseException:
            self._reset(pair)
            raise
        if not ack.ok:
            self._reset(pair)
        return ack

    async def _send(self, group: dist.ProcessGroup, handshake: int | None, kv: torch.Tensor) -> None:
        """Post (handshake +) data and checksum sends and wait until NCCL finished them."""
        deadline = time.monotonic() + self._config.timeout_s
        if handshake is not None:  # the first NCCL call of a generation blocks on communicator set-up
            token = torch.tensor([handshake], dtype=torch.int64, device=kv.device)
            work = await self._runner.call(group.send, [token], 1, _TAG)
            await self._runner.wait(_event_after([work], kv.device), deadline)
        if kv.numel():
            await self._runner.wait(_post_sends(group, kv, self._checksum_sums), deadline)

    def _checksum_sums(self, kv: torch.Tensor) -> torch.Tensor:
        """The in-band checksum sums of ``kv`` (a method so tests can send wrong ones)."""
        return kv_checksum_sums(kv)

    async def _ensure_group(self, pair: _SenderPair, target: str) -> bool:
        """Make the pair's group if it has none (a new generation). Returns whether it is new."""
        store = await self._host_store()
        await self._publish(pair, target)
        if pair.group is not None:
            return False
        pair.generation += 1
        pair.group = await self._runner.call(
            _new_group, store, pair.pair_id, pair.generation, 0, self._config.timeout_s
        )
        return True

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
        await publish_store_address(self._redis, self._coord, self._sender_id, target, self._store_address(), ttl)
        pair.published_at = time.monotonic()

    def _store_address(self) -> str:
        assert self._store is not None
        return f"{self._store_host}:{self._store.port}"

    def _request(self, pair: _SenderPair, header: KVTransferHeader) -> pb.NcclTransfer:
        assert self._store is not None
        return pb.NcclTransfer(
            header=header.to_proto(),
            store_host=self._store_host,
            store_port=self._store.port,
            pair_id=pair.pair_id,
            generation=pair.generation,
        )

    def _reset(self, pair: _SenderPair) -> None:
        logger.warning("resetting NCCL pair %s (generation %d)", pair.pair_id, pair.generation)
        self._runner.abort_later(pair.group)
        pair.group = None

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.KVTransferStub(self._channels[address])


def _host_tcp_store(host: str, timeout: timedelta) -> dist.TCPStore:
    """The sender's rendezvous store on a free port of ``host``."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)


async def _ack_and_send(rpc: asyncio.Future, send: asyncio.Future, deadline: float) -> pb.KVAck:
    """The receiver's ack once both the RPC and our sends finished, or as soon as the ack is not ok.

    Raises the first exception of either, or ``TimeoutError`` past ``deadline``; the other is cancelled.
    """
    pending = {rpc, send}
    try:
        while pending:
            timeout = max(deadline - time.monotonic(), 0.0)
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when="FIRST_COMPLETED")
            if not done:
                raise TimeoutError("nccl transfer timed out")
            for future in done:
                future.result()  # re-raise
            if rpc in done and not rpc.result().ok:
                break
    finally:
        for future in pending:
            future.cancel()
    return rpc.result()


@dataclass
class _ReceiverPair:
    """Receiver-side state of one pair generation."""

    generation: int
    store_address: str
    store: dist.Store
    group: dist.ProcessGroup
    joined: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NcclReceiver:
    """Decode-side NCCL endpoint (rank 1 of every pair); plug it into ``KVReceiver(nccl=...)``.

    Received tensors land in fresh buffers on ``device``; the caller (``KVReceiver``) verifies them.
    """

    def __init__(self, device: torch.device | str, timeout_s: float) -> None:
        if not dist.is_available() or not dist.is_nccl_available():
            raise ValueError("this torch build has no NCCL")
        self._device = torch.device(device)
        self._timeout_s = timeout_s
        self._pairs: dict[str, _ReceiverPair] = {}
        self._runner = _PairRunner()

    async def join(self, request: pb.NcclTransfer) -> None:
        """Make sure this process is rank 1 of the request's pair generation (handshake on a new one)."""
        pair = await self._pair(request)
        async with pair.lock:
            if not pair.joined:
                await self._guarded(request.pair_id, pair, self._handshake(pair))
                pair.joined = True

    async def receive(self, request: pb.NcclTransfer, header: KVTransferHeader) -> torch.Tensor:
        """Receive and checksum-verify the header's tensor into a fresh buffer on ``device`` (``join`` first).

        A checksum mismatch or NCCL failure drops the pair and raises ``TransferError``.
        """
        pair = self._pairs.get(request.pair_id)
        if pair is None or pair.generation != request.generation:
            raise TransferError(f"nccl pair {request.pair_id} generation {request.generation} is not joined")
        buffer = torch.empty(header.shape, dtype=header.torch_dtype, device=self._device)
        if buffer.numel():
            await self._guarded(request.pair_id, pair, self._recv_verified(pair, buffer))
        return buffer

    async def close(self) -> None:
        for pair in self._pairs.values():
            _abort_group(pair.group)
        self._pairs.clear()
        self._runner.shutdown()

    async def _pair(self, request: pb.NcclTransfer) -> _ReceiverPair:
        """The pair for the request's generation, replacing (aborting) an older generation."""
        address = f"{request.store_host}:{request.store_port}"
        current = self._pairs.get(request.pair_id)
        if current is not None and (current.generation, current.store_address) == (request.generation, address):
            return current
        if current is not None and current.store_address == address and current.generation > request.generation:
            raise TransferError(f"stale nccl generation {request.generation} < {current.generation}")
        self._drop(request.pair_id)
        store = await self._runner.call(_client_tcp_store, request.store_host, request.store_port, self._timeout_s)
        group = await self._runner.call(_new_group, store, request.pair_id, request.generation, 1, self._timeout_s)
        pair = _ReceiverPair(request.generation, address, store, group)
        self._pairs[request.pair_id] = pair
        return pair

    async def _handshake(self, pair: _ReceiverPair) -> None:
        token = torch.empty(1, dtype=torch.int64, device=self._device)
        await self._recv(pair.group, token)
        if int(token.item()) != pair.generation:
            raise TransferError(f"nccl handshake carried generation {int(token.item())}, expected {pair.generation}")

    async def _recv(self, group: dist.ProcessGroup, buffer: torch.Tensor) -> None:
        """A blocking-safe recv (the handshake: the first call of a generation sets up the communicator)."""
        deadline = time.monotonic() + self._timeout_s
        work = await self._runner.call(group.recv, [buffer], 0, _TAG)
        await self._runner.wait(_event_after([work], buffer.device), deadline)

    async def _recv_verified(self, pair: _ReceiverPair, buffer: torch.Tensor) -> None:
        """Receive data + in-band sums on the warm pair and compare them with the sums of what arrived."""
        deadline = time.monotonic() + self._timeout_s
        async with pair.lock:  # recvs are posted in the sender's order
            done, staged = _post_recvs(pair.group, buffer)
        await self._runner.wait(done, deadline)
        remote_s1, remote_s2, local_s1, local_s2 = staged.tolist()
        if (remote_s1, remote_s2) != (local_s1, local_s2):
            raise ChecksumMismatchError(
                f"checksum mismatch: sender sums ({remote_s1:#x}, {remote_s2:#x}), "
                f"received bytes ({local_s1:#x}, {local_s2:#x})"
            )

    async def _guarded(self, pair_id: str, pair: _ReceiverPair, step: Awaitable[None]) -> None:
        """Run an NCCL step; on any failure drop the pair (its sends/recvs may be unmatched) and raise
        TransferError."""
        try:
            await step
        except (TimeoutError, RuntimeError, TransferError) as exc:
            if self._pairs.get(pair_id) is pair:
                self._drop(pair_id)
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"nccl receive failed: {_describe(exc)}") from exc

    def _drop(self, pair_id: str) -> None:
        pair = self._pairs.pop(pair_id, None)
        if pair is not None:
            self._runner.abort_later(pair.group)


def _client_tcp_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc {exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransferError) else str(exc)
