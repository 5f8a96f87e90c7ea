"""Watching the workers an RPC waits on.

A worker can stop producing without closing its sockets (SIGSTOP, a hung host, a network partition): its RPCs
then wait forever. Its heartbeats stop too, so it drops out of the registry after the TTL; ``cancel_when_gone``
turns that into a cancelled RPC the orchestrator retries or migrates like a dead worker's. A worker must stay
missing for a grace period first, so a Redis restart (every key gone until the next heartbeat re-registers
it) moves no stream.

``renew_lease_forever`` keeps a decode worker's reservation alive while the prefill that fills it runs: a long
queue or a slow prompt on a live prefill worker must not outlive the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from common.coord.watcher import RegistryWatcher
from proto import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class GoneWatch:
    """Set once the watched worker was missing from the registry for the grace period and its RPC was cancelled."""

    worker_id: str
    gone: bool = False


@contextlib.asynccontextmanager
async def cancel_when_gone(
    watcher: RegistryWatcher, worker_id: str, cancel: Callable[[], object], grace_s: float
) -> AsyncIterator[GoneWatch]:
    """While the block runs, call ``cancel`` (once) when ``worker_id`` has been out of the registry for ``grace_s``.

    The caller tells that cancellation from its own by ``watch.gone``.
    """
    watch = GoneWatch(worker_id)
    task = asyncio.create_task(_cancel_when_missing(watcher, watch, cancel, grace_s))
    try:
        yield watch
    finally:
        task.cancel()


async def _cancel_when_missing(
    watcher: RegistryWatcher, watch: GoneWatch, cancel: Callable[[], object], grace_s: float
) -> None:
    loop = asyncio.get_running_loop()
    missing_since: float | None = None
    poll_s = min(0.5, grace_s / 4) if grace_s > 0 else 0.05
    while True:
        await asyncio.sleep(poll_s)
        if watch.worker_id in watcher.snapshot:
            missing_since = None
            continue
        missing_since = loop.time() if missing_since is None else missing_since
        if loop.time() - missing_since >= grace_s:
            logger.warning("worker %s left the registry with an RPC in flight; cancelling it", watch.worker_id)
            watch.gone = True
            cancel()
            return


def cancelled_by(watch: GoneWatch) -> bool:
    """True when a CancelledError caught now came from ``watch`` and not from the caller's own task being cancelled
    (a client that left)."""
    task = asyncio.current_task()
    return watch.gone and (task is None or task.cancelling() == 0)


async def renew_lease_forever(
    stub: worker_pb2_grpc.WorkerStub, reservation_id: str, lease_s: float, worker_id: str
) -> None:
    """Renew ``reservation_id`` every third of its lease until cancelled; stops once the worker no longer knows it."""
    request = worker_pb2.RenewRequest(reservation_id=reservation_id, lease_s=lease_s)
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            reply = await stub.Renew(request, timeout=5)
        except grpc.aio.AioRpcError as error:  # the decode worker's trouble shows on its own RPCs
            logger.warning("renewing reservation %s on %s failed: %s", reservation_id, worker_id, error.code().name)
            continue
        if not reply.renewed:
            logger.warning("reservation %s on %s is gone; no more renewals", reservation_id, worker_id)
            return
