"""RedisServer: a real child redis-server that starts, answers, restarts empty on its port and stops."""

from __future__ import annotations

import pytest

from common.coord.redis_server import MISSING_MESSAGE, RedisServer, free_port, ping

pytestmark = pytest.mark.timeout(20)


def test_start_stop_restart_same_port_and_empty() -> None:
    port = free_port()
    with RedisServer(port) as server:
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert ping("127.0.0.1", port)
        server.restart()
        assert server.port == port and ping("127.0.0.1", port)
    assert not ping("127.0.0.1", port)
    assert not server.running


def test_free_port_is_chosen_when_none_given() -> None:
    server = RedisServer().start()
    try:
        assert server.port > 0 and ping(server.host, server.port)
    finally:
        server.stop()


def test_missing_binary_has_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="redis-server not found") as info:
        RedisServer(executable="redis-server-that-does-not-exist").start()
    assert str(info.value) == MISSING_MESSAGE


def test_port_in_use_fails_with_the_servers_log(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="redis-server exited"):
        RedisServer(redis_server.port, startup_timeout_s=5).start()
