"""LocalCluster's supervisor mechanics that need no service: READY lines, the GPU plan, output draining, stop().

End-to-end cluster tests (real router and workers) live beside the services.
"""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace

import pytest

from services.cluster import (
    ClusterError,
    LocalCluster,
    OutputWatcher,
    child_env,
    gpu_pools,
    launch_waves,
    memory_cap,
    parse_ready_line,
    plan_gpus,
    share_ranks,
)

# ---------------------------------------------------------------------------------------------------- READY line


def test_ready_line_is_parsed():
    line = 'TANDEM_READY {"role": "decode", "worker_id": "decode-0", "address": "127.0.0.1:50051"}\n'
    assert parse_ready_line(line) == {"role": "decode", "worker_id": "decode-0", "address": "127.0.0.1:50051"}


@pytest.mark.parametrize("line", ["", "\n", "INFO starting", "tandem_ready {}", "  TANDEM_READ {}"])
def test_other_lines_are_not_ready(line):
    assert parse_ready_line(line) is None


@pytest.mark.parametrize(
    "line",
    ["TANDEM_READY", "TANDEM_READY {not json", 'TANDEM_READY ["decode"]', 'TANDEM_READY {"role": "router"}',
     'TANDEM_READY {"role": "router", "address": 8000}'],
)
def test_malformed_ready_line_raises(line):
    with pytest.raises(ValueError, match="bad READY line"):
        parse_ready_line(line)


# ---------------------------------------------------------------------------------------------------- GPU plan

PLANS = [
    # gpus, prefill, decode -> CUDA_VISIBLE_DEVICES per worker
    (0, 1, 1, {"prefill-0": None, "decode-0": None}),
    (0, 2, 3, {"prefill-0": None, "prefill-1": None, "decode-0": None, "decode-1": None, "decode-2": None}),
    (1, 1, 1, {"prefill-0": "0", "decode-0": "0"}),
    (1, 2, 2, {"prefill-0": "0", "prefill-1": "0", "decode-0": "0", "decode-1": "0"}),
    (2, 1, 1, {"prefill-0": "0", "decode-0": "1"}),
    (2, 2, 2, {"prefill-0": "0", "prefill-1": "0", "decode-0": "1", "decode-1": "1"}),
    (2, 1, 3, {"prefill-0": "0", "decode-0": "1", "decode-1": "1", "decode-2": "1"}),
    (2, 0, 2, {"decode-0": "0", "decode-1": "1"}),
    (2, 2, 0, {"prefill-0": "0", "prefill-1": "1"}),
    (4, 1, 1, {"prefill-0": "0", "decode-0": "2"}),
    (4, 1, 3, {"prefill-0": "0", "decode-0": "1", "decode-1": "2", "decode-2": "3"}),
    (4, 2, 2, {"prefill-0": "0", "prefill-1": "1", "decode-0": "2", "decode-1": "3"}),
    (4, 3, 1, {"prefill-0": "0", "prefill-1": "1", "prefill-2": "2", "decode-0": "3"}),
    (4, 4, 4, {"prefill-0": "0", "prefill-1": "1", "prefill-2": "0", "prefill-3": "1",
               "decode-0": "2", "decode-1": "3", "decode-2": "2", "decode-3": "3"}),
]


@pytest.mark.parametrize(("gpus", "num_prefill", "num_decode", "expected"), PLANS)
def test_gpu_plan(gpus, num_prefill, num_decode, expected):
    assert plan_gpus(gpus, num_prefill, num_decode) == expected


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
@pytest.mark.parametrize(("num_prefill", "num_decode"), [(1, 1), (1, 7), (7, 1), (3, 5)])
def test_prefill_and_decode_never_share_a_gpu_when_there_are_two(gpus, num_prefill, num_decode):
    pools = gpu_pools(gpus, num_prefill, num_decode)
    assert pools["prefill"] and pools["decode"]
    assert not set(pools["prefill"]) & set(pools["decode"])
    assert sorted(pools["prefill"] + pools["decode"]) == list(range(gpus))


TP_PLANS = [
    # gpus, prefill, decode, prefill_tp, decode_tp -> CUDA_VISIBLE_DEVICES per worker (one GPU per rank)
    (0, 1, 1, 2, 2, {"prefill-0": None, "decode-0": None}),
    (2, 1, 1, 2, 1, {"prefill-0": "0,1", "decode-0": "0"}),  # too few to keep the pools apart: they share
    (3, 1, 1, 2, 1, {"prefill-0": "0,1", "decode-0": "2"}),
    (3, 1, 1, 1, 2, {"prefill-0": "0", "decode-0": "1,2"}),
    (4, 1, 1, 2, 2, {"prefill-0": "0,1", "decode-0": "2,3"}),
    (8, 1, 2, 2, 2, {"prefill-0": "0,1", "decode-0": "3,4", "decode-1": "5,6"}),
    (8, 2, 2, 2, 2, {"prefill-0": "0,1", "prefill-1": "2,3", "decode-0": "4,5", "decode-1": "6,7"}),
    (4, 1, 3, 1, 2, {"prefill-0": "0", "decode-0": "1,2", "decode-1": "1,2", "decode-2": "1,2"}),  # slots reused
]


@pytest.mark.parametrize(("gpus", "num_prefill", "num_decode", "prefill_tp", "decode_tp", "expected"), TP_PLANS)
def test_gpu_plan_gives_each_tensor_parallel_rank_its_own_gpu(gpus, num_prefill, num_decode, prefill_tp, decode_tp,
                                                              expected):
    plan = plan_gpus(gpus, num_prefill, num_decode, None, prefill_tp, decode_tp)
    assert plan == expected
    for devices in plan.values():
        assert devices is None or len(set(devices.split(","))) == len(devices.split(","))  # no GPU twice in one


def test_a_pool_with_fewer_gpus_than_its_tensor_parallel_size_is_refused():
    with pytest.raises(ValueError, match="--decode-tp 4 needs 4 GPUs"):
        plan_gpus(2, 1, 1, None, 1, 4)


def test_tensor_parallel_workers_sharing_gpus_start_in_waves():
    ranks = share_ranks(plan_gpus(2, 1, 1, None, 2, 1))  # prefill on GPUs 0 and 1, decode on GPU 0
    assert ranks == {"prefill-0": (0, 2), "decode-0": (1, 2)}


def test_gpu_plan_uses_the_parents_visible_gpus():
    assert plan_gpus(2, 1, 1, gpu_ids=["4", "6"]) == {"prefill-0": "4", "decode-0": "6"}
    with pytest.raises(ValueError):
        plan_gpus(2, 1, 1, gpu_ids=["4"])


def test_one_shared_gpu_starts_in_waves_with_rising_memory_caps():
    ranks = share_ranks(plan_gpus(1, 1, 2))
    assert ranks == {"prefill-0": (0, 3), "decode-0": (1, 3), "decode-1": (2, 3)}
    assert launch_waves(ranks, staggered=True) == [["prefill-0"], ["decode-0"], ["decode-1"]]
    assert launch_waves(ranks, staggered=False) == [["prefill-0", "decode-0", "decode-1"]]
    assert [memory_cap(rank, n, 0.9) for rank, n in ranks.values()] == pytest.approx([0.3, 0.6, 0.9])


def test_own_gpus_start_together():
    ranks = share_ranks(plan_gpus(2, 2, 2))
    assert launch_waves(ranks, staggered=True) == [["prefill-0", "decode-0"], ["prefill-1", "decode-1"]]
    cpu = share_ranks(plan_gpus(0, 2, 2))
    assert set(cpu.values()) == {(0, 1)}
    assert launch_waves(cpu, staggered=True) == [["prefill-0", "prefill-1", "decode-0", "decode-1"]]
    assert launch_waves({}, staggered=True) == []


# ---------------------------------------------------------------------------------------------------- children


def test_child_env_strips_flag_variables_and_keeps_nvls_off():
    parent = {"PATH": "/bin", "TANDEM_PORT": "9001", "REDIS_URL": "redis://x", "NCCL_NVLS_ENABLE": "1",
              "CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/h"}
    env = child_env(parent, "1", strip={"TANDEM_PORT", "REDIS_URL"})
    assert "TANDEM_PORT" not in env and "REDIS_URL" not in env
    assert (env["PATH"], env["HF_HOME"], env["NCCL_NVLS_ENABLE"], env["CUDA_VISIBLE_DEVICES"]) == ("/bin", "/h", "0",
                                                                                                   "1")
    assert child_env(parent, None, strip=())["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert child_env(parent, "", strip=())["CUDA_VISIBLE_DEVICES"] == ""


def test_output_watcher_finds_ready_and_logs_everything(tmp_path):
    log_path, echo = tmp_path / "decode-0.log", io.StringIO()
    stdout = io.StringIO('loading\nTANDEM_READY {"role": "decode", "address": "127.0.0.1:1"}\nTANDEM_READY {}\n')
    stderr = io.StringIO("warming up\n" + "".join(f"line {i}\n" for i in range(50)))
    watcher = OutputWatcher("decode-0", log_path, echo=echo, tail_lines=3).start(stdout, stderr)
    assert watcher.settled.wait(5)
    watcher.join(5)
    assert watcher.ready == {"role": "decode", "address": "127.0.0.1:1"} and watcher.error is None
    assert watcher.tail() == "line 47\nline 48\nline 49"
    text = log_path.read_text()
    assert "loading" in text and "warming up" in text and "line 49" in text
    assert echo.getvalue().startswith("[decode-0] warming up\n")


def test_output_watcher_settles_without_ready_when_stdout_ends(tmp_path):
    watcher = OutputWatcher("p", tmp_path / "p.log").start(io.StringIO("bye\n"), io.StringIO("Traceback\n"))
    assert watcher.settled.wait(5)
    watcher.join(5)
    assert watcher.ready is None and watcher.error is None and watcher.tail() == "Traceback"


def test_output_watcher_reports_a_malformed_ready_line(tmp_path):
    watcher = OutputWatcher("p", tmp_path / "p.log").start(io.StringIO("TANDEM_READY {\n"), io.StringIO(""))
    assert watcher.settled.wait(5)
    assert watcher.ready is None and "bad READY line" in watcher.error


# ---------------------------------------------------------------------------------------------------- stop()


def test_stop_without_children_is_idempotent(tmp_path):
    cluster = LocalCluster("smollm2", 1, 1, 0, "127.0.0.1", [], "redis://127.0.0.1:1/0", tmp_path)
    cluster.stop()
    cluster.stop()
    assert cluster.workers == {} and cluster.router is None
    with pytest.raises(RuntimeError):
        _ = cluster.router_url
    with pytest.raises(KeyError):
        cluster.terminate("decode-0", timeout=1)


def test_a_child_that_exits_before_ready_fails_start_with_its_stderr(tmp_path):
    """A real `tandem router` given a bad flag exits at once (usage error): start() must raise, not hang."""
    cluster = LocalCluster("smollm2", 0, 0, 0, "127.0.0.1", [], "redis://127.0.0.1:1/0", tmp_path,
                           router_args=["--max-retries", "many"], ready_timeout_s=60)
    with pytest.raises(ClusterError) as exc:
        cluster.start()
    message = str(exc.value)
    assert "router exited with code 2 before READY" in message and "--max-retries" in message
    assert str(tmp_path / "router.log") in message
    assert cluster.router is not None and not cluster.router.alive
    assert "--max-retries" in (tmp_path / "router.log").read_text()
    assert not [t for t in threading.enumerate() if t.name.startswith("router-") and t.is_alive()]
    cluster.stop()


class _FakeCluster:
    """What LocalScaler uses of LocalCluster: its workers, add_worker and terminate."""

    def __init__(self, decode: int) -> None:
        self.workers: dict[str, SimpleNamespace] = {}
        self.terminated: list[str] = []
        for _ in range(decode):
            self.add_worker("decode")

    def add_worker(self, role: str) -> SimpleNamespace:
        proc = SimpleNamespace(role=role, worker_id=f"{role}-{len(self.workers)}", alive=True)
        self.workers[proc.worker_id] = proc
        return proc

    def terminate(self, worker_id: str) -> int:
        self.workers[worker_id].alive = False
        self.terminated.append(worker_id)
        return 0


def test_local_scaler_starts_workers_up_and_drains_the_newest_down():
    from services.cluster import LocalScaler

    cluster = _FakeCluster(decode=1)
    scaler = LocalScaler(cluster)
    scaler.scale("decode", 3, "load")
    assert scaler.replicas("decode") == scaler.available("decode") == 3 and scaler.replicas("prefill") == 0
    scaler.scale("decode", 1, "cool-down")
    assert cluster.terminated == ["decode-2", "decode-1"] and scaler.replicas("decode") == 1  # newest first
    scaler.scale("prefill", 1, "prompts")
    assert scaler.replicas("prefill") == 1 and scaler.replicas("decode") == 1


class _SlowStartCluster(_FakeCluster):
    """A fake cluster whose add_worker blocks until the other pool's add_worker has begun too (at most 5 s): if
    LocalScaler started the pools one after the other, each start would wait out the 5 s alone."""

    def __init__(self, fail_role: str | None = None) -> None:
        super().__init__(decode=1)
        self.began = {role: threading.Event() for role in ("prefill", "decode")}
        self.overlapped: dict[str, bool] = {}
        self.fail_role = fail_role

    def add_worker(self, role: str) -> SimpleNamespace:
        if not getattr(self, "began", None):  # __init__'s own workers
            return super().add_worker(role)
        self.began[role].set()
        other = "decode" if role == "prefill" else "prefill"
        self.overlapped[role] = self.began[other].wait(5.0)
        if role == self.fail_role:
            raise RuntimeError(f"{role} did not start")
        return super().add_worker(role)


def test_local_scaler_starts_both_pools_new_workers_concurrently_and_waits_for_all():
    from services.cluster import LocalScaler

    cluster = _SlowStartCluster()
    scaler = LocalScaler(cluster)
    started = time.monotonic()
    scaler.scale_pools([("prefill", 1, "prompts"), ("decode", 2, "streams")])
    assert time.monotonic() - started < 4.0
    assert cluster.overlapped == {"prefill": True, "decode": True}
    assert scaler.replicas("prefill") == 1 and scaler.replicas("decode") == 2  # both done when it returns


def test_local_scaler_finishes_the_other_pools_before_raising_one_pools_error():
    from services.cluster import LocalScaler

    cluster = _SlowStartCluster(fail_role="prefill")
    scaler = LocalScaler(cluster)
    with pytest.raises(RuntimeError, match="prefill did not start"):
        scaler.scale_pools([("prefill", 1, "prompts"), ("decode", 2, "streams")])
    assert scaler.replicas("decode") == 2 and scaler.replicas("prefill") == 0
    with pytest.raises(ValueError, match="one target per pool"):
        scaler.scale_pools([("decode", 1, "a"), ("decode", 2, "b")])


def test_serve_autoscale_without_a_profile_is_a_clear_error_before_anything_starts(capsys):
    from services.launch import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--autoscale", "--planner-args", "--slo-ttft-ms 500"])
    assert "--autoscale needs --planner-args with --profile FILE" in str(exited.value)


# ---------------------------------------------------------------------------------------------------- supervision


def test_restart_back_off_doubles_up_to_its_cap():
    from services.cluster import RestartPolicy

    policy = RestartPolicy(base_s=1.0, cap_s=5.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _CrashingCluster:
    """What ClusterSupervisor uses of LocalCluster; `restart` starts the child again (it may crash again)."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.procs = {name: self._proc(name) for name in ("router", "decode-0")}
        self.restarts: list[str] = []
        self.redis_alive = True
        self.redis_restarts = 0

    def _proc(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(worker_id=name, alive=True, started_at=self.clock(), log_path=f"/logs/{name}.log",
                               popen=SimpleNamespace(returncode=None), retired=False)

    def crash(self, name: str, code: int = -9) -> None:
        self.procs[name].alive, self.procs[name].popen.returncode = False, code

    def crashed(self):
        return [p for p in self.procs.values() if not p.alive and not p.retired]

    def restart(self, name: str):
        self.restarts.append(name)
        self.procs[name] = self._proc(name)
        return self.procs[name]

    def restart_redis(self) -> None:
        self.redis_restarts += 1
        self.redis_alive = True


def test_supervisor_restarts_a_crashed_child_after_its_back_off():
    from services.cluster import ClusterSupervisor, RestartPolicy

    clock, lines = _Clock(), []
    cluster = _CrashingCluster(clock)
    supervisor = ClusterSupervisor(cluster, lines.append, RestartPolicy(base_s=2.0, stable_s=60.0), clock)
    clock.now += 120.0  # ran long enough: a fresh count
    cluster.crash("decode-0")
    supervisor.poll()
    assert cluster.restarts == [] and "decode-0 exited with code -9 after 120.0 s; restarting it in 2 s" in lines[0]
    clock.now += 1.0
    supervisor.poll()
    assert cluster.restarts == []
    clock.now += 1.0
    supervisor.poll()
    assert cluster.restarts == ["decode-0"] and lines[-1] == "decode-0 is back"
    supervisor.poll()
    assert cluster.restarts == ["decode-0"]  # each crash restarts once


def test_supervisor_backs_off_on_fast_crashes_and_gives_up():
    from services.cluster import ClusterSupervisor, GaveUp, RestartPolicy

    clock, lines = _Clock(), []
    cluster = _CrashingCluster(clock)
    policy = RestartPolicy(base_s=1.0, cap_s=4.0, stable_s=60.0, max_fast_crashes=4)
    supervisor = ClusterSupervisor(cluster, lines.append, policy, clock)
    waits = []
    for _ in range(3):
        cluster.crash("router", code=1)
        supervisor.poll()
        started = clock.now
        while cluster.restarts.count("router") < len(waits) + 1:
            clock.now += 0.5
            supervisor.poll()
        waits.append(clock.now - started)
    assert waits == [1.0, 2.0, 4.0]
    cluster.crash("router", code=1)
    with pytest.raises(GaveUp, match=r"router exited with code 1 4 times in a row.*giving up \(log: /logs/router"):
        supervisor.poll()


def test_supervisor_leaves_retired_children_alone_and_restarts_redis():
    from services.cluster import ClusterSupervisor

    clock, lines = _Clock(), []
    cluster = _CrashingCluster(clock)
    supervisor = ClusterSupervisor(cluster, lines.append, clock=clock)
    cluster.procs["decode-0"].retired = True
    cluster.crash("decode-0", code=0)
    cluster.redis_alive = False
    supervisor.poll()
    clock.now += 10.0
    supervisor.poll()
    assert cluster.restarts == [] and cluster.redis_restarts == 1
    assert lines[0].startswith("redis exited") and lines[-1] == "redis is back"
