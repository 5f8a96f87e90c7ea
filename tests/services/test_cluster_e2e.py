"""The disaggregated cluster end to end on CPU: real Redis, real worker and router processes, real gRPC.

Greedy output through router -> prefill -> (grpc KV transfer) -> decode equals the single-process engine;
workers come and go, die mid-request, or ship corrupted KV, and clients still get complete, exact answers;
afterwards every live worker's free-block count is back where it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from common.engine import LLM, SamplingParams
from proto import worker_pb2, worker_pb2_grpc
from services.cluster import LocalCluster
from services.worker_runtime import EXIT_ENGINE_DIED

pytestmark = pytest.mark.timeout(300)

WORKER_ARGS = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", str(64 * 2**20),
               "--max-num-batched-tokens", "512", "--heartbeat-s", "0.5", "--ttl-s", "3"]
ROUTER_ARGS = ["--heartbeat-s", "0.5", "--ttl-s", "3", "--local-prefill-max-tokens", "4"]
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 7 times 8?",
             "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "Say hello in Spanish."]
MAX_TOKENS = 24


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Greedy tokens of the single-process engine, the ground truth for every cluster answer."""
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [chat_prompt(q) for q in QUESTIONS] + [long_prompt()]
    outputs = llm.generate(prompts, params.replace(max_tokens=64))
    return {prompt: out.outputs[0].token_ids for prompt, out in zip(prompts, outputs, strict=True)}


def long_prompt() -> str:
    return chat_prompt("Summarize this: " + "The river flows past the old mill and under the stone bridge. " * 40)


def start_cluster(tmp_path, num_prefill: int, num_decode: int, **kwargs) -> LocalCluster:
    cluster = LocalCluster("smollm2", num_prefill, num_decode, router_port=0, worker_args=WORKER_ARGS,
                           router_args=ROUTER_ARGS, run_dir=tmp_path, **kwargs)
    cluster.start()
    wait_ready(cluster.router_url, num_prefill, num_decode)
    return cluster


def wait_ready(url: str, num_prefill: int, num_decode: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/ready", timeout=5)
        body = response.json()
        if response.status_code == 200 and body["decode_workers"] >= num_decode and \
                body["prefill_workers"] >= num_prefill:
            return
        time.sleep(0.2)
    raise AssertionError(f"router never saw {num_prefill} prefill + {num_decode} decode workers")


def generate(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    response = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(url: str, prompt: str, max_tokens: int, **fields) -> Iterator[dict]:
    """The events of a streamed greedy /generate; ``fields`` add to or override the body's."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            **fields}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                yield json.loads(payload)


def status(address: str) -> worker_pb2.WorkerStatus:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=5)


def assert_no_leak(cluster: LocalCluster, timeout: float = 15.0) -> None:
    """Every live worker's free blocks return to its total, with no reservation left behind."""
    deadline = time.monotonic() + timeout
    for worker in [w for w in cluster.workers.values() if w.alive]:
        while True:
            state = status(worker.address)
            if state.free_blocks == state.total_blocks and state.reservations == 0 and state.running == 0:
                break
            assert time.monotonic() < deadline, f"{worker.worker_id} leaked: {state}"
            time.sleep(0.1)


@pytest.mark.parametrize(("num_prefill", "num_decode"), [(1, 2), (2, 1)], ids=["1p2d", "2p1d"])
def test_greedy_output_equals_single_process_engine(tmp_path, reference, num_prefill, num_decode):
    with start_cluster(tmp_path, num_prefill, num_decode) as cluster:
        prompts = [chat_prompt(q) for q in QUESTIONS]
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: generate(cluster.router_url, p), prompts))
        for prompt, result in zip(prompts, results, strict=True):
            assert result["token_ids"] == reference[prompt][:MAX_TOKENS], prompt
            assert result["finish_reason"] == "length"
        assert "Paris" in results[0]["text"]
        assert_no_leak(cluster)


def test_workers_join_and_leave_while_requests_run(tmp_path, reference):
    with start_cluster(tmp_path, 1, 1) as cluster:
        prompts = [chat_prompt(q) for q in QUESTIONS]
        first_decode = next(w for w in cluster.workers.values() if w.role == "decode")
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(generate, cluster.router_url, p, 48) for p in prompts]
            new_decode = cluster.add_worker("decode")
            cluster.add_worker("prefill")
            assert cluster.terminate(first_decode.worker_id) == 0  # SIGTERM: drain, then exit 0
            results = [f.result() for f in futures]
        for prompt, result in zip(prompts, results, strict=True):
            assert result["token_ids"] == reference[prompt][:48], prompt
        # after the old decode left, new work lands on the worker that joined
        served = [e["worker_id"] for e in stream(cluster.router_url, prompts[0], 4)]
        assert set(served) == {new_decode.worker_id}
        assert_no_leak(cluster)


def test_prefill_killed_mid_request_is_retried_elsewhere(tmp_path, reference):
    with start_cluster(tmp_path, 2, 1) as cluster:
        prompt = long_prompt()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(generate(cluster.router_url, prompt, 32)))
        worker.start()
        victim = wait_for_busy(cluster, "prefill")
        cluster.kill(victim)
        worker.join(120)
        assert result["token_ids"] == reference[prompt][:32]
        assert_no_leak(cluster)


def wait_for_busy(cluster: LocalCluster, role: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in cluster.workers.values():
            if worker.role == role and worker.alive:
                state = status(worker.address)
                if state.running or state.waiting:
                    return worker.worker_id
        time.sleep(0.005)
    raise AssertionError(f"no {role} worker picked up the request")


def test_decode_killed_mid_stream_migrates_without_losing_a_token(tmp_path, reference):
    with start_cluster(tmp_path, 1, 2) as cluster:
        prompt = chat_prompt(QUESTIONS[3])
        tokens, workers = [], []
        for event in stream(cluster.router_url, prompt, 64):
            assert "error" not in event, event
            tokens.extend(event["token_ids"])
            workers.append(event["worker_id"])
            if len(tokens) >= 10 and len(set(workers)) == 1:
                cluster.kill(workers[0])
        assert tokens == reference[prompt][:64]
        assert len(set(workers)) == 2  # the stream moved to the other decode worker
        # with no decode worker left, a clear error instead of a hang
        survivor = next(w for w in cluster.workers.values() if w.role == "decode" and w.alive)
        events = []
        for event in stream(cluster.router_url, prompt, 64):
            events.append(event)
            if len(events) == 3:
                cluster.kill(survivor.worker_id)
        assert "error" in events[-1] and "decode" in events[-1]["error"]["message"]
        assert_no_leak(cluster)


def engine_process_of(worker_pid: int) -> int:
    """The decode worker's engine child (multiprocessing spawn), found in /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == worker_pid and b"spawn_main" in cmdline:
                return int(stat.parent.name)
    raise AssertionError(f"worker {worker_pid} has no engine process")


def test_a_killed_engine_process_takes_its_decode_worker_out_and_streams_migrate(tmp_path, reference):
    with start_cluster(tmp_path, 1, 2) as cluster:
        prompt = chat_prompt(QUESTIONS[3])
        tokens, workers, victim = [], [], None
        for event in stream(cluster.router_url, prompt, 64):
            assert "error" not in event, event
            tokens.extend(event["token_ids"])
            workers.append(event["worker_id"])
            if victim is None and len(tokens) >= 10:
                victim = cluster.workers[workers[-1]]
                os.kill(engine_process_of(victim.popen.pid), signal.SIGKILL)
        assert tokens == reference[prompt][:64]
        assert len(set(workers)) == 2  # the stream moved to the other decode worker
        assert victim.popen.wait(timeout=30) == EXIT_ENGINE_DIED  # it left instead of failing every request
        assert generate(cluster.router_url, prompt)["token_ids"] == reference[prompt][:MAX_TOKENS]
        assert_no_leak(cluster)


def test_corrupted_kv_transfer_is_detected_and_reprefilled(tmp_path, reference):
    environ = {"TANDEM_FAULT_CORRUPT_KV_TRANSFERS": "2"}
    with start_cluster(tmp_path, 1, 1, environ={**__import__("os").environ, **environ}) as cluster:
        prompt = chat_prompt(QUESTIONS[0])
        result = generate(cluster.router_url, prompt)
        assert result["token_ids"] == reference[prompt][:MAX_TOKENS]
        router_log = (tmp_path / "router.log").read_text() if (tmp_path / "router.log").exists() else ""
        logs = " ".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert "checksum" in logs or "checksum" in router_log
        assert_no_leak(cluster)


def test_sigterm_on_a_busy_worker_finishes_its_requests(tmp_path, reference):
    with start_cluster(tmp_path, 1, 1) as cluster:
        prompt = chat_prompt(QUESTIONS[1])
        decode = next(w for w in cluster.workers.values() if w.role == "decode")
        events = []
        for event in stream(cluster.router_url, prompt, 40):
            events.append(event)
            if len(events) == 2:
                decode.popen.send_signal(signal.SIGTERM)
        tokens = [t for e in events for t in e["token_ids"]]
        assert tokens == reference[prompt][:40]
        assert decode.popen.wait(30) == 0


def test_autoscale_starts_the_workers_its_limits_require_then_stops_with_the_cluster(tmp_path):
    """`tandem serve --autoscale`'s loop on a real cluster: the planner reads the load from the router's targets
    and, with at least 2 decode workers required, starts the second one through LocalScaler."""
    from common.config import PlannerConfig
    from services.launch import _start_autoscaler
    from services.planner.profile import DecodeProfile, PrefillProfile, Profile, save_profile

    profile = tmp_path / "profile.json"
    save_profile(Profile(prefill=PrefillProfile(tokens_per_s=10_000),
                         decode=DecodeProfile(tpot_ms_by_batch=((1, 10.0), (64, 30.0)), max_batch=128)), profile)
    with start_cluster(tmp_path / "run", 0, 1) as cluster:
        config = PlannerConfig(router_url=cluster.router_url, profile=str(profile), interval_s=0.5,
                               min_prefill=0, max_prefill=0, min_decode=2, max_decode=2)
        stop = threading.Event()
        thread = _start_autoscaler(cluster, config, stop)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum(w.role == "decode" and w.alive for w in cluster.workers.values()) < 2:
            time.sleep(0.5)
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the autoscaler stops when asked"
        assert sum(w.role == "decode" and w.alive for w in cluster.workers.values()) == 2
        wait_for_ready_counts(cluster.router_url, decode=2)


def wait_for_ready_counts(url: str, decode: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=5).json().get("decode_workers") == decode:
                return
        time.sleep(0.3)
    raise AssertionError(f"the router never counted {decode} decode workers")


def test_a_prompt_cached_on_the_decode_worker_is_prefilled_there_with_the_same_output(tmp_path):
    """Decode workers publish their prefix index (`<ns>:prefix:<id>` in Redis); the router finds the first answer's
    prompt there and places the repeat on the decode worker (its cache leaves < 16 tokens): the same greedy tokens
    as the remote prefill gave."""
    import redis
    from prometheus_client.parser import text_string_to_metric_families

    args = [*ROUTER_ARGS, "--local-prefill-max-tokens", "16"]
    with LocalCluster("smollm2", 1, 1, router_port=0, worker_args=WORKER_ARGS, router_args=args,
                      run_dir=tmp_path) as cluster:
        wait_ready(cluster.router_url, 1, 1)
        prompt = long_prompt()
        remote = generate(cluster.router_url, prompt)["token_ids"]
        decode = next(w for w in cluster.workers.values() if w.role == "decode")
        key = f"{cluster.namespace}:prefix:{decode.worker_id}"
        with redis.Redis.from_url(cluster.redis_url) as client:
            deadline = time.monotonic() + 10
            while client.scard(key) == 0:
                assert time.monotonic() < deadline, f"{key} never appeared in Redis"
                time.sleep(0.1)
        assert generate(cluster.router_url, prompt)["token_ids"] == remote
        text = httpx.get(f"{cluster.router_url}/metrics", timeout=5).text
        placed = {(s.labels["placement"], s.labels["reason"]): s.value
                  for family in text_string_to_metric_families(text)
                  if family.name == "tandem_router_prefill_placements" for s in family.samples
                  if s.name.endswith("_total")}
        assert (placed[("remote", "prefill_pool")], placed[("local", "decode_cache_hit")]) == (1, 1)
        assert_no_leak(cluster)


def kv_bytes_received(worker) -> float:
    """A decode worker's verified KV bytes so far (all transports), from its /metrics."""
    text = httpx.get(f"{worker.metrics_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tandem_kv_transfer_bytes_total"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)], ids=["tp2-into-tp1", "tp1-into-tp2"])
def test_tensor_parallel_pools_hand_kv_over_in_either_direction(tmp_path, reference, prefill_tp, decode_tp):
    """A prefill worker at one TP ships the whole-model KV (gathered from its ranks) to a decode worker at another
    (which scatters it to its ranks): the router's answers are the single engine's greedy tokens."""
    with start_cluster(tmp_path, 1, 1, prefill_tp=prefill_tp, decode_tp=decode_tp) as cluster:
        decode = next(w for w in cluster.workers.values() if w.role == "decode")
        prompts = [chat_prompt(q) for q in QUESTIONS[:2]] + [long_prompt()]
        for prompt in prompts:
            assert generate(cluster.router_url, prompt)["token_ids"] == reference[prompt][:MAX_TOKENS], prompt
        assert kv_bytes_received(decode) > 0  # the answers came through the KV handoff, not local prefill
        assert_no_leak(cluster)


def tensor_parallel_rank_of(worker_pid: int) -> int:
    """Rank 1 of a TP decode worker: the process its engine child spawned (``tensor_parallel_worker``)."""
    engine = engine_process_of(worker_pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == engine and b"tensor_parallel_worker" in cmdline:
                return int(stat.parent.name)
    raise AssertionError(f"worker {worker_pid}'s engine has no tensor-parallel rank")


@pytest.mark.timeout(900)
def test_a_killed_rank_takes_its_tp_decode_worker_out_and_the_stream_migrates(tmp_path, reference):
    with start_cluster(tmp_path, 1, 2, decode_tp=2) as cluster:
        prompt = chat_prompt(QUESTIONS[3])
        tokens, workers, victim = [], [], None
        for event in stream(cluster.router_url, prompt, 64):
            assert "error" not in event, event
            tokens.extend(event["token_ids"])
            workers.append(event["worker_id"])
            if victim is None and len(tokens) >= 10:
                victim = cluster.workers[workers[-1]]
                os.kill(tensor_parallel_rank_of(victim.popen.pid), signal.SIGKILL)
        assert tokens == reference[prompt][:64]  # no token lost or repeated
        assert len(set(workers)) == 2  # the stream moved to the other decode worker
        assert victim.popen.wait(timeout=60) == EXIT_ENGINE_DIED  # it left the registry and exited
        assert generate(cluster.router_url, prompt)["token_ids"] == reference[prompt][:MAX_TOKENS]
        assert_no_leak(cluster)
