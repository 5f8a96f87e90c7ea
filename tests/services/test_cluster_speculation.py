"""N-gram speculative decoding through the real serving path: router -> prefill worker -> gRPC KV transfer ->
the decode worker's engine process -> streamed back, every process on 127.0.0.1 (CPU, float32).

One 1 prefill + 2 decode cluster, every worker started with ``--speculative-config`` (a prefill worker samples
one token, so only decode workers draft): streamed greedy text equals the plain single-process engine's while the
decode workers accept drafts; seeded sampling answers; a client that hangs up mid-stream leaves no KV block held;
a stream whose decode worker dies moves to the other one, which keeps speculating, and no token is lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.engine import LLM, SamplingParams
from common.engine.outputs import CompletionOutput
from services.cluster import LocalCluster, WorkerProcess
from tests.services.test_cluster_e2e import ROUTER_ARGS, WORKER_ARGS, assert_no_leak, stream, wait_ready

pytestmark = pytest.mark.timeout(480)  # the first test also pays for the module cluster and the reference engine

# adaptive off: the step-cost gate weighs drafts by measured (CPU, loaded machine) step times, which would make
# "drafts are accepted" depend on timing
NGRAM = (
    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1, '
    '"adaptive": false}'
)
SPECULATIVE_ARGS = ["--speculative-config", NGRAM]
# Greedy continues the count: the n-gram proposer finds ", <n>" patterns in the context, so drafts are accepted.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
MAX_TOKENS = 64
MIGRATED_TOKENS = 32  # its decode worker dies after 10 or more; the rest comes from the other one


@pytest.fixture(scope="module")
def reference() -> CompletionOutput:
    """Greedy output of the plain single-process engine (no speculation), the same dtype and device as the workers."""
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return llm.generate([COUNTING], params)[0].outputs[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(
        "smollm2",
        1,
        2,
        router_port=0,
        worker_args=[*WORKER_ARGS, *SPECULATIVE_ARGS],
        router_args=ROUTER_ARGS,
        run_dir=tmp_path_factory.mktemp("speculation"),
    ) as started:
        wait_ready(started.router_url, 1, 2)
        yield started


def decode_workers(cluster: LocalCluster) -> list[WorkerProcess]:
    return [w for w in cluster.workers.values() if w.role == "decode" and w.alive]


def counter(worker: WorkerProcess, name: str, **labels: str) -> float:
    """The sum of `name`'s samples on the worker's /metrics whose labels include `labels`."""
    text = httpx.get(f"{worker.metrics_url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def accepted(worker: WorkerProcess) -> float:
    return counter(worker, "tandem_spec_decode_num_accepted_tokens_total")


def completion_body(max_tokens: int, **sampling) -> dict:
    return {
        "model": "smollm2",
        "prompt": COUNTING,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        **sampling,
    }


def stream_completion(url: str, body: dict) -> Iterator[dict]:
    """The chunks of a streamed POST /v1/completions, until [DONE]."""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                return
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


def streamed_text(chunks: list[dict]) -> str:
    return "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])


def test_streamed_greedy_text_equals_the_plain_engine_while_drafts_are_accepted(cluster, reference):
    chunks = list(stream_completion(cluster.router_url, completion_body(MAX_TOKENS, temperature=0.0)))
    assert streamed_text(chunks) == reference.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(accepted(worker) for worker in decode_workers(cluster)) > 0
    assert_no_leak(cluster)


def test_seeded_sampling_answers_and_repeats_itself(cluster):
    body = completion_body(16, temperature=0.8, seed=7, stream=False)
    answers = [httpx.post(f"{cluster.router_url}/v1/completions", json=body, timeout=120) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
    first, second = (answer.json() for answer in answers)
    assert first["usage"]["completion_tokens"] == 16 and first["choices"][0]["text"]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_a_client_hanging_up_mid_stream_aborts_its_request_and_frees_its_blocks(cluster):
    """1000 tokens would take minutes here: blocks back within seconds mean the decode worker dropped the request."""
    aborted_before = counter(cluster.router, "tandem_requests_finished_total", finish_reason="abort")
    chunks = stream_completion(cluster.router_url, completion_body(1000, temperature=0.0))
    assert [next(chunks)["choices"][0]["text"] for _ in range(3)]
    chunks.close()  # leaves the `with httpx.stream`: the connection closes mid-stream
    assert_no_leak(cluster, timeout=20)
    assert counter(cluster.router, "tandem_requests_finished_total", finish_reason="abort") == aborted_before + 1


def test_a_stream_whose_decode_worker_dies_resumes_speculating_on_the_other(cluster, reference):
    """Runs last: it kills one of the module cluster's decode workers."""
    before = {worker.worker_id: accepted(worker) for worker in decode_workers(cluster)}
    tokens, served_by = [], []
    for event in stream(cluster.router_url, COUNTING, MIGRATED_TOKENS):
        assert "error" not in event, event
        tokens.extend(event["token_ids"])
        served_by.append(event["worker_id"])
        if len(tokens) >= 10 and len(set(served_by)) == 1:
            cluster.kill(served_by[0])
    assert tokens == reference.token_ids[:MIGRATED_TOKENS]
    assert len(set(served_by)) == 2, "the stream moved to the other decode worker"
    assert accepted(cluster.workers[served_by[-1]]) > before[served_by[-1]]
    assert_no_leak(cluster)
