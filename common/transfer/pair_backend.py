"""How a transfer pair's 2-rank process group is made and how its point-to-point ops complete.

``NcclBackend`` (production): a ``ProcessGroupNCCL``; ops only enqueue on NCCL's stream, and completion is a
CUDA event that a pool thread blocks on. ``GlooBackend`` (CPU tests): a ``ProcessGroupGloo`` over the same
store, so the channel logic in ``nccl_transport`` runs unchanged on a machine without GPUs.

Invariant for both: ``post_send``/``post_recv`` never block the caller (they only enqueue), and the ops of one
pair complete in the order they were posted on each side; the returned waiter is a blocking callable that
returns once the op's bytes are usable (recv) or have been handed to the transport (send).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from common.transfer.checksum import kv_checksum_sums

logger = logging.getLogger(__name__)

Waiter = Callable[[], None]
SumsWaiter = Callable[[], tuple[list[int], list[int]]]  # -> (sender's [s1, s2], received bytes' [s1, s2])
SumsOf = Callable[[torch.Tensor], torch.Tensor]


class PairBackend(Protocol):
    """The process-group flavour of a pair (see the module docstring)."""

    name: str

    def new_group(self, store: dist.Store, prefix: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
        """A fresh 2-rank group under ``prefix`` of ``store`` (may block on the peer: call it off the loop)."""
        ...

    def exchange(self, group: dist.ProcessGroup, token: torch.Tensor, rank: int) -> Waiter:
        """The handshake: rank 0 sends ``token``, rank 1 receives into it (the first op sets up the group)."""
        ...

    def post_send(self, group: dist.ProcessGroup, kv: torch.Tensor, tag: int, sums_of: SumsOf) -> Waiter:
        """Enqueue ``kv`` (tag) then its checksum sums (tag + 1) to rank 1."""
        ...

    def post_recv(self, group: dist.ProcessGroup, buffer: torch.Tensor, tag: int) -> SumsWaiter:
        """Enqueue the matching recvs into ``buffer`` and a 2-word sums tensor; the waiter yields both sums."""
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
        with self._on_stream():
            work = group.send([token], 1, 0) if rank == 0 else group.recv([token], 0, 0)
            return self._event_after([work]).synchronize

    def post_send(self, group: dist.ProcessGroup, kv: torch.Tensor, tag: int, sums_of: SumsOf) -> Waiter:
        with torch.cuda.device(kv.device):
            data = group.send([kv], 1, tag)  # NCCL's stream waits for kv's producer first
            sums = sums_of(kv)  # on the current stream, concurrent with the send (both only read kv)
            tail = group.send([sums], 1, tag + 1)  # ordered after the checksum kernel
            return self._event_after([data, tail]).synchronize

    def post_recv(self, group: dist.ProcessGroup, buffer: torch.Tensor, tag: int) -> SumsWaiter:
        with self._on_stream():
            remote = torch.empty(2, dtype=torch.int64, device=buffer.device)
            works = [group.recv([buffer], 0, tag), group.recv([remote], 0, tag + 1)]
            for work in works:
                work.wait()  # non-blocking for the host: this stream waits for NCCL's
            staged = torch.empty(4, dtype=torch.int64, pin_memory=True)
            staged.copy_(torch.cat([remote, kv_checksum_sums(buffer)]), non_blocking=True)
            done = torch.cuda.Event()
            done.record()

        def wait() -> tuple[list[int], list[int]]:
            done.synchronize()
            values = staged.tolist()
            return values[:2], values[2:]

        return wait

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
    """Gloo over CPU tensors: the same channel code without GPUs (tests). Sums are computed once data arrived."""

    name = "gloo"

    def new_group(self, store: dist.Store, prefix: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
        # The constructor connects both ranks, so it blocks until the peer makes its half.
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, timedelta(seconds=timeout_s))

    def exchange(self, group: dist.ProcessGroup, token: torch.Tensor, rank: int) -> Waiter:
        work = group.send([token], 1, 0) if rank == 0 else group.recv([token], 0, 0)
        return work.wait

    def post_send(self, group: dist.ProcessGroup, kv: torch.Tensor, tag: int, sums_of: SumsOf) -> Waiter:
        works = [group.send([kv], 1, tag), group.send([sums_of(kv)], 1, tag + 1)]
        return lambda: _wait_all(works)

    def post_recv(self, group: dist.ProcessGroup, buffer: torch.Tensor, tag: int) -> SumsWaiter:
        remote = torch.empty(2, dtype=torch.int64)
        works = [group.recv([buffer], 0, tag), group.recv([remote], 0, tag + 1)]

        def wait() -> tuple[list[int], list[int]]:
            _wait_all(works)
            return remote.tolist(), kv_checksum_sums(buffer).tolist()

        return wait


def _wait_all(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


def default_backend(device: torch.device, side_stream: bool = False) -> PairBackend:
    """NCCL for a CUDA device, gloo for CPU."""
    return NcclBackend(device, side_stream) if device.type == "cuda" else GlooBackend()
