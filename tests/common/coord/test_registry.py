"""WorkerRegistration against a real Redis: record, TTL, heartbeat, events, draining, stop."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord import WorkerInfo, WorkerRegistration, connect
from common.coord.redis_client import events_channel, worker_key
from common.coord.redis_server import free_port
from tests.common.coord.fakes import FakeWorker, eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


async def _record(client: aioredis.Redis, config: CoordConfig, worker_id: str = "w1") -> WorkerInfo | None:
    raw = await client.hgetall(worker_key(config, worker_id))
    return WorkerInfo.from_redis(raw) if raw else None


async def _events(pubsub: aioredis.client.PubSub, wait_s: float = 0.5) -> list[dict[str, str]]:
    """Every event that arrives within wait_s."""
    found = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            found.append(json.loads(message["data"]))
    return found


async def test_registration_is_visible_with_every_field(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    worker = FakeWorker()
    registration = WorkerRegistration(client, coord_config, worker.info)
    await registration.start()
    try:
        assert await _record(client, coord_config) == worker.info()
        ttl_ms = await client.pttl(worker_key(coord_config, "w1"))
        assert 0 < ttl_ms <= 1000
    finally:
        await registration.stop()


async def test_heartbeat_updates_live_fields_and_refreshes_ttl(client: aioredis.Redis,
                                                               coord_config: CoordConfig) -> None:
    worker = FakeWorker()
    registration = WorkerRegistration(client, coord_config, worker.info)
    await registration.start()
    try:
        worker.free_blocks, worker.running, worker.waiting = 7, 3, 2
        elapsed = await eventually(lambda: _fields_are(client, coord_config, worker.info()), 1.0, "live fields")
        assert elapsed <= 1.5 * coord_config.heartbeat_s + 0.05
        await asyncio.sleep(2 * coord_config.ttl_s)  # two TTLs later the key lives on, its TTL refreshed
        assert 0 < await client.pttl(worker_key(coord_config, "w1")) <= 1000
    finally:
        await registration.stop()


async def _fields_are(client: aioredis.Redis, config: CoordConfig, expected: WorkerInfo) -> bool:
    return await _record(client, config) == expected


async def test_join_on_start_and_leave_on_stop_deletes_key(client: aioredis.Redis,
                                                           coord_config: CoordConfig) -> None:
    pubsub = client.pubsub()
    await pubsub.subscribe(events_channel(coord_config))
    registration = WorkerRegistration(client, coord_config, FakeWorker().info)
    await registration.start()
    await registration.stop()
    assert await _events(pubsub) == [{"event": "join", "worker_id": "w1"}, {"event": "leave", "worker_id": "w1"}]
    assert not await client.exists(worker_key(coord_config, "w1"))
    await pubsub.aclose()


async def test_vanished_key_is_recreated_and_join_republished(client: aioredis.Redis,
                                                              coord_config: CoordConfig) -> None:
    registration = WorkerRegistration(client, coord_config, FakeWorker().info)
    await registration.start()
    pubsub = client.pubsub()
    await pubsub.subscribe(events_channel(coord_config))
    try:
        await client.delete(worker_key(coord_config, "w1"))
        await eventually(lambda: client.exists(worker_key(coord_config, "w1")), 1.0, "key re-created")
        assert {"event": "join", "worker_id": "w1"} in await _events(pubsub, 0.3)
    finally:
        await registration.stop()
        await pubsub.aclose()


async def test_set_draining_writes_at_once_and_stays(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    registration = WorkerRegistration(client, coord_config, FakeWorker().info)
    await registration.start()
    try:
        await registration.set_draining()
        assert (await _record(client, coord_config)).draining
        await asyncio.sleep(2 * coord_config.heartbeat_s)
        assert (await _record(client, coord_config)).draining
    finally:
        await registration.stop()


async def test_redis_down_never_raises(coord_config: CoordConfig, caplog: pytest.LogCaptureFixture) -> None:
    """No server at all: start, beats, set_draining and stop all return; one warning for the outage."""
    config = CoordConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", namespace="down", heartbeat_s=0.05, ttl_s=0.5)
    down_client = connect(config)
    registration = WorkerRegistration(down_client, config, FakeWorker().info)
    with caplog.at_level("WARNING", logger="common.coord.registry"):
        await registration.start()
        await asyncio.sleep(0.3)
        await registration.set_draining()
        await registration.stop()
    outage_lines = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    await down_client.aclose()
