"""`LocalCluster`: Redis + router + N prefill + M decode workers as real processes on this machine.

Every child is ``python -m services.launch <role> ...`` configured by its command line: the variables tandem
flags read (TANDEM_*, REDIS_URL) are removed from its environment, so the parent's settings reach it only as
the explicit flags we pass (and secret settings, such as the router's API keys, as the variables we set).
A child is ready when it prints one ``TANDEM_READY {json}`` line on stdout.
Its stdout and stderr are read to the end on two threads (a child never blocks on a full pipe) and written to
``<run_dir>/<worker_id>.log``.

GPUs: with two or more, prefill workers get the first GPUs and decode workers the rest (via CUDA_VISIBLE_DEVICES:
one GPU per worker, or one per rank of a tensor-parallel worker, ``prefill_tp`` / ``decode_tp`` consecutive GPUs
that no other worker of its pool gets while the pool has enough); with one, everybody shares it; with none, CPU.
Processes that share a GPU without a fixed ``--kv-cache-memory`` start one after another with rising
``--gpu-memory-utilization`` caps (the engine counts other processes' memory against its cap), so each gets an
equal share.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from common.process_lifetime import SpawnThread, die_with_parent
from services.flags import known_env_vars

log = logging.getLogger("tandem.cluster")

READY_PREFIX = "TANDEM_READY "
ROLES = ("prefill", "decode")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_READY_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 40.0  # workers drain for up to 30 s by default


class ClusterError(RuntimeError):
    """A child did not come up: it exited, printed a bad READY line, or was not ready in time.

    The message's first line says which child, why, the last line it wrote to stderr (for a Python child, the
    exception: the cause) and its log; the lines after it are the end of its stderr."""


# ---------------------------------------------------------------------------------------------------- READY line


def parse_ready_line(line: str) -> dict[str, Any] | None:
    """The JSON object of a ``TANDEM_READY {json}`` line, or None for any other line.

    Raises ValueError for a READY line whose payload is not a JSON object with string ``role`` and ``address``.
    """
    text = line.strip()
    if not text.startswith(READY_PREFIX.strip()):
        return None
    try:
        info = json.loads(text[len(READY_PREFIX.strip()):])
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad READY line {text!r}: {exc}") from None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("role", "address")):
        raise ValueError(f"bad READY line {text!r}: want a JSON object with string 'role' and 'address'")
    return info


# ---------------------------------------------------------------------------------------------------- GPU plan


def gpu_pools(
    gpu_count: int, num_prefill: int, num_decode: int, prefill_tp: int = 1, decode_tp: int = 1
) -> dict[str, list[int]]:
    """GPU indices each role may use. Invariant: when the GPUs can hold one worker of each pool apart (>= 2 GPUs,
    >= prefill_tp + decode_tp, both roles present) the pools are disjoint, each holds at least its tensor-parallel
    size, and they are sized in proportion to the GPUs the pools' workers ask for; otherwise both pools are every
    GPU (they share); with 0 GPUs, empty."""
    every = list(range(gpu_count))
    if gpu_count < max(2, prefill_tp + decode_tp) or num_prefill == 0 or num_decode == 0:
        return {"prefill": every, "decode": every}
    wanted_prefill, wanted_decode = num_prefill * prefill_tp, num_decode * decode_tp
    share = int(gpu_count * wanted_prefill / (wanted_prefill + wanted_decode) + 0.5)
    k = min(max(share, prefill_tp), gpu_count - decode_tp)
    return {"prefill": every[:k], "decode": every[k:]}


def gpu_for(role: str, index: int, pools: Mapping[str, Sequence[int]], tp: int = 1) -> list[int] | None:
    """The GPUs of the `index`-th worker of `role`, one per tensor-parallel rank, or None for CPU: its pool cut into
    slots of `tp` consecutive GPUs, taken round robin (so workers' ranks never overlap while slots last).

    ValueError when the pool has fewer than `tp` GPUs (two ranks of one worker on one GPU cannot work)."""
    pool = pools[role]
    if not pool:
        return None
    if len(pool) < tp:
        raise ValueError(f"--{role}-tp {tp} needs {tp} GPUs for each {role} worker; its pool has {len(pool)}")
    slot = index % (len(pool) // tp)
    return list(pool[slot * tp : (slot + 1) * tp])


def plan_gpus(
    gpu_count: int, num_prefill: int, num_decode: int, gpu_ids: Sequence[str] | None = None,
    prefill_tp: int = 1, decode_tp: int = 1,
) -> dict[str, str | None]:
    """worker id ('prefill-0', 'decode-1', ...) -> its CUDA_VISIBLE_DEVICES, or None (CPU: leave it alone).

    `gpu_ids` names the GPUs as CUDA_VISIBLE_DEVICES should (default '0'..'gpu_count-1'); pass the parent's own
    CUDA_VISIBLE_DEVICES entries so a restricted parent hands out only its GPUs. A tensor-parallel worker sees its
    ranks' GPUs ("2,3"): its ranks are cuda:0..tp-1 inside it.
    """
    ids = list(gpu_ids) if gpu_ids is not None else [str(i) for i in range(gpu_count)]
    if len(ids) != gpu_count:
        raise ValueError(f"{len(ids)} gpu ids for {gpu_count} GPUs")
    pools = gpu_pools(gpu_count, num_prefill, num_decode, prefill_tp, decode_tp)
    tps = {"prefill": prefill_tp, "decode": decode_tp}
    plan: dict[str, str | None] = {}
    for role, count in (("prefill", num_prefill), ("decode", num_decode)):
        for i in range(count):
            gpus = gpu_for(role, i, pools, tps[role])
            plan[f"{role}-{i}"] = None if gpus is None else ",".join(ids[gpu] for gpu in gpus)
    return plan


def share_ranks(plan: Mapping[str, str | None]) -> dict[str, tuple[int, int]]:
    """worker id -> (its rank among the processes on its GPU, how many share that GPU); CPU workers get (0, 1).
    A worker on several GPUs (tensor parallelism) counts on each; it takes its most crowded GPU's figures."""
    by_gpu: dict[str, list[str]] = {}
    for worker_id, gpus in plan.items():
        for gpu in gpus.split(",") if gpus is not None else ():
            by_gpu.setdefault(gpu, []).append(worker_id)
    ranks = {worker_id: (0, 1) for worker_id in plan}
    for ids in by_gpu.values():
        for rank, worker_id in enumerate(ids):
            ranks[worker_id] = max(ranks[worker_id], (rank, len(ids)))
    return ranks


def launch_waves(ranks: Mapping[str, tuple[int, int]], staggered: bool) -> list[list[str]]:
    """Start order: wave k holds the k-th process of every GPU (all at once when not `staggered`)."""
    if not staggered:
        return [list(ranks)] if ranks else []
    depth = max((rank for rank, _ in ranks.values()), default=-1) + 1
    return [[w for w, (rank, _) in ranks.items() if rank == k] for k in range(depth)]


def memory_cap(rank: int, sharers: int, base: float) -> float:
    """The --gpu-memory-utilization for the rank-th of `sharers` processes started in turn on one GPU."""
    return base * (rank + 1) / sharers


def detect_gpu_ids(device: str, environ: Mapping[str, str]) -> list[str]:
    """The GPUs children may use: none unless --device is auto/cuda and nvidia-smi exists; then torch's count,
    named by the parent's CUDA_VISIBLE_DEVICES entries when set. Imports torch only in that case."""
    if device not in ("auto", "cuda") or shutil.which("nvidia-smi") is None:
        return []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception as exc:  # a broken CUDA install means CPU, as the engine's 'auto' would decide
        log.warning("cannot count GPUs (%s); using CPU", exc)
        return []
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def child_env(
    environ: Mapping[str, str], cuda_visible_devices: str | None, strip: Iterable[str]
) -> dict[str, str]:
    """A child's environment: `environ` minus `strip`, NCCL NVLink multicast off, unbuffered output, this repo
    importable, and CUDA_VISIBLE_DEVICES when given ('' hides every GPU)."""
    env = {k: v for k, v in environ.items() if k not in set(strip)}
    env["NCCL_NVLS_ENABLE"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), environ.get("PYTHONPATH", "")) if p)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value given for `flag` in `argv` (as `--flag V` or `--flag=V`), or None."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


# ---------------------------------------------------------------------------------------------------- one child


class OutputWatcher:
    """Drains one child's stdout and stderr on two daemon threads until EOF.

    Invariants: both streams are read to their end; every line is appended to `log_path` (stderr lines also to `echo`,
    prefixed with the name); `ready` holds the first READY line's JSON; `settled` is set once a READY line
    was seen or stdout ended, so a waiter never waits on a dead child; `tail()` is the last stderr lines.
    """

    def __init__(self, name: str, log_path: Path, echo: IO[str] | None = None, tail_lines: int = 40) -> None:
        self.name = name
        self.ready: dict[str, Any] | None = None
        self.error: str | None = None
        self.settled = threading.Event()
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by join() once both streams end
        self._echo = echo
        self._lock = threading.Lock()
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._threads: list[threading.Thread] = []

    def start(self, stdout: IO[str], stderr: IO[str]) -> OutputWatcher:
        for target, stream in ((self._read_stdout, stdout), (self._read_stderr, stderr)):
            thread = threading.Thread(target=target, args=(stream,), name=f"{self.name}-{target.__name__}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def note(self, line: str) -> None:
        """Append our own line (e.g. the command) to the log."""
        self._write(line)

    def tail(self) -> str:
        with self._lock:
            return "".join(self._tail).rstrip() or "(no stderr output)"

    def join(self, timeout_s: float) -> None:
        """Wait (bounded) for both readers to reach EOF, then close the log file."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if not self._log.closed and not any(t.is_alive() for t in self._threads):
                self._log.close()

    def _read_stdout(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._write(line)
                if not self.settled.is_set():
                    self._check_ready(line)
        finally:
            self.settled.set()

    def _check_ready(self, line: str) -> None:
        try:
            info = parse_ready_line(line)
        except ValueError as exc:
            self.error = str(exc)
            self.settled.set()
            return
        if info is not None:
            self.ready = info
            self.settled.set()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self._write(line)
            with self._lock:
                self._tail.append(line)
            if self._echo is not None:
                self._echo.write(f"[{self.name}] {line}")
                self._echo.flush()

    def _write(self, line: str) -> None:
        with self._lock:
            if not self._log.closed:
                self._log.write(line)
                self._log.flush()


@dataclass
class WorkerProcess:
    """One supervised child (a worker, or the router with worker_id 'router'); `address` is set once ready, and
    for a worker `metrics_port` (its /metrics, /health, /ready) too."""

    role: str
    worker_id: str
    popen: subprocess.Popen[str]
    log_path: Path
    watcher: OutputWatcher = field(repr=False)
    gpu: str | None = None
    address: str | None = None
    metrics_port: int | None = None
    argv: list[str] = field(default_factory=list)  # what it was started with: a restart starts it again so
    extra_env: dict[str, str] = field(default_factory=dict, repr=False)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def metrics_url(self) -> str:
        """http://host:port serving /metrics: the router's own address, a worker's metrics port on its host."""
        if self.address is None:
            raise RuntimeError(f"{self.worker_id} is not ready")
        if self.role == "router":
            return self.address
        if not self.metrics_port:
            raise RuntimeError(f"{self.worker_id} reported no metrics_port")
        return f"http://{self.address.rsplit(':', 1)[0]}:{self.metrics_port}"


# ---------------------------------------------------------------------------------------------------- cluster


class LocalCluster:
    """Redis + router + workers as child processes on one machine; use as a context manager or start()/stop().

    Invariants: after start() returns, every child printed READY (`address` set) and `router_url`/`redis_url`
    are valid; stop() leaves no child or owned Redis running, is idempotent, and runs at interpreter exit if
    the owner never called it. `workers` keeps exited workers too (check `.alive`).
    """

    def __init__(
        self,
        model: str,
        num_prefill: int,
        num_decode: int,
        router_port: int,
        host: str = "127.0.0.1",
        worker_args: Sequence[str] = (),
        redis_url: str | None = None,
        run_dir: Path | None = None,
        *,
        namespace: str = "tandem",
        router_args: Sequence[str] = (),
        router_env: Mapping[str, str] | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        echo_stderr: bool = False,
        environ: Mapping[str, str] | None = None,
        prefill_tp: int = 1,
        decode_tp: int = 1,
    ) -> None:
        self.model, self.host, self.router_port, self.namespace = model, host, router_port, namespace
        self.tensor_parallel = {"prefill": prefill_tp, "decode": decode_tp}  # each pool's ranks per worker
        self.num_prefill, self.num_decode = num_prefill, num_decode
        self.worker_args, self.router_args = list(worker_args), list(router_args)
        self.router_env = dict(router_env or {})  # e.g. TANDEM_API_KEYS: secrets stay off the command line
        self.redis_url = redis_url
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tandem-run-"))
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.workers: dict[str, WorkerProcess] = {}
        self.router: WorkerProcess | None = None
        self._environ = dict(os.environ if environ is None else environ)
        self._echo = sys.stderr if echo_stderr else None
        self._redis: Any = None  # common.coord.RedisServer when we started our own
        self._next_index = dict.fromkeys(ROLES, 0)
        self._reported: set[str] = set()
        self._retired: set[str] = set()  # children stopped on purpose (terminate, stop): never restarted
        self._gpu_ids: list[str] = []
        self._atexit_registered = False
        self._spawner: SpawnThread | None = None
        self._preexec = die_with_parent()

    # -- public API

    @property
    def router_url(self) -> str:
        """http://host:port the router reported in its READY line."""
        if self.router is None or self.router.address is None:
            raise RuntimeError("the cluster is not started")
        return self.router.address

    def start(self) -> LocalCluster:
        """Redis first, then the router and the workers (in GPU-sharing waves), each until READY.
        On any failure (or KeyboardInterrupt) everything started so far is stopped before the error propagates."""
        if self.router is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._spawner = self._spawner or SpawnThread()
        atexit.register(self.stop)
        self._atexit_registered = True
        try:
            self._start_redis()
            self._start_processes()
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, role: str) -> WorkerProcess:
        """Start one more worker of `role` (next free id, next GPU of its pool) and wait for READY."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        index = self._next_index[role]
        self._next_index[role] += 1
        pools = gpu_pools(len(self._gpu_ids), self.num_prefill, self.num_decode,
                          self.tensor_parallel["prefill"], self.tensor_parallel["decode"])
        gpus = gpu_for(role, index, pools, self.tensor_parallel[role])
        gpu_id = None if gpus is None else ",".join(self._gpu_ids[gpu] for gpu in gpus)
        shared = gpu_id is not None and self._fraction_based() and self._gpu_in_use(gpu_id)
        extra = ["--gpu-memory-utilization", str(self._base_memory_cap())] if shared else []
        proc = self._spawn_worker(role, f"{role}-{index}", gpu_id, extra)
        try:
            self._await_ready([proc], self.ready_timeout_s)
        except BaseException:
            self._end(proc, timeout_s=0.0)
            raise
        self.workers[proc.worker_id] = proc
        return proc

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a child (any signal, e.g. SIGSTOP to freeze it); for SIGKILL also reap it."""
        proc = self._child(worker_id)
        if proc.alive:
            proc.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.popen.wait()

    def terminate(self, worker_id: str, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int:
        """SIGTERM (plus SIGCONT, in case it was stopped) and wait up to `timeout`; SIGKILL if it did not exit.
        Returns the exit code (negative: killed by that signal). The child is retired: never restarted."""
        self._retired.add(worker_id)
        return self._end(self._child(worker_id), timeout)

    def newly_exited(self) -> list[WorkerProcess]:
        """Children that exited since the last call (each reported once)."""
        gone = [p for p in self._children() if not p.alive and p.worker_id not in self._reported]
        self._reported.update(p.worker_id for p in gone)
        return gone

    def crashed(self) -> list[WorkerProcess]:
        """Children that exited without being stopped on purpose (terminate() or stop())."""
        return [p for p in self._children() if not p.alive and p.worker_id not in self._retired]

    def restart(self, worker_id: str) -> WorkerProcess:
        """Start an exited child again with the command line and environment it had (a router keeps its port)
        and wait for READY. On failure the new process is ended, left in place (exited) and ClusterError raised."""
        old = self._child(worker_id)
        if old.alive:
            raise RuntimeError(f"{worker_id} is still running")
        argv = list(old.argv)
        if old.role == "router" and old.address is not None:  # port 0 got a real port: keep clients' URL valid
            argv[argv.index("--port") + 1] = old.address.rsplit(":", 1)[1]
        proc = self._spawn(old.role, worker_id, argv, old.gpu, old.extra_env)
        if old.role == "router":
            self.router = proc
        else:
            self.workers[worker_id] = proc
        self._reported.discard(worker_id)
        try:
            self._await_ready([proc], self.ready_timeout_s)
        except BaseException:
            self._end(proc, timeout_s=0.0)
            raise
        return proc

    @property
    def redis_alive(self) -> bool:
        """False only when the cluster started its own Redis and that server has exited."""
        return self._redis is None or self._redis.running

    def restart_redis(self) -> None:
        """Start our own Redis again on its port, empty (workers re-register on their next heartbeat)."""
        assert self._redis is not None and self._spawner is not None
        self._spawner.call(self._redis.restart)

    def stop(self) -> None:
        """SIGTERM the router, then the workers (each group waited up to stop_timeout_s, then SIGKILL), then stop
        our Redis. Idempotent; safe before start()."""
        self._retired.update(p.worker_id for p in self._children())
        if self.router is not None:
            self._end_all([self.router])
        self._end_all(list(self.workers.values()))
        for proc in self._children():
            proc.watcher.join(timeout_s=2.0)
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- starting

    def _start_redis(self) -> None:
        if self.redis_url is not None:
            return
        from common.coord.redis_server import RedisServer

        assert self._spawner is not None
        self._redis = RedisServer(port=None, preexec_fn=self._preexec)
        self._spawner.call(self._redis.start)
        self.redis_url = self._redis.url

    def _start_processes(self) -> None:
        device = _flag_value(self.worker_args, "--device") or "auto"
        self._gpu_ids = detect_gpu_ids(device, self._environ)
        plan = plan_gpus(len(self._gpu_ids), self.num_prefill, self.num_decode, self._gpu_ids,
                         self.tensor_parallel["prefill"], self.tensor_parallel["decode"])
        ranks = share_ranks(plan)
        self._next_index = {"prefill": self.num_prefill, "decode": self.num_decode}
        staggered = self._fraction_based() and any(n > 1 for _, n in ranks.values())
        self.router = self._spawn_router()
        pending = [self.router]
        for wave in launch_waves(ranks, staggered):
            for worker_id in wave:
                rank, sharers = ranks[worker_id]
                extra = self._memory_args(rank, sharers) if staggered and sharers > 1 else []
                role = worker_id.rsplit("-", 1)[0]
                proc = self._spawn_worker(role, worker_id, plan[worker_id], extra)
                self.workers[proc.worker_id] = proc
                pending.append(proc)
            self._await_ready(pending, self.ready_timeout_s)
            pending = []
        self._await_ready(pending, self.ready_timeout_s)

    def _fraction_based(self) -> bool:
        """True when workers size their KV cache as a fraction of GPU memory (no fixed --kv-cache-memory)."""
        return _flag_value(self.worker_args, "--kv-cache-memory") is None

    def _base_memory_cap(self) -> float:
        return float(_flag_value(self.worker_args, "--gpu-memory-utilization") or 0.9)

    def _memory_args(self, rank: int, sharers: int) -> list[str]:
        return ["--gpu-memory-utilization", f"{memory_cap(rank, sharers, self._base_memory_cap()):.4f}"]

    def _gpu_in_use(self, gpus: str) -> bool:
        """Whether a live worker uses any of `gpus` (another pool may be adding)."""
        wanted = set(gpus.split(","))
        return any(p.alive and p.gpu and wanted & set(p.gpu.split(",")) for p in list(self.workers.values()))

    def _spawn_router(self) -> WorkerProcess:
        argv = ["router", "--model", self.model, *self.router_args, *self._coord_args(),
                "--host", self.host, "--port", str(self.router_port)]
        hide_gpus = "" if self._gpu_ids else None  # the router tokenizes; it must not take GPU memory
        return self._spawn("router", "router", argv, hide_gpus, self.router_env)

    def _spawn_worker(self, role: str, worker_id: str, gpu: str | None, extra: Sequence[str]) -> WorkerProcess:
        argv = [role, "--model", self.model, *self.worker_args, *extra, *self._coord_args(),
                "--tensor-parallel-size", str(self.tensor_parallel[role]),
                "--host", self.host, "--port", "0", "--worker-id", worker_id]
        return self._spawn(role, worker_id, argv, gpu)

    def _coord_args(self) -> list[str]:
        assert self.redis_url is not None
        return ["--redis-url", self.redis_url, "--namespace", self.namespace]

    def _spawn(self, role: str, worker_id: str, argv: list[str], gpu: str | None,
               extra_env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start `python -m services.launch *argv` in its own session (Ctrl-C on our terminal does not reach it:
        we stop it ourselves, in order), from the spawn thread, set to die with us."""
        log_path = self.run_dir / f"{worker_id}.log"
        cmd = [sys.executable, "-m", "services.launch", *argv]
        watcher = OutputWatcher(worker_id, log_path, self._echo)
        watcher.note(f"$ CUDA_VISIBLE_DEVICES={gpu} {' '.join(cmd)}\n")
        env = {**child_env(self._environ, gpu, known_env_vars()), **(extra_env or {})}
        spawner = self._spawner or SpawnThread()
        self._spawner = spawner
        try:
            popen = spawner.call(lambda: subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                errors="replace", bufsize=1, env=env, start_new_session=True, preexec_fn=self._preexec,
            ))
        except OSError:
            watcher.join(timeout_s=0.0)  # no reader threads yet: just closes the log
            raise
        watcher.start(popen.stdout, popen.stderr)
        log.info("started %s (pid %d, gpu %s): %s", worker_id, popen.pid, gpu, log_path)
        return WorkerProcess(role, worker_id, popen, log_path, watcher, gpu, argv=list(argv),
                             extra_env=dict(extra_env or {}))

    def _await_ready(self, procs: Sequence[WorkerProcess], timeout_s: float) -> None:
        """Wait until every one of `procs` printed READY; raise ClusterError at the first that cannot."""
        deadline = time.monotonic() + timeout_s
        pending = list(procs)
        while pending:
            for proc in [p for p in pending if p.watcher.settled.is_set()]:
                self._accept_ready(proc)
                pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.worker_id for p in pending)
                raise ClusterError(f"not ready after {timeout_s:.0f} s: {names}{self._explain(pending[0])}")
            if pending:
                pending[0].watcher.settled.wait(0.05)

    def _accept_ready(self, proc: WorkerProcess) -> None:
        """Check a settled child's READY line; raise ClusterError (with its stderr tail) if there is none."""
        info = proc.watcher.ready
        if info is None:
            raise ClusterError(f"{proc.worker_id} {self._no_ready_reason(proc)}{self._explain(proc)}")
        expected_id = None if proc.role == "router" else proc.worker_id
        if info["role"] != proc.role or info.get("worker_id", expected_id) != expected_id:
            raise ClusterError(f"{proc.worker_id} reported READY as {info}{self._explain(proc)}")
        proc.address = info["address"]
        if isinstance(info.get("metrics_port"), int):
            proc.metrics_port = info["metrics_port"]

    @staticmethod
    def _no_ready_reason(proc: WorkerProcess) -> str:
        if proc.watcher.error is not None:
            return proc.watcher.error
        try:
            code = proc.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return "closed its stdout without printing READY"
        return f"exited with code {code} before READY"

    def _explain(self, proc: WorkerProcess) -> str:
        """': <its last stderr line> (log: <path>)', then its stderr's last lines on the following lines."""
        proc.watcher.join(timeout_s=0.0 if proc.alive else 1.0)
        tail = proc.watcher.tail()
        return f": {tail.splitlines()[-1].strip()} (log: {proc.log_path})\nits stderr ends:\n{tail}"

    # -- stopping

    def _children(self) -> list[WorkerProcess]:
        # dict(...) copies in one step: the autoscaler's thread may add or end workers meanwhile
        return ([self.router] if self.router is not None else []) + list(dict(self.workers).values())

    def _child(self, worker_id: str) -> WorkerProcess:
        for proc in self._children():
            if proc.worker_id == worker_id:
                return proc
        raise KeyError(f"no such process: {worker_id!r}")

    def _end_all(self, procs: Sequence[WorkerProcess]) -> None:
        """SIGTERM all of `procs` at once, wait for them together (bounded), SIGKILL whoever is left."""
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in procs:
            self._end(proc, max(0.0, deadline - time.monotonic()), signalled=True)

    def _end(self, proc: WorkerProcess, timeout_s: float, signalled: bool = False) -> int:
        """SIGTERM `proc` (unless `signalled` already), wait up to `timeout_s`, then SIGKILL; the exit code."""
        if not signalled:
            _signal(proc, signal.SIGTERM)
        try:
            return proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit %.0f s after SIGTERM; killing it", proc.worker_id,
                        proc.popen.pid, timeout_s)
            proc.popen.kill()
            return proc.popen.wait()


def _signal(proc: WorkerProcess, sig: int) -> None:
    """Send `sig` (and SIGCONT, so a stopped child can act on it) unless the child already exited."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(sig)
        proc.popen.send_signal(signal.SIGCONT)


# ---------------------------------------------------------------------------------------------------- supervision


class GaveUp(RuntimeError):
    """A child (or our Redis) crashed too often, each time soon after it started: restarting it again is futile."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a crashed child: after ``base_s`` doubling per consecutive fast crash up to ``cap_s``; a
    child that ran ``stable_s`` before it crashed starts the count afresh; ``max_fast_crashes`` in a row: give up."""

    base_s: float = 1.0
    cap_s: float = 30.0
    stable_s: float = 60.0
    max_fast_crashes: int = 5

    def delay_s(self, crashes: int) -> float:
        """Back-off before the restart that follows the `crashes`-th consecutive fast crash (1-based)."""
        return min(self.base_s * 2 ** (crashes - 1), self.cap_s)


class ClusterSupervisor:
    """Restarts the cluster's crashed children and its own Redis with exponential back-off; call poll() often.

    Invariants: a child stopped on purpose (LocalCluster.terminate / stop) is never restarted; each crash is
    reported once through `report`; poll() raises GaveUp once one child crashed `max_fast_crashes` times in a row
    within `stable_s` of starting. A restart waits for READY on the calling thread.
    """

    REDIS = "redis"

    def __init__(self, cluster: LocalCluster, report: Callable[[str], None],
                 policy: RestartPolicy = RestartPolicy(), clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster, self.report, self.policy, self.clock = cluster, report, policy, clock
        self._crashes: dict[str, int] = {}
        self._due: dict[str, float] = {}  # name -> when to restart it
        self._redis_started = clock()

    def poll(self) -> None:
        now = self.clock()
        for proc in self.cluster.crashed():
            if proc.worker_id not in self._due:
                self._on_crash(proc.worker_id, now - proc.started_at, f"exited with code {proc.popen.returncode}",
                               str(proc.log_path))
        if not self.cluster.redis_alive and self.REDIS not in self._due:
            self._on_crash(self.REDIS, now - self._redis_started, "exited", "its own log folder")
        for name, due in sorted(self._due.items(), key=lambda item: item[1]):
            if self.clock() >= due:
                del self._due[name]
                self._restart(name)

    def _on_crash(self, name: str, uptime_s: float, how: str, log_path: str) -> None:
        crashes = 1 if uptime_s >= self.policy.stable_s else self._crashes.get(name, 0) + 1
        self._crashes[name] = crashes
        if crashes >= self.policy.max_fast_crashes:
            raise GaveUp(f"{name} {how} {crashes} times in a row, each within {self.policy.stable_s:.0f} s of "
                         f"starting; giving up (log: {log_path})")
        delay = self.policy.delay_s(crashes)
        self.report(f"{name} {how} after {uptime_s:.1f} s; restarting it in {delay:.0f} s (log: {log_path})")
        self._due[name] = self.clock() + delay

    def _restart(self, name: str) -> None:
        try:
            if name == self.REDIS:
                self._redis_started = self.clock()
                self.cluster.restart_redis()
            else:
                self.cluster.restart(name)
        except (ClusterError, RuntimeError, OSError) as exc:  # counted as a crash at the next poll
            self.report(f"{name} did not come back: {str(exc).splitlines()[0]}")
            if name == self.REDIS:
                self._on_crash(name, 0.0, "did not start", "its own log folder")
            return
        self.report(f"{name} is back")


class LocalScaler:
    """The planner's actuator for `tandem serve --autoscale`: a pool grows by starting workers (each waits for
    READY) and shrinks by SIGTERM to its newest workers, which drain (finish their streams) before they exit.

    ``scale_pools`` changes several pools at once, one thread per pool, and returns when all are done: one
    pool's slow start never delays the other's. Within a pool workers start one after the other (add_worker
    takes the pool's next id and GPU, so two calls for one role must not overlap).
    Called from the planner's thread; it only uses LocalCluster's add_worker / terminate.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def replicas(self, role: str) -> int:
        return len(self._alive(role))

    def available(self, role: str) -> int:
        return len(self._alive(role))

    def scale(self, role: str, replicas: int, reason: str) -> None:
        log.info("autoscale %s: %d -> %d (%s)", role, self.replicas(role), replicas, reason)
        while self.replicas(role) < replicas:
            self.cluster.add_worker(role)
        for proc in reversed(self._alive(role)[replicas:]):  # the newest first
            self.cluster.terminate(proc.worker_id)

    def scale_pools(self, targets: Sequence[tuple[str, int, str]]) -> None:
        """Each (role, replicas, reason) on its own thread; waits for all, then raises the first error, if any."""
        if len({role for role, _, _ in targets}) != len(targets):
            raise ValueError(f"one target per pool, got {targets}")
        errors: list[BaseException] = []

        def scale_one(role: str, replicas: int, reason: str) -> None:
            try:
                self.scale(role, replicas, reason)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller after every pool is done
                errors.append(exc)

        threads = [threading.Thread(target=scale_one, args=target, name=f"autoscale-{target[0]}", daemon=True)
                   for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _alive(self, role: str) -> list[WorkerProcess]:
        """The pool's live workers, oldest first (they were started in this order)."""
        return [proc for proc in dict(self.cluster.workers).values() if proc.role == role and proc.alive]
