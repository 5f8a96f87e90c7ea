"""Speculative decoding with n-gram drafts on the real SmolLM2: output identical to the plain engine, token for token,
through prefix caching, chunked prefill, preemption, stops, logprobs, penalties, n > 1 and aborts; no leaked block;
and the back-off when drafts do not pay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engine import LLM, SamplingParams
from common.engine.request import Request
from common.engine.spec.speculator import Speculator
from common.engine.spec.state import MIN_COOLDOWN_STEPS, MISSES_BEFORE_BACKOFF
from common.speculative_config import SpeculativeConfig
from kernels.attention_metadata import AttentionMetadata
from tests.common.engine.spec.test_draft_model import write_draft

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [
    "Repeat after me five times: the cat sat on the mat. the cat sat on the mat.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n# The same two functions again:\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Summarize: Paris is the capital of France. Paris is known for the Eiffel Tower. Summary: Paris",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
SETTINGS = dict(dtype="float32", device="cpu", kv_cache_memory=128 * 2**20)


def _llm(**settings) -> LLM:
    """An engine whose speculator drafts wherever it may (no step-cost gate: these tests count drafts)."""
    llm = LLM("smollm2", **settings)
    if llm.engine.speculator is not None:
        llm.engine.speculator.adaptive = False
    return llm


def _token_ids(llm: LLM, prompts: list[str], params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM("smollm2", **SETTINGS)


@pytest.fixture(scope="module")
def spec() -> LLM:
    return _llm(speculative_config=NGRAM, **SETTINGS)


def _assert_no_blocks_held(llm: LLM) -> None:
    pool = llm.engine.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not llm.engine.kv_cache_manager.tables


def test_greedy_output_is_the_plain_engines_and_drafts_are_accepted(plain, spec):
    before = spec.engine.stats()
    assert _token_ids(spec, PROMPTS, GREEDY) == _token_ids(plain, PROMPTS, GREEDY)
    stats = spec.engine.stats()
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    drafts = stats.spec_drafts - before.spec_drafts
    assert accepted > 20 and drafts > 0, "the repetitive prompts must get n-gram drafts accepted"
    assert stats.spec_emitted_tokens - before.spec_emitted_tokens == accepted + drafts  # one of the target's each
    assert stats.spec_accepted_per_position[0] >= stats.spec_accepted_per_position[-1]
    _assert_no_blocks_held(spec)


@pytest.mark.parametrize("k", [1, 7])
def test_any_draft_length_gives_the_same_output(plain, k):
    llm = _llm(speculative_config={**NGRAM, "num_speculative_tokens": k}, **SETTINGS)
    assert _token_ids(llm, PROMPTS[:3], GREEDY) == _token_ids(plain, PROMPTS[:3], GREEDY)
    assert llm.engine.stats().spec_accepted_tokens > 0
    _assert_no_blocks_held(llm)


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(max_num_batched_tokens=24),  # chunked prefill, and drafts compete for the step's budget
        dict(num_gpu_blocks_override=14, max_model_len=160),  # so few blocks that preemption happens
        dict(enable_prefix_caching=False, no_async=True),
    ],
    ids=["chunked", "preemption", "sync-no-prefix-cache"],
)
def test_same_output_under_chunking_preemption_and_caching(plain, engine_args):
    engine_args = dict(engine_args)
    if engine_args.pop("no_async", False):
        engine_args["async_scheduling"] = False
    settings = {**SETTINGS, **engine_args}
    if "num_gpu_blocks_override" in settings:
        settings.pop("kv_cache_memory")
    llm = _llm(speculative_config=NGRAM, **settings)
    shared = "You are a careful assistant. Answer briefly. "
    prompts = [shared + p for p in PROMPTS]
    assert _token_ids(llm, prompts, GREEDY) == _token_ids(plain, prompts, GREEDY)
    assert llm.engine.stats().spec_accepted_tokens > 0
    if "num_gpu_blocks_override" in settings:
        assert llm.engine.scheduler.num_preemptions > 0
    _assert_no_blocks_held(llm)


def test_prefix_cache_hit_after_speculating_gives_the_same_output(plain, spec):
    first = _token_ids(spec, PROMPTS[:2], GREEDY)
    hits_before = spec.engine.stats().prefix_cache_hits
    again = _token_ids(spec, PROMPTS[:2], GREEDY)
    assert spec.engine.stats().prefix_cache_hits > hits_before
    assert first == again == _token_ids(plain, PROMPTS[:2], GREEDY)
    # a longer prompt that extends a speculated output reuses blocks written with verified drafts
    tokenizer = spec.get_tokenizer()
    extended = [tokenizer.encode(PROMPTS[0]) + first[0]]
    assert _token_ids(spec, extended, GREEDY) == _token_ids(plain, extended, GREEDY)


def test_stops_logprobs_and_penalties_are_the_plain_engines(plain, spec):
    cases = [
        SamplingParams(temperature=0.0, max_tokens=40, stop=[" mat"]),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.2, min_tokens=10),
        SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=0.5, presence_penalty=0.3),
    ]
    for params in cases:
        expected = plain.generate(PROMPTS, params)
        got = spec.generate(PROMPTS, params)
        for want, have in zip(expected, got, strict=True):
            want, have = want.outputs[0], have.outputs[0]
            assert have.token_ids == want.token_ids, params
            assert (have.text, have.finish_reason, have.stop_reason) == (
                want.text,
                want.finish_reason,
                want.stop_reason,
            )
            if params.logprobs:
                for a, b in zip(have.logprobs, want.logprobs, strict=True):
                    assert set(a) == set(b)
                    assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    _assert_no_blocks_held(spec)


def test_seeded_sampling_and_n_samples_match_the_plain_engine(plain, spec):
    """Sampled rows verify a draft by the target's own draw (rejection sampling for a one-hot draft) and spend one
    uniform per emitted token, so seeded output is exactly the plain engine's."""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=32, ignore_eos=True, n=3)
    for want, have in zip(plain.generate(PROMPTS, params), spec.generate(PROMPTS, params), strict=True):
        assert [o.token_ids for o in have.outputs] == [o.token_ids for o in want.outputs]
    _assert_no_blocks_held(spec)


def test_abort_while_speculating_returns_every_block(spec):
    engine = spec.engine
    ids = [engine.add_request(prompt=p, sampling_params=GREEDY.replace(max_tokens=200)) for p in PROMPTS]
    drafts_before = engine.stats().spec_drafts
    for _ in range(12):
        engine.step()
    assert engine.stats().spec_drafts > drafts_before
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    _assert_no_blocks_held(spec)


def _request(tokens: list[int], **params) -> Request:
    return Request("r", tokens[:4], SamplingParams(**params), frozenset(), 16, output_token_ids=tokens[4:])


def test_a_request_whose_drafts_miss_backs_off_then_tries_again():
    speculator = Speculator(SpeculativeConfig.parse(NGRAM), max_model_len=1000)
    request = _request([1, 2, 3, 1, 2, 3, 1, 2])
    for _ in range(MISSES_BEFORE_BACKOFF):
        assert speculator.drafts_for(request, num_running=1, max_drafts=8) == (3, 1, 2)
        assert request.speculating and request.needs_host_tokens  # a verifying step is synchronous
        speculator.on_verified(request, 0)
    for _ in range(MIN_COOLDOWN_STEPS):
        assert speculator.drafts_for(request, num_running=1, max_drafts=8) == ()
        assert not request.speculating and not request.needs_host_tokens  # back to async steps
    assert speculator.drafts_for(request, num_running=1, max_drafts=8) == (3, 1, 2)


def test_no_match_keeps_steps_async_and_a_pending_newest_token_is_guessed_by_the_lookup():
    speculator = Speculator(SpeculativeConfig.parse(NGRAM), max_model_len=1000)
    unmatched = _request([5, 6, 7, 8, 9, 10, 11, 12])
    assert speculator.drafts_for(unmatched, num_running=1, max_drafts=8) == ()
    assert not unmatched.speculating and not unmatched.needs_host_tokens
    for _ in range(MISSES_BEFORE_BACKOFF - 1):  # lookups that keep failing pause too (they cost host time)
        speculator.drafts_for(unmatched, num_running=1, max_drafts=8)
    assert unmatched.speculation.cooldown == MIN_COOLDOWN_STEPS
    pending = _request([1, 2, 3, 4, 1, 2, 3])  # the newest token (4, say) is still on the device
    pending.num_pending_tokens = 1
    # the lookup of [1, 2, 3] proposes 4 (standing for the unknown newest token), then 1, 2, 3 after it
    assert speculator.drafts_for(pending, num_running=1, max_drafts=8) == (1, 2, 3)
    one = Speculator(SpeculativeConfig.parse({**NGRAM, "num_speculative_tokens": 1}), max_model_len=1000)
    assert one.drafts_for(pending, num_running=1, max_drafts=8) == (1,)  # k=1 still gets its one draft


def test_drafts_respect_max_tokens_max_model_len_budget_and_batch_size():
    config = SpeculativeConfig.parse({**NGRAM, "disable_by_batch_size": 4})
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    assert Speculator(config, 1000).drafts_for(_request(tokens, max_tokens=6), 1, 8) == (3,)  # 4 out, 2 left
    assert Speculator(config, 10).drafts_for(_request(tokens), 1, 8) == (3,)  # 8 tokens, 2 fit
    assert Speculator(config, 1000).drafts_for(_request(tokens), 1, 2) == (3, 1)  # the step's token budget
    assert Speculator(config, 1000).drafts_for(_request(tokens), 5, 8) == ()  # batch above disable_by_batch_size
    constrained = _request(tokens)
    constrained.export_kv = True
    assert Speculator(config, 1000).drafts_for(constrained, 1, 8) == ()


def test_bad_speculative_configs_are_clear_errors():
    for bad, words in [
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}, "bogus"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "prompt_lookup",
        ),
        ("not json", "JSON"),
        ({"method": "eagle", "num_speculative_tokens": 2, "model": "smollm2"}, "not implemented yet"),
    ]:
        with pytest.raises(ValueError, match=words):
            LLM("smollm2", speculative_config=bad, **SETTINGS)


# -- draft model ---------------------------------------------------------------------------------------------

DRAFT_SETTINGS = dict(dtype="float32", device="cpu", kv_cache_memory=64 * 2**20, max_model_len=256)


@pytest.fixture(scope="module")
def tiny_draft_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's vocabulary: a poor but valid draft (few drafts accepted)."""
    return write_draft(tmp_path_factory.mktemp("tiny-draft"))


def _draft_llm(model: str, **settings) -> LLM:
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 3}
    return _llm(speculative_config=spec, **{**DRAFT_SETTINGS, **settings})


def test_the_target_as_its_own_draft_has_every_greedy_draft_accepted(plain):
    llm = _draft_llm("smollm2")
    params = GREEDY.replace(max_tokens=12)
    assert _token_ids(llm, PROMPTS[:3], params) == _token_ids(plain, PROMPTS[:3], params)
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens >= 0.9 * stats.spec_draft_tokens
    _assert_no_blocks_held(llm)
    assert not llm.engine.runner.draft_proposer._written  # finished requests were forgotten


def test_a_small_draft_keeps_greedy_seeded_and_preempted_output_exact(plain, tiny_draft_dir):
    llm = _draft_llm(str(tiny_draft_dir), num_gpu_blocks_override=12, kv_cache_memory=None)
    params = GREEDY.replace(max_tokens=24)
    prompts = [p[:60] for p in PROMPTS]
    assert _token_ids(llm, prompts, params) == _token_ids(plain, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True, n=2, repetition_penalty=1.1)
    for params in (seeded, seeded.replace(repetition_penalty=1.0)):  # penalties: that request does not speculate
        for want, have in zip(plain.generate(prompts[:2], params), llm.generate(prompts[:2], params), strict=True):
            assert [o.token_ids for o in have.outputs] == [o.token_ids for o in want.outputs]
    assert llm.engine.stats().spec_drafts > 0
    _assert_no_blocks_held(llm)
    assert not llm.engine.runner.draft_proposer._written


def test_a_draft_with_another_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="speculative_config.model"):
        _draft_llm(str(write_draft(tmp_path / "other", vocab_size=1000)))


# -- verification steps as CUDA graphs -----------------------------------------------------------------------


class EagerVerificationGraphs:
    """Stands in for the CUDA-graph replay of verification steps on the CPU: the same padded batch (every sequence
    ``tokens_per_seq`` rows, padding sequences up to the bucket) run eagerly, so the runner's padding is checked."""

    def __init__(self, llm: LLM, tokens_per_seq: int, buckets: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        self.model, self.runner = llm.engine.model, llm.engine.runner
        self.tokens_per_seq, self.buckets, self.replays = tokens_per_seq, buckets, 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, size: int) -> int:
        return min(b for b in self.buckets if b >= size)

    def run(self, batch, patch=None):
        q, size = self.tokens_per_seq, len(batch.seq_lens)
        pad = self.bucket_for(size) - size
        ids = torch.tensor(np.concatenate([batch.token_ids, np.zeros(pad * q, dtype=np.int64)]))
        positions = torch.tensor(np.concatenate([batch.positions, np.zeros(pad * q, dtype=np.int64)]))
        slots = torch.tensor(np.concatenate([batch.slots, np.full(pad * q, -1, dtype=np.int64)]))
        tables = [*batch.block_tables, *[(0,)] * pad]
        width = max(len(t) for t in tables) + 2
        block_tables = torch.zeros((len(tables), width), dtype=torch.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = torch.tensor(table)
        seq_lens = [*batch.seq_lens.tolist(), *[q] * pad]
        metadata = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(0, (len(seq_lens) + 1) * q, q, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            query_lens_cpu=(q,) * len(seq_lens),
            seq_lens_cpu=tuple(seq_lens),
            block_size=self.runner.block_size,
        )
        if patch is not None:
            patch(ids)
        self.replays += 1
        return self.model(ids, positions, self.runner.kv_cache, metadata)[: size * q]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_padded_verification_batches_give_the_plain_engines_output(plain, tiny_draft_dir, method):
    """The rows a verification graph runs (last token, drafts, padding rows that write nothing) give exactly the
    eager path's tokens: fewer drafts than the graph's k, plain decodes in the same step, padding sequences, and
    a draft model's tokens written into the graph's input rows on the device."""
    if method == "ngram":
        llm, k = _llm(speculative_config=NGRAM, **SETTINGS), NGRAM["num_speculative_tokens"]
    else:
        llm, k = _draft_llm(str(tiny_draft_dir)), 3
    graphs = EagerVerificationGraphs(llm, tokens_per_seq=k + 1)
    llm.engine.runner.verify_graphs = graphs
    prompts = [*PROMPTS[:3], "A random sentence about weather in spring"]
    params = GREEDY.replace(max_tokens=24)
    assert _token_ids(llm, prompts, params) == _token_ids(plain, prompts, params)
    assert graphs.replays >= 3 and llm.engine.stats().spec_drafts > 0
    _assert_no_blocks_held(llm)


@pytest.mark.gpu
def test_cuda_verification_graphs_equal_the_plain_engine():
    """float32 on CUDA: greedy output with n-gram drafts verified by CUDA-graph replays is the plain engine's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings = dict(dtype="float32", device="cuda", gpu_memory_utilization=0.3, max_model_len=1024)
    plain_gpu = LLM("smollm2", **settings)
    want = _token_ids(plain_gpu, PROMPTS, GREEDY)
    del plain_gpu
    llm = _llm(speculative_config=NGRAM, **settings)
    assert _token_ids(llm, PROMPTS, GREEDY) == want
    assert llm.engine.runner.verify_graphs.replays > 5
    assert llm.engine.stats().spec_accepted_tokens > 20
    _assert_no_blocks_held(llm)


def test_a_step_whose_expected_gain_does_not_cover_its_measured_cost_drops_its_drafts():
    """The step-cost gate: a speculating step costs ratio plain steps; its drafts stay only when the expected
    accepted ones cover num_decodes * (ratio - 1); the plain time is measured by holding back once."""
    speculator = Speculator(SpeculativeConfig.parse(NGRAM), max_model_len=1000)
    good, poor = _request([1, 2, 3, 1, 2, 3, 1, 2]), _request([1, 2, 3, 1, 2, 3, 1, 2])
    for request in (good, poor):
        speculator.drafts_for(request, num_running=4, max_drafts=8)
    assert speculator.worth_verifying([good], 4)  # nothing timed yet: speculate
    speculator.on_step(True, 4, 0.003)
    assert not speculator.worth_verifying([good], 4)  # no plain time yet: hold back to measure one
    speculator.on_step(False, 4, 0.002)  # ratio 1.5: 4 decodes need 2 accepted drafts expected
    good.speculation.expected_accepted, poor.speculation.expected_accepted = 1.5, 0.2
    assert not speculator.worth_verifying([good, poor], 4)
    good.speculation.expected_accepted = 1.9
    assert speculator.worth_verifying([good, poor], 4)
    assert speculator.worth_verifying([poor], 1)  # batch 1 is another bucket: nothing timed there yet
    speculator.hold_back([good, poor])
    assert not good.speculating and not poor.speculating and good.speculation.cooldown == MIN_COOLDOWN_STEPS


def test_the_scheduler_drops_drafts_the_gate_refuses_and_the_step_goes_async(plain):
    llm = LLM("smollm2", speculative_config=NGRAM, **SETTINGS)
    speculator = llm.engine.speculator
    # A verification step measured at 1000 s: never worth it, however slow the plain steps the engine measures
    # meanwhile (on a loaded CI machine a plain SmolLM2 step can take a second; 1 s here once let drafts through).
    speculator.on_step(True, 1, 1000.0)
    speculator.on_step(False, 1, 0.001)
    assert _token_ids(llm, PROMPTS[:1], GREEDY) == _token_ids(plain, PROMPTS[:1], GREEDY)
    assert llm.engine.stats().spec_drafts == 0
    _assert_no_blocks_held(llm)
