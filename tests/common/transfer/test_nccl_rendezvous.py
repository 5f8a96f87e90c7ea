"""Publication of a pair's TCPStore address in Redis (a real redis-server on a free port; CPU only)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from common.config import CoordConfig
from common.transfer.nccl_transport import lookup_store_address, nccl_store_key, publish_store_address
from tests.common.transfer.conftest import run

redis_asyncio = pytest.importorskip("redis.asyncio")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(5)


def _wait_for_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"redis-server did not listen on {port}")


def test_key_layout() -> None:
    assert nccl_store_key("tandem", "prefill-0", "10.0.0.2:50051") == "tandem:nccl:prefill-0:10.0.0.2:50051"


def test_publish_lookup_and_expiry(redis_url: str) -> None:
    coord = CoordConfig(redis_url=redis_url, namespace="t")

    async def go() -> tuple[str | None, str | None, str | None]:
        client = redis_asyncio.from_url(redis_url)
        try:
            missing = await lookup_store_address(client, coord, "p0", "d0")
            await publish_store_address(client, coord, "p0", "d0", "127.0.0.1:4242", ttl_s=0.2)
            found = await lookup_store_address(client, coord, "p0", "d0")
            await __import__("asyncio").sleep(0.4)
            expired = await lookup_store_address(client, coord, "p0", "d0")
            return missing, found, expired
        finally:
            await client.aclose()

    assert run(go()) == (None, "127.0.0.1:4242", None)
