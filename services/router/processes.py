"""`tandem router --processes N`: N router processes behind one port (SO_REUSEPORT), one supervisor.

One router process spends a core's worth of Python per ~10k streamed tokens/s (parse the worker's gRPC
message, detokenize, JSON, SSE write); past that its event loop queues every stream's tokens. The kernel
spreads new connections over the N listening sockets, each process keeps its own admission queue (limits are
per process), rate limits stay global in Redis, and /metrics adds up all processes through
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set here for the children).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from common.process_lifetime import die_with_parent

logger = logging.getLogger(__name__)

READY_PREFIX = "TANDEM_READY "


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, so sibling processes can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def child_argv(argv: Sequence[str], port: int) -> list[str]:
    """This command's own arguments (``tandem``'s argv without the program) for one child: one process,
    the shared port, --reuse-port."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--processes", "--port"):
            skip = True
            continue
        if word.startswith(("--processes=", "--port=")) or word == "--reuse-port":
            continue
        kept.append(word)
    return [*kept, "--processes", "1", "--port", str(port), "--reuse-port"]


def supervise(argv: Sequence[str], host: str, port: int, processes: int, ready_timeout_s: float = 300.0) -> int:
    """Start the children, print one READY line when all are up, then wait; any child exiting stops all."""
    holder = reuse_port_socket(host, port)  # fixes the port (0 = any) until the children listen on it
    port = holder.getsockname()[1]
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="tandem-router-metrics-")
    owns_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [sys.executable, "-m", "services.launch", *child_argv(argv, port)]
    # Started from this (main) thread, which lives as long as the supervisor: a SIGKILLed supervisor takes them along.
    lifetime = die_with_parent()
    children = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=lifetime)
        for _ in range(processes)
    ]
    stop = _install_stop_handlers()
    try:
        if not _wait_ready(children, ready_timeout_s, stop):
            return 1
        holder.close()
        print(
            READY_PREFIX + json.dumps({"role": "router", "address": f"http://{host}:{port}", "processes": processes}),
            flush=True,
        )
        return _wait_any_exit(children, stop, metrics_dir)
    finally:
        _stop_all(children)
        holder.close()
        if owns_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _install_stop_handlers() -> list[int]:
    """SIGTERM/SIGINT set a flag the loops poll; the children get SIGTERM from `_stop_all`."""
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: received.append(number))
    return received


def _wait_ready(children: list[subprocess.Popen], timeout_s: float, stop: list[int]) -> bool:
    pending = {child.stdout.fileno(): child for child in children}
    deadline = time.monotonic() + timeout_s
    while pending and not stop:
        if time.monotonic() > deadline:
            logger.error("router processes not ready after %.0f s", timeout_s)
            return False
        readable, _, _ = select.select(list(pending), [], [], 0.2)
        for fd in readable:
            line = pending[fd].stdout.readline()
            if not line:
                logger.error("a router process exited before it was ready (code %s)", pending[fd].wait())
                return False
            if line.startswith(READY_PREFIX):
                del pending[fd]
    return not pending


def _wait_any_exit(children: list[subprocess.Popen], stop: list[int], metrics_dir: str) -> int:
    while not stop:
        for child in children:
            code = child.poll()
            if code is not None:
                logger.error("router process %d exited with %d; stopping the others", child.pid, code)
                _forget(child.pid, metrics_dir)
                return code or 1
        time.sleep(0.2)
    return 0


def _stop_all(children: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _forget(pid: int, metrics_dir: str) -> None:
    """Drop a dead child's live gauges from the multiprocess files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)
