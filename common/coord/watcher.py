"""Router side of the Redis registry: a live snapshot of the workers.

Events (join / leave / draining) are applied at once; a full scan every heartbeat_s replaces the snapshot, so a
crashed worker disappears within ttl_s + heartbeat_s. While Redis is down the last snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord.redis_client import REDIS_ERRORS, OutageLog, events_channel, worker_key, worker_pattern
from common.coord.worker_info import WorkerInfo

logger = logging.getLogger(__name__)

_RETRY_S = 0.2  # pause before resubscribing after the event connection broke
_POLL_S = 1.0  # longest wait for one pub/sub message; bounds how late a cancel or a dead socket is noticed


class RegistryWatcher:
    """Keeps ``snapshot`` (worker_id -> WorkerInfo) in step with ``<ns>:worker:*``.

    Invariants: ``snapshot`` is replaced, never mutated in place, so a reader holding it sees one consistent
    view; an event newer than a running full scan wins over that scan for its worker; no Redis error escapes
    any public method or background task.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        config: CoordConfig,
        *,
        suspect_s: float | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._config = config
        self._suspect_s = config.ttl_s if suspect_s is None else suspect_s
        self._on_change = on_change
        self._clock = clock
        self.snapshot: dict[str, WorkerInfo] = {}
        self._suspects: dict[str, tuple[float | None, float]] = {}  # id -> (started_at seen, until)
        self._generation = 0  # bumped by every applied event
        self._event_generation: dict[str, int] = {}  # worker_id -> generation of its last event
        self._refresh_lock = asyncio.Lock()
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False  # set before cancelling: redis-py can swallow a cancel that lands mid-call
        self._scan_outage = OutageLog("registry watcher scan", logger)
        self._events_outage = OutageLog("registry watcher events", logger)

    async def start(self) -> None:
        """Initial full scan, then follow events and refresh periodically. Returns even if Redis is down."""
        await self.refresh()
        self._tasks = [asyncio.create_task(self._listen_forever(), name="registry-events"),
                       asyncio.create_task(self._refresh_forever(), name="registry-refresh")]
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=self._config.ttl_s)
        except TimeoutError:
            logger.warning("registry watcher started without an event subscription; scanning every %.1f s",
                           self._config.heartbeat_s)

    async def stop(self) -> None:
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def heartbeat_s(self) -> float:
        """How often workers refresh their record (and this watcher rescans)."""
        return self._config.heartbeat_s

    @property
    def redis_reachable(self) -> bool:
        """False from a failed full scan until one succeeds again (the snapshot is then the last one read)."""
        return not self._scan_outage.is_down

    def alive(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        """Workers that may take new requests: not draining, not suspect, matching role/model if given."""
        now = self._clock()
        return [info for info in self.snapshot.values()
                if not info.draining and (role is None or info.role == role)
                and (model is None or info.model == model) and not self._is_suspect(info, now)]

    def mark_failed(self, worker_id: str) -> None:
        """Exclude a worker from alive() until it restarts (new started_at) or suspect_s passes."""
        info = self.snapshot.get(worker_id)
        started_at = info.started_at if info is not None else None
        self._suspects[worker_id] = (started_at, self._clock() + self._suspect_s)

    async def refresh(self) -> bool:
        """Replace the snapshot with a full scan; True iff Redis answered (else the snapshot is kept)."""
        async with self._refresh_lock:
            generation = self._generation
            try:
                scanned = await self._scan()
            except REDIS_ERRORS as error:
                self._scan_outage.down(error)
                return False
            self._scan_outage.up()
            self._install(self._merge_newer_events(scanned, generation))
            return True

    def _is_suspect(self, info: WorkerInfo, now: float) -> bool:
        mark = self._suspects.get(info.worker_id)
        if mark is None:
            return False
        started_at, until = mark
        if now >= until or (started_at is not None and info.started_at != started_at):
            del self._suspects[info.worker_id]
            return False
        return True

    async def _scan(self) -> dict[str, WorkerInfo]:
        keys = [key async for key in self._client.scan_iter(match=worker_pattern(self._config), count=500)]
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            records = await pipe.execute()
        scanned: dict[str, WorkerInfo] = {}
        for raw in records:
            info = _parse(raw)
            if info is not None:
                scanned[info.worker_id] = info
        return scanned

    def _merge_newer_events(self, scanned: dict[str, WorkerInfo], generation: int) -> dict[str, WorkerInfo]:
        """Workers with an event applied after the scan began keep their event-made state."""
        merged = dict(scanned)
        for worker_id, seen in self._event_generation.items():
            if seen <= generation:
                continue
            merged.pop(worker_id, None)
            if worker_id in self.snapshot:
                merged[worker_id] = self.snapshot[worker_id]
        self._event_generation = {w: g for w, g in self._event_generation.items() if g > generation}
        return merged

    def _install(self, snapshot: dict[str, WorkerInfo]) -> None:
        if snapshot == self.snapshot:
            return
        self.snapshot = snapshot
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:
            logger.exception("registry on_change callback failed")

    async def _apply_event(self, data: bytes | str) -> None:
        """join / draining: fetch that worker's record; leave: drop it."""
        try:
            message = json.loads(data)
            event, worker_id = message["event"], message["worker_id"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed registry event %r", data)
            return
        info = None
        if event != "leave":
            info = _parse(await self._client.hgetall(worker_key(self._config, worker_id)))
        self._generation += 1
        self._event_generation[worker_id] = self._generation
        updated = {k: v for k, v in self.snapshot.items() if k != worker_id}
        if info is not None:
            updated[worker_id] = info
        self._install(updated)

    async def _listen_forever(self) -> None:
        while not self._stopped:
            try:
                await self._listen_once()
            except REDIS_ERRORS as error:
                self._events_outage.down(error)
            self._subscribed.clear()
            if not self._stopped:
                await asyncio.sleep(_RETRY_S)

    async def _listen_once(self) -> None:
        """Subscribe, catch up with a full scan (events were missed while unsubscribed), then apply events."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(events_channel(self._config))
            self._events_outage.up()
            self._subscribed.set()
            await self.refresh()
            while not self._stopped:
                message = await pubsub.get_message(timeout=_POLL_S)
                if message is not None and message["type"] == "message":
                    await self._apply_event(message["data"])
        finally:
            await _close_quietly(pubsub)

    async def _refresh_forever(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self._config.heartbeat_s)
            if not self._stopped:
                await self.refresh()


def _parse(raw: dict[bytes | str, bytes | str]) -> WorkerInfo | None:
    """A WorkerInfo from a hash, or None for a vanished key or a record we cannot read."""
    if not raw:
        return None
    try:
        return WorkerInfo.from_redis(raw)
    except (TypeError, ValueError) as error:
        logger.warning("ignoring unreadable worker record (%s)", error)
        return None


async def _close_quietly(pubsub: aioredis.client.PubSub) -> None:
    with contextlib.suppress(*REDIS_ERRORS):
        await pubsub.aclose()
