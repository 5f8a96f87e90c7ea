"""`tandem router --processes N`: several real router processes behind one port, one combined /metrics."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from common.coord.redis_server import RedisServer
from services.cluster import LocalCluster
from services.flags import known_env_vars
from services.router.processes import child_argv
from tests.services.test_cluster_e2e import ROUTER_ARGS, WORKER_ARGS, chat_prompt, generate, wait_ready

pytestmark = pytest.mark.timeout(300)


def test_child_argv_replaces_port_and_processes_and_adds_reuse_port():
    argv = ["router", "--model", "m", "--processes", "4", "--port=0", "--reuse-port", "-v"]
    assert child_argv(argv, 8123) == [
        "router",
        "--model",
        "m",
        "-v",
        "--processes",
        "1",
        "--port",
        "8123",
        "--reuse-port",
    ]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(word) for word in handle.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _metric_total(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def test_processes_share_the_port_and_add_up_their_metrics(tmp_path):
    cluster = LocalCluster(
        "smollm2",
        0,
        1,
        router_port=0,
        worker_args=WORKER_ARGS,
        router_args=[*ROUTER_ARGS, "--processes", "3"],
        run_dir=tmp_path,
    )
    try:
        cluster.start()
        wait_ready(cluster.router_url, 0, 1)
        supervisor = cluster.router.popen
        children = _children(supervisor.pid)
        assert len(children) == 3
        prompts = [chat_prompt(f"Count to {i}.") for i in range(12)]
        with ThreadPoolExecutor(12) as pool:  # separate connections, spread over the processes by the kernel
            answers = list(pool.map(lambda p: generate(cluster.router_url, p, max_tokens=4), prompts))
        assert all(len(a["token_ids"]) == 4 for a in answers)
        for _ in range(4):  # whichever process answers, /metrics covers all of them
            text = httpx.get(f"{cluster.router_url}/metrics", timeout=10).text
            assert _metric_total(text, "tandem_workers") >= 1
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
        assert not [pid for pid in children if _alive(pid)], "router processes left behind"
    finally:
        cluster.stop()


def _ready_line(process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.5)
        if readable:
            line = process.stdout.readline()
            assert line, f"the router exited before it was ready (code {process.wait()})"
            if line.startswith("TANDEM_READY "):
                return line
    pytest.fail(f"the router was not ready within {timeout_s} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_router_processes_die_with_a_sigkilled_supervisor(tmp_path):
    """Nothing can clean up after SIGKILL, so the children must go by themselves (not keep the port and Redis)."""
    env = {k: v for k, v in os.environ.items() if k not in known_env_vars()}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    with RedisServer() as redis:
        argv = ["router", "--model", "smollm2", "--port", "0", "--processes", "2", "--redis-url", redis.url]
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "services.launch", *argv, *ROUTER_ARGS],
            env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "router.log").open("w"), text=True,
        )
        children: list[int] = []
        try:
            _ready_line(supervisor, timeout_s=180)
            children = _children(supervisor.pid)
            assert len(children) == 2 and all(_alive(pid) for pid in children)
            supervisor.kill()
            supervisor.wait(timeout=10)
            deadline = time.monotonic() + 5.0
            while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not [pid for pid in children if _alive(pid)], "router processes outlived their supervisor"
        finally:
            supervisor.kill()
            supervisor.wait(timeout=10)
            for pid in children:  # only when the test failed: do not leave them to the next test
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
