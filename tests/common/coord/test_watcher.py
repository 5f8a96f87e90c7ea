"""RegistryWatcher against a real Redis: events, expiry of crashed workers, suspects, draining, restarts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord import RedisServer, RegistryWatcher, WorkerRegistration, connect
from tests.common.coord.fakes import FakeWorker, eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(15)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _registered(client: aioredis.Redis, config: CoordConfig, worker: FakeWorker) -> WorkerRegistration:
    registration = WorkerRegistration(client, config, worker.info)
    await registration.start()
    return registration


async def test_initial_scan_sees_existing_workers(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    workers = [FakeWorker("p1", role="prefill"), FakeWorker("d1"), FakeWorker("d2", model="other")]
    registrations = [await _registered(client, coord_config, w) for w in workers]
    watcher = RegistryWatcher(client, coord_config)
    await watcher.start()
    try:
        assert watcher.snapshot == {w.worker_id: w.info() for w in workers}
        assert [w.worker_id for w in watcher.alive(role="decode", model="smollm2")] == ["d1"]
        assert [w.worker_id for w in watcher.alive(role="prefill")] == ["p1"]
    finally:
        await watcher.stop()
        for registration in registrations:
            await registration.stop()


async def test_join_and_leave_arrive_before_any_refresh(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    changes: list[int] = []
    slow = replace(coord_config, heartbeat_s=5.0)  # the watcher's full refresh would take 5 s
    watcher = RegistryWatcher(client, slow, on_change=lambda: changes.append(len(watcher.snapshot)))
    await watcher.start()
    try:
        registration = await _registered(client, coord_config, FakeWorker("d1"))
        joined_s = await eventually(lambda: "d1" in watcher.snapshot, 1.0, "join seen")
        await registration.stop()
        left_s = await eventually(lambda: "d1" not in watcher.snapshot, 1.0, "leave seen")
        assert joined_s < 1.0 and left_s < 1.0
        assert changes == [1, 0]
    finally:
        await watcher.stop()


async def test_crashed_worker_expires_within_ttl_plus_refresh(client: aioredis.Redis,
                                                              coord_config: CoordConfig) -> None:
    watcher = RegistryWatcher(client, coord_config)
    await watcher.start()
    registration = await _registered(client, coord_config, FakeWorker("d1"))
    try:
        await eventually(lambda: watcher.alive(), 1.0, "worker seen")
        registration._task.cancel()  # crash: heartbeats stop, no deregistration, no leave event
        gone_s = await eventually(lambda: not watcher.snapshot, 3.0, "crashed worker dropped")
        assert gone_s <= coord_config.ttl_s + coord_config.heartbeat_s + 0.2
    finally:
        await watcher.stop()


async def test_draining_worker_is_not_alive(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    watcher = RegistryWatcher(client, replace(coord_config, heartbeat_s=5.0))
    await watcher.start()
    registration = await _registered(client, coord_config, FakeWorker("d1"))
    try:
        await eventually(lambda: watcher.alive(), 1.0, "worker alive")
        await registration.set_draining()
        await eventually(lambda: not watcher.alive(), 0.5, "draining seen through its event")
        assert watcher.snapshot["d1"].draining
    finally:
        await watcher.stop()
        await registration.stop()


async def test_mark_failed_until_restart_or_timeout(client: aioredis.Redis, coord_config: CoordConfig) -> None:
    clock = FakeClock()
    watcher = RegistryWatcher(client, coord_config, suspect_s=3.0, clock=clock)
    await watcher.start()
    worker = FakeWorker("d1", started_at=1.0)
    registration = await _registered(client, coord_config, worker)
    try:
        await eventually(lambda: watcher.alive(), 1.0, "worker alive")
        watcher.mark_failed("d1")
        assert watcher.alive() == []
        clock.now += 2.9
        assert watcher.alive() == []
        clock.now += 0.2  # suspect_s has passed
        assert [w.worker_id for w in watcher.alive()] == ["d1"]
        watcher.mark_failed("d1")
        worker.started_at = 2.0  # the worker restarted: a new record lifts the mark at once
        await eventually(lambda: watcher.alive(), 1.0, "restarted worker alive again")
    finally:
        await watcher.stop()
        await registration.stop()


async def test_redis_restart_keeps_snapshot_and_worker_reregisters(caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer() as server:
        config = CoordConfig(redis_url=server.url, namespace="restart", heartbeat_s=0.2, ttl_s=1.0)
        worker_client, router_client = connect(config), connect(config)
        registration = await _registered(worker_client, config, FakeWorker("d1"))
        watcher = RegistryWatcher(router_client, config)
        await watcher.start()
        try:
            with caplog.at_level("WARNING", logger="common.coord"):
                await _outage_and_recovery(server, worker_client, router_client, registration, watcher)
            assert registration._task is not None and not registration._task.done()
            assert all(not task.done() for task in watcher._tasks)
            outages = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
            assert 1 <= len(outages) <= 3  # once per component at most (registration, scan, events)
        finally:
            await watcher.stop()
            await registration.stop()
            await worker_client.aclose()
            await router_client.aclose()


async def _outage_and_recovery(server: RedisServer, worker_client: aioredis.Redis, router_client: aioredis.Redis,
                               registration: WorkerRegistration, watcher: RegistryWatcher) -> None:
    await eventually(lambda: watcher.alive(), 1.0, "worker alive")
    assert watcher.redis_reachable
    before = watcher.snapshot
    server.kill()
    await asyncio.sleep(1.5)  # longer than the TTL: a watcher must not drop workers it cannot check
    assert watcher.snapshot == before and [w.worker_id for w in watcher.alive()] == ["d1"]
    assert not watcher.redis_reachable  # so the router's /ready says it is not
    start = time.monotonic()
    server.start()  # same port, empty
    await eventually(lambda: router_client.exists("restart:worker:d1"), 3.0, "worker re-registered")
    watcher.snapshot = {}  # forget, to prove the watcher reads the re-registered record again
    await eventually(lambda: "d1" in watcher.snapshot, 3.0, "watcher refreshed after restart")
    assert watcher.redis_reachable
    assert time.monotonic() - start < 3.0
