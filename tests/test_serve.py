"""`tandem serve` as a user runs it: a real process tree on 127.0.0.1 (Redis, router, a decode worker on CPU).

It restarts a decode worker that dies, its children die with it when it is SIGKILLed (the port is free again),
it passes TANDEM_API_KEYS on to its router, and a failure to start is one line on stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common.coord.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "256"]
BODY = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
KEY = "test-key-18"


def serve(args: list[str], env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update({"PYTHONPATH": str(ROOT), **(env_extra or {})})
    return subprocess.Popen([sys.executable, "-m", "services.launch", "serve", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                try:
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_text().replace("\0", " ")
                except OSError:
                    continue
                frontier.append(child)
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def generate(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/generate", json=BODY, headers=headers, timeout=60)


@pytest.mark.timeout(420)
def test_serve_restarts_a_dead_decode_worker_and_dies_whole_when_sigkilled(tmp_path):
    port = free_port()
    proc = serve(["--prefill", "0", "--decode", "1", "--port", str(port), "--log-dir", str(tmp_path), *ENGINE_ARGS],
                 {"TANDEM_API_KEYS": KEY})
    url = f"http://127.0.0.1:{port}"
    tree: dict[int, str] = {}
    try:
        banner = proc.stdout.readline()
        assert "router listening on" in banner, (banner, proc.stderr.read() if proc.poll() is not None else "")
        assert generate(url, None).status_code == 401  # TANDEM_API_KEYS reached the router
        assert generate(url, KEY).status_code == 200

        decode = [pid for pid, cmd in descendants(proc.pid).items() if "services.launch decode" in cmd]
        assert len(decode) == 1, descendants(proc.pid)
        os.kill(decode[0], signal.SIGKILL)
        wait_for(lambda: generate(url, KEY).status_code == 200, 180, "requests to succeed again")
        new_decode = [pid for pid, cmd in descendants(proc.pid).items() if "services.launch decode" in cmd]
        assert new_decode and new_decode != decode

        tree = descendants(proc.pid)
        assert any("redis-server" in cmd for cmd in tree.values()) and len(tree) >= 3, tree
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not [pid for pid in tree if pid in descendants(1) or _alive(pid)], 10, f"children {tree}")
        wait_for(lambda: port_is_free(port), 10, f"port {port} to be free")
    finally:
        proc.kill()
        proc.wait(10)
        for pid, cmd in tree.items():  # only on failure: leave nothing behind (and never a reused pid)
            with contextlib.suppress(OSError):
                if (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ") == cmd:
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _one_line_failure(args: list[str]) -> str:
    proc = serve(args)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.timeout(300)
def test_a_bad_model_is_one_line():
    line = _one_line_failure(["--model", "/no/such/model.gguf", "--port", "0"])
    assert line.startswith("tandem serve: ") and "/no/such/model.gguf" in line, line


@pytest.mark.timeout(300)
def test_a_busy_port_is_one_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = _one_line_failure(["--port", str(port)])
    assert f"127.0.0.1:{port}" in line and "--port" in line, line


@pytest.mark.timeout(300)
def test_decode_0_is_refused_before_anything_starts():
    line = _one_line_failure(["--decode", "0", "--port", "0"])
    assert "--decode 0" in line and "503" in line, line


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("args", "words"), [
    (["--tensor-parallel-size", "2"], ["--prefill-tp", "--decode-tp"]),
    (["--decode-tp", "0"], ["--decode-tp", ">= 1"]),
])
def test_tensor_parallelism_is_set_per_pool(args, words):
    line = _one_line_failure([*args, "--port", "0"])
    assert all(word in line for word in words), line


@pytest.mark.timeout(300)
def test_a_missing_redis_server_is_one_line(tmp_path):
    proc = serve(["--port", "0"], {"PATH": str(tmp_path)})  # no redis-server on this PATH
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "redis-server not found" in err and "--redis-url" in err, err


@pytest.mark.timeout(300)
def test_verbose_shows_the_traceback():
    proc = serve(["-v", "--model", "/no/such/model.gguf", "--port", "0"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("tandem serve:")
