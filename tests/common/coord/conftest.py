"""Fixtures for the coordination tests: one real redis-server per session, a fresh namespace per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord import RedisServer, connect

_NAMESPACES = itertools.count()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def coord_config(redis_server: RedisServer) -> CoordConfig:
    """Fast timings (beat 0.2 s, TTL 1 s) and a namespace no other test uses."""
    return CoordConfig(redis_url=redis_server.url, namespace=f"t{next(_NAMESPACES)}", heartbeat_s=0.2, ttl_s=1.0)


@pytest_asyncio.fixture
async def client(coord_config: CoordConfig) -> AsyncIterator[aioredis.Redis]:
    redis_client = connect(coord_config)
    yield redis_client
    await redis_client.aclose()
