"""Async scheduling (the host prepares step N+1 while step N runs) against the synchronous engine, on the real
SmolLM2: identical greedy output under chunked prefill, preemption, stop strings, n > 1, logprobs, min_tokens,
penalties and aborts; and the mechanisms themselves (pending tokens fed on the device, no row scheduled past
max_tokens, reservations that wait for the step that may still write a freed block)."""

from __future__ import annotations

import json

import pytest

from common.engine import LLM, SamplingParams
from common.engine.model_runner import LaunchedStep
from common.engine.sampling_params import StructuredOutputs

SHARED = "You are a careful assistant. Answer briefly and truthfully. "  # a shared prefix: cache hits too
PROMPTS = [
    SHARED + prompt
    for prompt in [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "List three colors:",
        "Question: What is 12 times 7?\nAnswer:",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
        "In machine learning, a transformer is",
        "日本の首都は",
    ]
]
# Small enough to force preemptions, with a step budget that chunks the longer prompts.
SETTINGS = dict(dtype="float32", device="cpu", num_gpu_blocks_override=12, max_num_batched_tokens=24, seed=0)


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# Requests whose steps run ahead: greedy, stop strings, logprobs, seeded sampling, short and EOS-stopped ones.
OVERLAPPED = [
    GREEDY,
    GREEDY.replace(stop=["\n\n", "return"], max_tokens=40),
    GREEDY.replace(logprobs=3),
    GREEDY.replace(temperature=0.8, top_p=0.9, seed=7),
    GREEDY.replace(max_tokens=40, ignore_eos=False),
    GREEDY.replace(max_tokens=1),
    GREEDY.replace(max_tokens=7, ignore_eos=False),
    GREEDY.replace(temperature=0.7, top_k=20, seed=3, logprobs=2),
]
# Requests whose sampling reads the token history (penalties, min_tokens: the newest token comes from the
# device) or that fork n samples (that one step runs synchronously).
HOST_SIDE = [
    GREEDY.replace(n=2, temperature=0.8, seed=7),
    GREEDY.replace(min_tokens=6, ignore_eos=False, max_tokens=16),
    GREEDY.replace(repetition_penalty=1.3),
    GREEDY.replace(frequency_penalty=0.5, presence_penalty=0.2),
]


@pytest.fixture(scope="module")
def engines() -> tuple[LLM, LLM]:
    return LLM("smollm2", **SETTINGS), LLM("smollm2", async_scheduling=False, **SETTINGS)


def _summary(outputs) -> list[list[tuple]]:
    """Everything exact but the logprob values (batch shapes differ between the modes: last-bit noise)."""
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason, _logprob_tokens(c.logprobs)) for c in output.outputs]
        for output in outputs
    ]


def _logprob_tokens(logprobs) -> list | None:
    return None if logprobs is None else [sorted(step) for step in logprobs]


def _assert_logprobs_close(got, want) -> None:
    for got_output, want_output in zip(got, want, strict=True):
        for got_c, want_c in zip(got_output.outputs, want_output.outputs, strict=True):
            for got_step, want_step in zip(got_c.logprobs or (), want_c.logprobs or (), strict=True):
                for token, entry in got_step.items():
                    assert abs(entry.logprob - want_step[token].logprob) < 1e-3


def _count_launches_fed_from_the_device(llm: LLM) -> list[int]:
    """Wrap the runner's launch: records, per launch, how many rows took their token from the previous step."""
    runner, counts = llm.engine.runner, []
    launch = runner.launch

    def counting(step, previous=None):
        counts.append(sum(1 for item in step.scheduled if item.num_computed_tokens >= item.request.num_tokens))
        return launch(step, previous)

    runner.launch = counting
    return counts


def _count_history_rows_with_a_pending_token(llm: LLM) -> list[int]:
    """Wrap the sampler: per call, the rows with penalties or min_tokens whose newest token is on the device."""
    sampler, counts = llm.engine.runner.sampler, []
    sample = sampler.sample

    def counting(logits, rows):
        counts.append(
            sum(1 for r in rows if r.pending_token is not None and (r.params.has_penalties or r.params.min_tokens))
        )
        return sample(logits, rows)

    sampler.sample = counting
    return counts


@pytest.mark.parametrize("params", [OVERLAPPED, HOST_SIDE + OVERLAPPED[:4]], ids=["overlapped", "host-side"])
def test_output_equals_the_synchronous_engine_under_chunking_preemption_and_stops(engines, params):
    async_llm, sync_llm = engines
    fed = _count_launches_fed_from_the_device(async_llm)
    history_rows = _count_history_rows_with_a_pending_token(async_llm)
    preempted = [llm.engine.scheduler.num_preemptions for llm in engines]

    got = async_llm.generate(PROMPTS, params)
    want = sync_llm.generate(PROMPTS, params)

    assert _summary(got) == _summary(want)
    _assert_logprobs_close(got, want)
    assert not async_llm.engine.step_in_flight  # generate() settles the rows it launched past a stop
    assert sum(fed) > 50, f"async scheduling fed only {sum(fed)} tokens from the device"
    if params is not OVERLAPPED:  # penalty and min_tokens rows ran ahead, their newest token taken on the device
        assert sum(history_rows) > 20, f"only {sum(history_rows)} penalty rows ran ahead"
    assert [llm.engine.scheduler.num_preemptions for llm in engines] > preempted
    for llm in engines:
        pool = llm.engine.kv_cache_manager.pool
        assert pool.num_free_blocks == pool.num_blocks and not llm.engine.has_unfinished_requests()
        assert all(r.num_pending_tokens == 0 for r in llm.engine.scheduler.running)


def test_a_request_is_not_scheduled_past_its_max_tokens(engines):
    async_llm, _ = engines
    engine = async_llm.engine
    rows: list[int] = []
    schedule = engine.scheduler.schedule

    def counting():
        step = schedule()
        rows.extend(item.num_new_tokens for item in step.scheduled)
        return step

    engine.scheduler.schedule = counting
    try:
        async_llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finally:
        engine.scheduler.schedule = schedule
    prompt_len = len(async_llm.get_tokenizer().encode(PROMPTS[0]))
    assert rows == [prompt_len, 1, 1, 1, 1]  # the 5th token is sampled by the 4th decode row: no 5th row


def test_abort_while_a_step_is_in_flight_returns_every_block(engines):
    async_llm, _ = engines
    engine = async_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ids = [engine.add_request(prompt, sampling_params=params) for prompt in PROMPTS[:4]]
    while not (engine.step_in_flight and all(engine.groups[i].head.num_output_tokens for i in ids)):
        engine.step()
    engine.abort_request(ids[0])
    engine.abort_request(ids[2])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {ids[1], ids[3]}
    assert all(len(finished[i].outputs[0].token_ids) == 30 for i in (ids[1], ids[3]))
    pool = engine.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_a_reservation_waits_for_the_step_that_may_still_write_its_blocks(engines, monkeypatch):
    async_llm, _ = engines
    engine = async_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    request_id = engine.add_request(PROMPTS[2], sampling_params=params)
    while not engine.step_in_flight:
        engine.step()
    waits: list[LaunchedStep] = []
    monkeypatch.setattr(LaunchedStep, "wait", lambda self: waits.append(self))
    held = set(engine.kv_cache_manager.block_ids(request_id))
    engine.abort_request(request_id)  # its blocks are free while the in-flight step still has its row

    reserved = engine.reserve_blocks("r-1", engine.kv_cache_manager.pool.num_free_blocks * 16 - 1)

    assert held <= set(reserved) and len(waits) == 1
    engine.release_reservation("r-1")
    other = engine.add_request(PROMPTS[0], sampling_params=params)
    while not (engine.step_in_flight and engine.groups[other].head.num_output_tokens):
        engine.step()
    engine.reserve_blocks("r-2", 16)  # nothing was freed since the in-flight step was scheduled: no wait
    assert len(waits) == 1 and engine.step_in_flight
    engine.release_reservation("r-2")
    engine.abort_request(other)
    while engine.has_unfinished_requests():
        engine.step()


def test_structured_requests_stay_asynchronous_and_equal_the_synchronous_engine(engines):
    """A constrained request no longer forces synchronous steps: its decode launches take the newest token from
    the device while the host waits for it only to advance the grammar, and greedy output equals the
    synchronous engine's (JSON schema, regex and choice, beside a plain request)."""
    async_llm, sync_llm = engines
    fed = _count_launches_fed_from_the_device(async_llm)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    constraints = [
        (40, StructuredOutputs(json=json.dumps(schema))),
        (12, StructuredOutputs(regex="[0-9]{3}-[0-9]{4}")),
        (8, StructuredOutputs(choice=("yes", "no"))),
    ]
    params = [GREEDY.replace(max_tokens=n, ignore_eos=False, structured_outputs=spec) for n, spec in constraints]
    params.append(GREEDY.replace(max_tokens=10))
    prompts = ["Reply in JSON: where is the Eiffel tower?", "Give me a phone number.", "Is water wet?", "Hi"]
    got = async_llm.generate(prompts, params)
    want = sync_llm.generate(prompts, params)
    assert _summary(got) == _summary(want)
    assert max(fed) >= 3  # the three constrained requests decoded from device-fed launches
    assert json.loads(got[0].outputs[0].text)["city"]
