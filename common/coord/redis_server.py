"""A throwaway local ``redis-server`` process: for ``tandem serve`` without REDIS_URL, and for tests.

Invariants: the server binds 127.0.0.1 only, persists nothing (``--save "" --appendonly no``), keeps its
files in a private temporary folder removed by :meth:`RedisServer.stop`, and :meth:`RedisServer.restart`
comes back empty on the same port.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

MISSING_MESSAGE = "redis-server not found; install it (apt-get install redis-server)"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True iff a Redis server answers PING on host:port (inline protocol, no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_pid(host: str, port: int, timeout_s: float = 0.5) -> int | None:
    """The process id of the Redis server answering on host:port (from INFO server), or None if none answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    return int(reply.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1; use as a context manager or call start()/stop()."""

    host = "127.0.0.1"

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str = "redis-server",
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """``preexec_fn`` runs in the child before exec (``tandem serve`` passes one that ties the server's life to
        its own)."""
        self._preexec_fn = preexec_fn
        self._requested_port = port
        self.port = port or 0
        self._executable = executable
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING; raises RuntimeError if it does not in time."""
        if self.running:
            return self
        binary = shutil.which(self._executable)
        if binary is None:
            raise RuntimeError(MISSING_MESSAGE)
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
        if not self.port:
            self.port = self._requested_port or free_port(self.host)
        self._process = self._spawn(binary)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("redis-server started at %s (pid %d)", self.url, self._process.pid)
        return self

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after stop_timeout_s) and remove its folder."""
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port; the new server is empty (nothing is persisted)."""
        self._terminate()
        return self.start()

    def kill(self) -> None:
        """Stop without cleanup of the folder: SIGKILL, as in a crash (the port is then free again)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        assert self._dir is not None
        args = [binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", str(self._dir), "--logfile", str(self._dir / "redis.log")]
        with open(self._dir / "stderr.log", "ab") as stderr:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True, preexec_fn=self._preexec_fn)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self._process.returncode}: {self._failure()}")
            if server_pid(self.host, self.port) == self._process.pid:  # not another server on this port
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within "
                           f"{self._startup_timeout_s:.0f} s: {self._failure()}")

    def _failure(self) -> str:
        """The end of the server's log and stderr, to explain a failed start."""
        text = ""
        for name in ("redis.log", "stderr.log"):
            if self._dir is not None and (self._dir / name).exists():
                text += (self._dir / name).read_text(errors="replace")
        return text.strip()[-2000:] or "(no output)"

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server (pid %d) ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
