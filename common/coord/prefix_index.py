"""Which workers hold which prefix-cache blocks, for cache-aware routing.

Each worker owns one Redis set ``<ns>:prefix:<worker_id>`` of hex-encoded block-hash prefixes
(the first ``HASH_BYTES`` bytes of each hash), with the same TTL as its registry key. Workers send only
what changed since the last flush; the full set is rewritten when the key is found missing (TTL ran out,
Redis restarted empty) or after a failed flush.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord.redis_client import REDIS_ERRORS, OutageLog, prefix_key

logger = logging.getLogger(__name__)

HASH_BYTES = 16  # bytes of each block hash kept in Redis (32 hex characters)
MAX_LOOKUP_BLOCKS = 256  # a lookup considers at most this many leading blocks of a prompt
_CHUNK = 1000  # members per SADD/SREM command


def encode_hash(block_hash: bytes) -> str:
    return block_hash[:HASH_BYTES].hex()


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class PrefixPublisher:
    """Worker side. record() only buffers; flush() (from the heartbeat) makes Redis match the worker.

    Invariants: ``held`` is exactly the set of encoded hashes the worker holds (as told by record());
    after a successful flush the Redis set equals ``held``; a failed flush loses nothing (the next
    successful one rewrites the whole set).
    """

    def __init__(self, client: aioredis.Redis, config: CoordConfig, worker_id: str) -> None:
        self._client = client
        self._config = config
        self._key = prefix_key(config, worker_id)
        self.held: set[str] = set()
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._resync = True  # Redis state unknown: rewrite everything at the next flush

    def record(self, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        """Note blocks that entered / left the prefix cache since the last call (added applied first)."""
        for block_hash in added:
            self._apply(encode_hash(block_hash), present=True)
        for block_hash in removed:
            self._apply(encode_hash(block_hash), present=False)

    async def flush(self) -> None:
        """Send buffered changes and refresh the TTL; raises Redis errors (the caller logs outages)."""
        try:
            if self._resync or not await self._send_delta():
                await self._send_all()
        except REDIS_ERRORS:
            self._resync = True
            raise
        self._added.clear()
        self._removed.clear()
        self._resync = False

    async def clear(self) -> None:
        """Forget everything and delete the Redis set (worker stopping)."""
        self.held.clear()
        self._added.clear()
        self._removed.clear()
        self._resync = True
        await self._client.delete(self._key)

    def _apply(self, encoded: str, *, present: bool) -> None:
        if present:
            self.held.add(encoded)
            self._added.add(encoded)
            self._removed.discard(encoded)
        else:
            self.held.discard(encoded)
            self._removed.add(encoded)
            self._added.discard(encoded)

    async def _send_delta(self) -> bool:
        """Apply the buffered delta; False iff the key was missing before (so Redis now lacks old members)."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.exists(self._key)
            for chunk in _chunks(sorted(self._added)):
                pipe.sadd(self._key, *chunk)
            for chunk in _chunks(sorted(self._removed)):
                pipe.srem(self._key, *chunk)
            pipe.pexpire(self._key, self._ttl_ms)
            results = await pipe.execute()
        return bool(results[0]) or self.held == self._added  # _added is a subset of held

    async def _send_all(self) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key)
            for chunk in _chunks(sorted(self.held)):
                pipe.sadd(self._key, *chunk)
            pipe.pexpire(self._key, self._ttl_ms)
            await pipe.execute()

    @property
    def _ttl_ms(self) -> int:
        return int(self._config.ttl_s * 1000)


class PrefixLookup:
    """Router side: how many leading blocks of a prompt each worker already holds."""

    def __init__(self, client: aioredis.Redis, config: CoordConfig) -> None:
        self._client = client
        self._config = config
        self._outage = OutageLog("prefix lookup", logger)

    async def matched_blocks(self, worker_ids: Sequence[str], block_hashes: Sequence[bytes]) -> dict[str, int]:
        """{worker_id: n} where the worker holds block_hashes[0..n) (capped at MAX_LOOKUP_BLOCKS).

        One round trip (SMISMEMBER per worker, pipelined). On a Redis error every count is 0.
        """
        zeros = dict.fromkeys(worker_ids, 0)
        members = [encode_hash(h) for h in block_hashes[:MAX_LOOKUP_BLOCKS]]
        if not members or not worker_ids:
            return zeros
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for worker_id in worker_ids:
                    pipe.smismember(prefix_key(self._config, worker_id), members)
                results = await pipe.execute()
        except REDIS_ERRORS as error:
            self._outage.down(error)
            return zeros
        self._outage.up()
        return {worker_id: _leading_ones(flags) for worker_id, flags in zip(worker_ids, results)}


def _leading_ones(flags: Sequence[int | bool]) -> int:
    count = 0
    for flag in flags:
        if not flag:
            break
        count += 1
    return count
