"""The engine against HF transformers, and its outputs invariant to caching, chunking, preemption, arrival."""

from __future__ import annotations

import pytest
import torch

from common.engine import LLM, SamplingParams
from tests.hf_reference import hf_greedy, load_hf_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors:",
    "Question: What is 12 times 7?\nAnswer:",
    "Translate to French: Good morning, my friend.",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "日本の首都は",
    "In machine learning, a transformer is",
]
NUM_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> LLM:
    return LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=256 * 2**20)


@pytest.fixture(scope="module")
def hf_smol(smol):
    return load_hf_model(smol.engine.model_path)


@pytest.fixture(scope="module")
def smol_reference(smol, hf_smol):
    tokenizer = smol.get_tokenizer()
    results = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        results[prompt] = (ids, *hf_greedy(hf_smol, ids, NUM_TOKENS))
    return results


def test_greedy_output_equals_hf_token_for_token_with_top_logprobs(smol, smol_reference):
    outputs = smol.generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        prompt_ids, hf_tokens, hf_logprobs = smol_reference[prompt]
        assert output.prompt_token_ids == prompt_ids
        completion = output.outputs[0]
        assert completion.token_ids == hf_tokens, prompt
        for position, entry in enumerate(completion.logprobs):
            hf_row = hf_logprobs[position]
            hf_top = torch.topk(hf_row, 5)
            assert set(entry) >= set(hf_top.indices.tolist())
            for token_id, logprob in entry.items():
                assert abs(logprob.logprob - float(hf_row[token_id])) < 1e-3
        assert completion.finish_reason == "length"


def test_chat_answers_paris(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smol.chat(messages)[0].outputs[0].text
    assert "Paris" in text


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(enable_prefix_caching=False),
        dict(max_num_batched_tokens=24),  # chunked prefill: prompts split across steps
        dict(enable_chunked_prefill=False, max_num_batched_tokens=8192),
        dict(num_gpu_blocks_override=12, max_model_len=160),  # so few blocks that preemption happens
    ],
    ids=["no-prefix-cache", "chunked", "no-chunking", "preemption"],
)
def test_same_outputs_under_caching_chunking_and_preemption(engine_args):
    llm = LLM("smollm2", dtype="float32", device="cpu", **engine_args)
    shared = "You are a careful assistant. Answer briefly and truthfully. "
    prompts = [shared + p for p in PROMPTS[:6]]
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY.replace(logprobs=None))]
    if "num_gpu_blocks_override" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    baseline = _baseline_outputs(prompts)
    assert outputs == baseline


LLM_OUTPUTS: dict = {}


def _baseline_outputs(prompts: list[str]) -> list[list[int]]:
    """Reference run with default settings, computed once per module."""
    if "baseline" not in LLM_OUTPUTS:
        llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=256 * 2**20)
        LLM_OUTPUTS["baseline"] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY.replace(logprobs=None))]
    return LLM_OUTPUTS["baseline"]


def test_one_by_one_arrival_equals_all_at_once(smol):
    params = GREEDY.replace(logprobs=None, max_tokens=12)
    together = [o.outputs[0].token_ids for o in smol.generate(PROMPTS, params)]
    engine = smol.engine
    finished: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    while pending or engine.has_unfinished_requests():
        if pending:  # a new request arrives every step while others are mid-decode
            index, prompt = pending.pop(0)
            engine.add_request(prompt=prompt, sampling_params=params, request_id=f"arrive-{index}")
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert [finished[f"arrive-{i}"] for i in range(len(PROMPTS))] == together


def test_prefix_cache_hits_are_reported(smol):
    prompt = "A long shared system prompt that fills several blocks of sixteen tokens each, " * 4
    smol.generate([prompt + "one", prompt + "two"], SamplingParams(max_tokens=1))
    again = smol.generate(prompt + "three", SamplingParams(max_tokens=1))[0]
    first_ids = smol.get_tokenizer().encode(prompt + "one")
    common = next(i for i, (a, b) in enumerate(zip(first_ids, again.prompt_token_ids)) if a != b)
    assert common >= 48
    assert again.num_cached_tokens == common // 16 * 16


def test_seeded_sampling_is_reproducible_alone_and_batched(smol):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    alone = smol.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    batch = smol.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [unseeded, seeded, unseeded])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = smol.generate(PROMPTS[0], seeded.replace(seed=99))[0].outputs[0].token_ids
    assert other_seed != alone


def test_a_seeded_request_resumed_elsewhere_continues_the_same_sample(smol):
    """A prefill worker samples token 0 and a decode worker the rest; a migration hands k tokens over. Resuming with
    the tokens so far as outputs (the engine skips their draws) gives the tokens the uninterrupted request gives."""
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    whole = smol.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    prompt = smol.get_tokenizer().encode(PROMPTS[0])
    engine = smol.engine
    for handed_over in (1, 5):
        request_id = engine.add_request(prompt_token_ids=prompt, sampling_params=seeded,
                                        output_token_ids=whole[:handed_over])
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id == request_id and output.finished:
                    resumed = output.outputs[0].token_ids
        assert resumed == whole


def test_stop_strings_cut_the_text_and_are_kept_on_request(smol):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, stop=["Paris"])
    text = smol.chat([{"role": "user", "content": "What is the capital of France?"}], params)[0].outputs[0]
    assert text.finish_reason == "stop" and text.stop_reason == "Paris" and "Paris" not in text.text
    kept = smol.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        params.replace(include_stop_str_in_output=True),
    )[0].outputs[0]
    assert kept.text.endswith("Paris") and kept.text.startswith(text.text)


def test_n_samples_share_the_prompt_blocks(smol):
    prompt = "Write a short poem about the sea and the wind and the stars above the waves"
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=1, ignore_eos=True)
    pool = smol.engine.kv_cache_manager.pool
    engine = smol.engine
    engine.add_request(prompt=prompt, sampling_params=params.replace(max_tokens=3), request_id="shared-n")
    engine.step()
    shared_used = pool.num_blocks - pool.num_free_blocks
    engine.abort_request("shared-n")
    pool.reset_prefix_cache()
    for i in range(4):
        engine.add_request(
            prompt=prompt,
            sampling_params=params.replace(n=1, seed=i, max_tokens=3),
            request_id=f"separate-{i}",
        )
    engine.step()
    separate_used = pool.num_blocks - pool.num_free_blocks
    for i in range(4):
        engine.abort_request(f"separate-{i}")
    assert shared_used < separate_used
    outputs = smol.generate(prompt, params.replace(max_tokens=8))[0].outputs
    assert [o.index for o in outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in outputs}) > 1
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize(
    ("bad_call", "field"),
    [
        (lambda llm: llm.generate(" hello" * 10000, SamplingParams(max_tokens=4)), "max_model_len"),
        (lambda llm: llm.generate([[1] * 9000], SamplingParams(max_tokens=4)), "max_model_len"),
        (lambda llm: llm.generate("hi", SamplingParams(max_tokens=0)), "max_tokens"),
        (lambda llm: llm.generate("hi", SamplingParams(top_p=1.5)), "top_p"),
        (lambda llm: llm.generate("", SamplingParams(max_tokens=4)), "prompt"),
        (lambda llm: llm.generate([[]], SamplingParams(max_tokens=4)), "prompt"),
        (lambda llm: llm.generate([[10**9]], SamplingParams(max_tokens=4)), "prompt_token_ids"),
    ],
    ids=["too-long", "too-long-ids", "max-tokens", "top-p", "empty", "empty-ids", "bad-token"],
)
def test_bad_input_names_the_field_and_disturbs_nothing(smol, bad_call, field):
    engine = smol.engine
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = smol.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    engine.add_request(prompt=PROMPTS[0], sampling_params=params, request_id="bystander")
    engine.step()
    with pytest.raises(ValueError, match=field):
        bad_call(smol)
    result = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "bystander" and output.finished:
                result = output.outputs[0].token_ids
    assert result == expected
    pool = engine.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model"):
        LLM(str(tmp_path / "no-such-model"), device="cpu")
