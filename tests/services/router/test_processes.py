"""`tandem router --processes N`: several real router processes behind one port, one combined /metrics."""

from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.cluster import LocalCluster
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
