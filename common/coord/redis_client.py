"""Redis plumbing every coordination module shares: key names, the client factory, outage logging."""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.config import CoordConfig

logger = logging.getLogger(__name__)

# What a Redis call raises when the server is gone, slow or restarting.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


def worker_key(config: CoordConfig, worker_id: str) -> str:
    return f"{config.namespace}:worker:{worker_id}"


def worker_pattern(config: CoordConfig) -> str:
    return f"{config.namespace}:worker:*"


def events_channel(config: CoordConfig) -> str:
    return f"{config.namespace}:events"


def prefix_key(config: CoordConfig, worker_id: str) -> str:
    return f"{config.namespace}:prefix:{worker_id}"


def event_message(event: str, worker_id: str) -> str:
    return json.dumps({"event": event, "worker_id": worker_id})


# Connections one process opens to Redis. Past this, calls wait for a free one (redis-py's default pool instead
# raises at its 100th concurrent call: a router serving 300 requests lost its prefix lookups to that).
MAX_CONNECTIONS = 128


def connect(config: CoordConfig) -> aioredis.Redis:
    """A client whose calls fail within about ttl_s instead of hanging when Redis is unreachable, and wait (as long
    at most) for a pooled connection when MAX_CONNECTIONS calls are in flight; a wait that runs out raises
    ConnectionError("No connection available."), which callers log as an outage."""
    timeout = max(0.5, config.ttl_s)
    pool = aioredis.BlockingConnectionPool.from_url(config.redis_url, max_connections=MAX_CONNECTIONS, timeout=timeout,
                                                    socket_timeout=timeout, socket_connect_timeout=timeout)
    return aioredis.Redis.from_pool(pool)


class OutageLog:
    """Logs the start and the end of an outage once each, however many calls fail in between."""

    def __init__(self, what: str, log: logging.Logger = logger) -> None:
        self._what = what
        self._log = log
        self.down_since_error: BaseException | None = None

    @property
    def is_down(self) -> bool:
        return self.down_since_error is not None

    def down(self, error: BaseException) -> bool:
        """Record a failure; True (and a warning) only for the first failure of an outage."""
        first = self.down_since_error is None
        if first:
            self._log.warning("%s: Redis unavailable (%s: %s); will keep retrying", self._what,
                           type(error).__name__, error)
        self.down_since_error = error
        return first

    def up(self) -> bool:
        """Record a success; True (and an info line) only if it ends an outage."""
        ended = self.down_since_error is not None
        if ended:
            self._log.info("%s: Redis reachable again", self._what)
        self.down_since_error = None
        return ended
