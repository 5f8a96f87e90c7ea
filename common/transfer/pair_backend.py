"""How a transfer pair's 2-rank process group is made and how its point-to-point ops complete.

``NcclBackend`` (production): a ``ProcessGroupNCCL``; ops only enqueue on NCCL's stream (the pieces of one
transfer in one NCCL group, ``_start_coalescing``/``_end_coalescing``), and a receive's completion is a CUDA
event recorded behind the recvs, the checksum kernel and a non-blocking copy of the 4 sums to pinned host
memory: polling it (``ReceivedSums.ready``) costs no thread and no sync, and reading the sums afterwards is
free. ``GlooBackend`` (CPU tests): a ``ProcessGroupGloo`` over the same store, so the channel logic in
``nccl_transport`` runs unchanged on a machine without GPUs.

Invariant for both: ``post_send``/``post_recv`` never block the caller (they only enqueue), and the ops of one
pair complete in the order they were posted on each side; a send's waiter is a blocking callable that returns
once the bytes have been handed to the transport, a receive's ``ReceivedSums`` says when its bytes are usable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
_GLOO_WAIT_THREADS = 16  # receives waited on at once per gloo backend (tests hold a few in flight)

Waiter = Callable[[], None]
SumsOf = Callable[[torch.Tensor], torch.Tensor]
LocalSums = Callable[[], torch.Tensor]  # the received bytes' [s1, s2], enqueued once they arrived


class ReceivedSums(Protocol):
    """One posted receive: ``ready`` polls without blocking; ``sums`` (only once ready) gives the sender's
    ``[s1, s2]`` and the received bytes' ``[s1, s2]``, or raises ``RuntimeError`` if an op failed."""

    def ready(self) -> bool: ...

    def sums(self) -> tuple[list[int], list[int]]: ...


class PairBackend(Protocol):
    """The process-group flavour of a pair (see the module docstring)."""

    name: str

    def new_group(self, store: dist.Store, prefix: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
        """A fresh 2-rank group under ``prefix`` of ``store`` (may block on the peer: call it off the loop)."""
        ...

    def exchange(self, group: dist.ProcessGroup, token: torch.Tensor, rank: int) -> Waiter:
        """The handshake: rank 0 sends ``token``, rank 1 receives into it (the first op sets up the group)."""
        ...

    def post_send(
        self, group: dist.ProcessGroup, kv: torch.Tensor, pieces: list[torch.Tensor], tag: int, sums_of: SumsOf
    ) -> Waiter:
        """Enqueue ``pieces`` of ``kv`` (tag) then ``kv``'s checksum sums (tag + 1) to rank 1."""
        ...

    def post_recv(
        self, group: dist.ProcessGroup, pieces: list[torch.Tensor], tag: int, local_sums: LocalSums
    ) -> ReceivedSums:
        """Enqueue the matching recvs into ``pieces`` and a 2-word sums tensor, then ``local_sums()``."""
        ...


def abort_group(group: dist.ProcessGroup | None) -> None:
    """Abort a group so pending ops stop (gloo has no abort: its ops fail on their timeout); never raises."""
    if group is None:
        return
    try:
        group.abort()
    except Exception:  # noqa: BLE001 - teardown must not mask the original failure
        logger.debug("aborting a pair group failed", exc_info=True)


def _set_nccl_environment() -> None:
    """Force ``NCCL_NVLS_ENABLE=0`` (NVLink multicast stays off); default async error handling to CleanUpOnly.

    NCCL and ProcessGroupNCCL read these when a group/communicator is made, so this runs before each one.
    """
    if os.environ.get("NCCL_NVLS_ENABLE", "0") != "0":
        logger.warning("overriding NCCL_NVLS_ENABLE=%s with 0", os.environ["NCCL_NVLS_ENABLE"])
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


class NcclBackend:
    """NCCL on one CUDA device. Receive-side work (recvs, checksum) runs on ``stream``, never on the engine's."""

    name = "nccl"

    def __init__(self, device: torch.device, side_stream: bool = False) -> None:
        if not dist.is_available() or not dist.is_nccl_available():
            raise ValueError("this torch build has no NCCL; use the grpc transport")
        self.device = device
        self.stream = torch.cuda.Stream(device) if side_stream else None

    def new_group(self, store: dist.Store, prefix: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
        _set_nccl_environment()
        options = dist.ProcessGroupNCCL.Options()
        # Our own deadline (timeout_s) aborts first; NCCL's watchdog is only the backstop.
        options._timeout = timedelta(seconds=2 * timeout_s + 30)
        return dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, 2, options)

    def exchange(self, group: dist.ProcessGroup, token: torch.Tensor, rank: int) -> Waiter:
        """The handshake, single and grouped: some ProcessGroupNCCL versions run grouped p2p (``_grouped``) on
        the group's own communicator rather than the 2-rank p2p one, each made (blocking) by its first op, so
        both are made here, off the event loop, and never by a transfer (harmless where they are one)."""
        with self._on_stream():
            work = group.send([token], 1, 0) if rank == 0 else group.recv([token], 0, 0)
            probe = token.clone()  # the grouped copy lands apart: two streams must not write one tensor
            grouped = self._grouped(group, [probe], 0, send=rank == 0, always_group=True)
            return self._event_after([work, grouped]).synchronize

    def post_send(
        self, group: dist.ProcessGroup, kv: torch.Tensor, pieces: list[torch.Tensor], tag: int, sums_of: SumsOf
    ) -> Waiter:
        with torch.cuda.device(kv.device):
            data = self._grouped(group, pieces, tag, send=True)  # NCCL's stream waits for kv's producer first
            sums = sums_of(kv)  # on the current stream, concurrent with the send (both only read kv)
            tail = group.send([sums], 1, tag + 1)  # ordered after the checksum kernel
            return self._event_after([data, tail]).synchronize

    def post_recv(
        self, group: dist.ProcessGroup, pieces: list[torch.Tensor], tag: int, local_sums: LocalSums
    ) -> ReceivedSums:
        with self._on_stream():
            remote = torch.empty(2, dtype=torch.int64, device=self.device)
            works = [self._grouped(group, pieces, tag, send=False), group.recv([remote], 0, tag + 1)]
            for work in works:
                work.wait()  # non-blocking for the host: this stream waits for NCCL's
            staged = torch.empty(4, dtype=torch.int64, pin_memory=True)
            staged.copy_(torch.cat([remote, local_sums()]), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return _EventSums(done, staged)

    def _grouped(
        self, group: dist.ProcessGroup, pieces: list[torch.Tensor], tag: int, send: bool, always_group: bool = False
    ) -> dist.Work:
        """One op per piece (send to rank 1 or recv from rank 0), all in one NCCL group: one work, one launch."""
        if len(pieces) == 1 and not always_group:
            return group.send(pieces, 1, tag) if send else group.recv(pieces, 0, tag)
        device = pieces[0].device  # an indexed CUDA device, as coalescing wants
        group._start_coalescing(device)
        for piece in pieces:
            if send:
                group.send([piece], 1, tag)
            else:
                group.recv([piece], 0, tag)
        return group._end_coalescing(device)

    def _event_after(self, works: list[dist.Work]) -> torch.cuda.Event:
        """An event on the current stream recorded behind ``works`` (the stream waits for NCCL's, the host not)."""
        for work in works:
            work.wait()
        done = torch.cuda.Event()
        done.record()
        return done

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield


class GlooBackend:
    """Gloo over CPU tensors: the same channel code without GPUs (tests). Sums are computed once data arrived.

    A gloo work only reports completion from ``wait()``, so each receive waits on a thread of a small pool
    (a test-only cost; NCCL polls an event instead).
    """

    name = "gloo"

    def __init__(self) -> None:
        self._waiters = ThreadPoolExecutor(_GLOO_WAIT_THREADS, thread_name_prefix="tandem-kv-gloo")

    def new_group(self, store: dist.Store, prefix: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
        # The constructor connects both ranks, so it blocks until the peer makes its half.
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, timedelta(seconds=timeout_s))

    def exchange(self, group: dist.ProcessGroup, token: torch.Tensor, rank: int) -> Waiter:
        work = group.send([token], 1, 0) if rank == 0 else group.recv([token], 0, 0)
        return work.wait

    def post_send(
        self, group: dist.ProcessGroup, kv: torch.Tensor, pieces: list[torch.Tensor], tag: int, sums_of: SumsOf
    ) -> Waiter:
        # Pieces of one transfer share its tag: gloo matches one pair's ops of one tag in posting order.
        works = [group.send([piece], 1, tag) for piece in pieces] + [group.send([sums_of(kv)], 1, tag + 1)]
        return lambda: _wait_all(works)

    def post_recv(
        self, group: dist.ProcessGroup, pieces: list[torch.Tensor], tag: int, local_sums: LocalSums
    ) -> ReceivedSums:
        remote = torch.empty(2, dtype=torch.int64)
        works = [group.recv([piece], 0, tag) for piece in pieces] + [group.recv([remote], 0, tag + 1)]
        waited = self._waiters.submit(_wait_all, works)
        return _GlooSums(waited, remote, local_sums)


class _EventSums:
    """A receive on a CUDA stream: done when ``event`` is; the 4 sums wait in pinned ``staged``."""

    def __init__(self, event: torch.cuda.Event, staged: torch.Tensor) -> None:
        self._event, self._staged = event, staged

    def ready(self) -> bool:
        return self._event.query()

    def sums(self) -> tuple[list[int], list[int]]:
        self._event.synchronize()  # a no-op once ready
        values = self._staged.tolist()
        return values[:2], values[2:]


class _GlooSums:
    """A gloo receive: done when its waiting thread is; the local sums are computed on the host then."""

    def __init__(self, waited: Future[None], remote: torch.Tensor, local_sums: LocalSums) -> None:
        self._waited, self._remote, self._local_sums = waited, remote, local_sums

    def ready(self) -> bool:
        return self._waited.done()

    def sums(self) -> tuple[list[int], list[int]]:
        self._waited.result()  # raises if an op failed
        return self._remote.tolist(), self._local_sums().tolist()


def _wait_all(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


def default_backend(device: torch.device, side_stream: bool = False) -> PairBackend:
    """NCCL for a CUDA device, gloo for CPU."""
    return NcclBackend(device, side_stream) if device.type == "cuda" else GlooBackend()
