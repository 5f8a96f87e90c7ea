"""Prefix index against a real Redis: exact leading-match counts, removal, resync, TTL, errors."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord import PrefixLookup, PrefixPublisher, WorkerRegistration, connect
from common.coord.prefix_index import MAX_LOOKUP_BLOCKS, encode_hash
from common.coord.redis_client import prefix_key
from common.coord.redis_server import free_port
from tests.common.coord.fakes import FakeWorker, eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]

H = [hashlib.sha256(str(i).encode()).digest() for i in range(300)]  # h0, h1, ... as 32-byte block hashes


async def _publisher(client: aioredis.Redis, config: CoordConfig, worker_id: str,
                     held: list[bytes]) -> PrefixPublisher:
    publisher = PrefixPublisher(client, config, worker_id)
    publisher.record(held, [])
    await publisher.flush()
    return publisher


async def test_leading_match_counts_are_exact(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    await _publisher(client, coord_config, "A", [H[0], H[1], H[3]])
    await _publisher(client, coord_config, "B", [H[1]])
    lookup = PrefixLookup(client, coord_config)
    counts = await lookup.matched_blocks(["A", "B", "C"], H[:4])
    assert counts == {"A": 2, "B": 0, "C": 0}
    assert await lookup.matched_blocks(["A"], []) == {"A": 0}


async def test_stored_members_are_16_byte_hex(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    await _publisher(client, coord_config, "A", [H[0]])
    assert await client.smembers(prefix_key(coord_config, "A")) == {H[0][:16].hex().encode()}
    assert encode_hash(H[0]) == H[0][:16].hex()


async def test_removal_and_add_remove_in_one_flush(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    publisher = await _publisher(client, coord_config, "A", [H[0], H[1], H[2]])
    lookup = PrefixLookup(client, coord_config)
    publisher.record([], [H[1]])
    await publisher.flush()
    assert await lookup.matched_blocks(["A"], H[:3]) == {"A": 1}
    publisher.record([H[1], H[5]], [H[5]])  # H5 came and went before the flush
    await publisher.flush()
    assert await lookup.matched_blocks(["A"], H[:3]) == {"A": 3}
    assert await client.scard(prefix_key(coord_config, "A")) == 3


async def test_lookup_is_bounded_to_leading_blocks(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    await _publisher(client, coord_config, "A", H)
    counts = await PrefixLookup(client, coord_config).matched_blocks(["A"], H)
    assert counts == {"A": MAX_LOOKUP_BLOCKS}


async def test_ttl_expiry_and_full_resync(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    publisher = await _publisher(client, coord_config, "A", [H[0], H[1]])
    lookup = PrefixLookup(client, coord_config)
    assert 0 < await client.pttl(prefix_key(coord_config, "A")) <= 1000
    await asyncio.sleep(coord_config.ttl_s + 0.1)  # no flush: the set expires with the worker
    assert await lookup.matched_blocks(["A"], H[:2]) == {"A": 0}
    publisher.record([H[2]], [])
    await publisher.flush()  # the key was gone, so the whole held set is written back
    assert await lookup.matched_blocks(["A"], H[:3]) == {"A": 3}


async def test_redis_down_gives_zeros_and_keeps_changes(coord_config: CoordConfig) -> None:
    config = CoordConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", namespace="down")
    down_client = connect(config)
    assert await PrefixLookup(down_client, config).matched_blocks(["A", "B"], H[:2]) == {"A": 0, "B": 0}
    publisher = PrefixPublisher(down_client, config, "A")
    publisher.record([H[0]], [])
    with pytest.raises(Exception):  # noqa: B017 - the caller (the heartbeat) logs the outage
        await publisher.flush()
    assert publisher.held == {encode_hash(H[0])}
    await down_client.aclose()


async def test_heartbeat_flushes_and_stop_clears(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    publisher = PrefixPublisher(client, coord_config, "w1")
    registration = WorkerRegistration(client, coord_config, FakeWorker().info, prefix=publisher)
    await registration.start()
    lookup = PrefixLookup(client, coord_config)
    publisher.record([H[0], H[1]], [])
    await eventually(lambda: _count_is(lookup, "w1", 2), 1.0, "prefix flushed by a heartbeat")
    await asyncio.sleep(coord_config.ttl_s + 0.2)  # heartbeats keep the set's TTL fresh
    assert await lookup.matched_blocks(["w1"], H[:2]) == {"w1": 2}
    await registration.stop()
    assert not await client.exists(prefix_key(coord_config, "w1"))


async def _count_is(lookup: PrefixLookup, worker_id: str, expected: int) -> bool:
    return (await lookup.matched_blocks([worker_id], H[:expected])) == {worker_id: expected}


async def test_300_concurrent_lookups_all_get_their_counts(client: aioredis.Redis, coord_config: CoordConfig,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """More lookups in flight than the client's pool has connections: they wait for one, none reads as a miss."""
    await _publisher(client, coord_config, "A", H[:8])
    lookup = PrefixLookup(client, coord_config)
    counts = await asyncio.gather(*(lookup.matched_blocks(["A", "B"], H[: 1 + i % 8]) for i in range(300)))
    assert counts == [{"A": 1 + i % 8, "B": 0} for i in range(300)]
    assert "Redis unavailable" not in caplog.text
