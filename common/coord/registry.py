"""Worker side of the Redis registry: register, heartbeat, deregister.

Key layout (all under ``<ns>`` = CoordConfig.namespace):
- ``<ns>:worker:<id>``: hash of WorkerInfo.to_redis(), with a TTL of ttl_s. A worker is alive iff it exists.
- ``<ns>:events``: pub/sub channel; JSON messages ``{"event": "join"|"leave"|"draining", "worker_id": ...}``.
- ``<ns>:prefix:<id>``: set of prefix-cache block hashes (see prefix_index), same TTL as the worker key.

Redis being down is a normal condition here: nothing in this module raises because of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord.prefix_index import PrefixPublisher
from common.coord.redis_client import (
    REDIS_ERRORS,
    OutageLog,
    event_message,
    events_channel,
    worker_key,
)
from common.coord.worker_info import WorkerInfo

logger = logging.getLogger(__name__)


class WorkerRegistration:
    """Keeps ``<ns>:worker:<id>`` alive while the worker runs.

    Invariants: every beat writes the whole record from ``info_provider()`` and refreshes the TTL in one
    MULTI; a join event is published on start and again whenever a beat finds the key missing or ends an
    outage (e.g. Redis restarted empty); ``worker_id`` is read once at start and must never change.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        config: CoordConfig,
        info_provider: Callable[[], WorkerInfo],
        *,
        prefix: PrefixPublisher | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._info_provider = info_provider
        self._prefix = prefix
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._stopped = False  # set before cancelling: redis-py can swallow a cancel that lands mid-call
        self._outage = OutageLog("worker registration")
        self.worker_id = ""

    async def start(self) -> None:
        """Register (write + join) once, then heartbeat every heartbeat_s. Does not raise if Redis is down."""
        self.worker_id = self._info_provider().worker_id
        await self.beat(force_join=True)
        self._task = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.worker_id}")

    async def set_draining(self) -> None:
        """From now on every write says draining=1; write it (and tell routers) immediately."""
        self._draining = True
        if await self.beat():
            await self._publish("draining")

    async def stop(self) -> None:
        """Cancel the heartbeat, delete our keys and publish leave. Never raises because of Redis."""
        await self._cancel_heartbeat()
        try:
            async with asyncio.timeout(self._config.ttl_s):
                await self._client.delete(worker_key(self._config, self.worker_id))
                await self._publish("leave")
                if self._prefix is not None:
                    await self._prefix.clear()
        except REDIS_ERRORS as error:
            logger.warning("deregistering %s failed (%s); its key expires within %.1f s",
                           self.worker_id, error, self._config.ttl_s)

    async def beat(self, *, force_join: bool = False) -> bool:
        """One heartbeat: write the record with its TTL, flush prefix deltas; True iff Redis took it."""
        try:
            async with asyncio.timeout(max(self._config.heartbeat_s, 0.5) * 2):
                existed = await self._write(self._current_info())
                came_back = self._outage.up()
                if force_join or came_back or not existed:
                    await self._publish("join")
                if self._prefix is not None:
                    await self._prefix.flush()
            return True
        except REDIS_ERRORS as error:
            self._outage.down(error)
            return False

    def _current_info(self) -> WorkerInfo:
        info = self._info_provider()
        if info.worker_id != self.worker_id:
            raise ValueError(f"worker_id changed from {self.worker_id!r} to {info.worker_id!r}")
        if self._draining and not info.draining:
            info = replace(info, draining=True)
        return info

    async def _write(self, info: WorkerInfo) -> bool:
        """HSET the record and set its TTL atomically; True iff the key existed before."""
        key = worker_key(self._config, self.worker_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hset(key, mapping=info.to_redis())
            pipe.pexpire(key, int(self._config.ttl_s * 1000))
            existed, _, _ = await pipe.execute()
        return bool(existed)

    async def _publish(self, event: str) -> None:
        await self._client.publish(events_channel(self._config), event_message(event, self.worker_id))

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while not self._stopped:
            next_beat += self._config.heartbeat_s
            await asyncio.sleep(max(0.0, next_beat - loop.time()))
            if self._stopped:
                return
            try:
                await self.beat()
            except Exception:  # a bug in info_provider must not end the heartbeat
                logger.exception("heartbeat of %s failed", self.worker_id)
            next_beat = max(next_beat, loop.time())

    async def _cancel_heartbeat(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

