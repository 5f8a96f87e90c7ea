"""Streams survive workers that stop without dying, and seeded sampling does not depend on where tokens are made.

Real Redis, router and worker processes on CPU (the real SmolLM2). A decode worker frozen by SIGSTOP keeps its
sockets open, so its stream simply stops; once the registry drops it (no heartbeat for the TTL) the router
migrates the stream. A seeded sampled request gives the single engine's text whether its prompt is prefilled on
a prefill worker, on the decode worker itself, or its stream migrates midway.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from common.engine import LLM, SamplingParams
from services.cluster import LocalCluster
from tests.services.test_cluster_e2e import (
    QUESTIONS,
    ROUTER_ARGS,
    WORKER_ARGS,
    assert_no_leak,
    chat_prompt,
    long_prompt,
    stream,
    wait_ready,
)

pytestmark = pytest.mark.timeout(300)

SEED, MAX_TOKENS = 1234, 40
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "seed": SEED, "ignore_eos": True}


@pytest.fixture(scope="module")
def seeded_reference() -> dict[str, list[int]]:
    """The single engine's seeded tokens per prompt, what every placement in the cluster must reproduce."""
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
    params = SamplingParams(max_tokens=MAX_TOKENS, **SAMPLING)
    prompts = [chat_prompt(QUESTIONS[3]), long_prompt()]
    outputs = llm.generate(prompts, params)
    return {prompt: out.outputs[0].token_ids for prompt, out in zip(prompts, outputs, strict=True)}


def stream_tokens(
    url: str, prompt: str, on_event: Callable[[list[int], list[str]], None] | None = None
) -> tuple[list[int], list[str]]:
    """The streamed tokens of a seeded /generate and the worker that made each event."""
    tokens, workers = [], []
    for event in stream(url, prompt, MAX_TOKENS, **SAMPLING):
        assert "error" not in event, event
        tokens.extend(event["token_ids"])
        workers.append(event["worker_id"])
        if on_event is not None:
            on_event(tokens, workers)
    return tokens, workers


def test_seeded_sampling_is_the_same_prefilled_remotely_locally_or_migrated(tmp_path, seeded_reference):
    with LocalCluster("smollm2", 1, 2, router_port=0, worker_args=WORKER_ARGS, router_args=ROUTER_ARGS,
                      run_dir=tmp_path) as cluster:
        wait_ready(cluster.router_url, 1, 2)
        prompt = chat_prompt(QUESTIONS[3])
        remote, _ = stream_tokens(cluster.router_url, prompt)
        assert remote == seeded_reference[prompt], "prefilled on the prefill worker"

        def kill_after_ten(tokens: list[int], workers: list[str]) -> None:
            if len(tokens) >= 10 and len(set(workers)) == 1 and cluster.workers[workers[0]].alive:
                cluster.kill(workers[0])

        migrated, workers = stream_tokens(cluster.router_url, long_prompt(), kill_after_ten)
        assert len(set(workers)) == 2 and migrated == seeded_reference[long_prompt()], "migrated midway"
        prefill = next(w for w in cluster.workers.values() if w.role == "prefill")
        cluster.kill(prefill.worker_id)
        local, workers = stream_tokens(cluster.router_url, prompt)
        assert local == seeded_reference[prompt], "prefilled on the decode worker"
        assert_no_leak(cluster)


def test_a_frozen_decode_worker_has_its_stream_migrated(tmp_path, seeded_reference):
    """SIGSTOP the decode worker serving a stream: its heartbeats stop, the registry drops it after the TTL (3 s
    here) and the router moves the stream to the other decode worker: the whole seeded answer, nothing repeated.
    Woken up again, the frozen worker finds its stream cancelled and frees every block."""
    with LocalCluster("smollm2", 1, 2, router_port=0, worker_args=WORKER_ARGS, router_args=ROUTER_ARGS,
                      run_dir=tmp_path) as cluster:
        wait_ready(cluster.router_url, 1, 2)
        frozen: list[str] = []

        def freeze_after_ten(tokens: list[int], workers: list[str]) -> None:
            if len(tokens) >= 10 and not frozen:
                frozen.append(workers[-1])
                cluster.kill(workers[-1], signal.SIGSTOP)

        started = time.monotonic()
        tokens, workers = stream_tokens(cluster.router_url, long_prompt(), freeze_after_ten)
        assert tokens == seeded_reference[long_prompt()]
        assert len(set(workers)) == 2 and workers[-1] != frozen[0]
        assert time.monotonic() - started < 120
        cluster.kill(frozen[0], signal.SIGCONT)
        assert_no_leak(cluster, timeout=30)
