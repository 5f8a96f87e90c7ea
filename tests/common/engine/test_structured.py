"""common/engine/structured.py against SmolLM2's real tokenizer: masks checked by hand, the compile cache, errors,
and the sampler applying masks (logprobs from the raw logits, min_tokens never emptying a row)."""

from __future__ import annotations

import re

import pytest
import torch

from common.engine.sampler import Sampler, SamplingRow
from common.engine.sampling_params import SamplingParams, StructuredOutputs
from common.engine.structured import GrammarCompiler, allowed_token_ids, apply_grammar_masks, choice_grammar

VOCAB = 49152
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(smollm2_tokenizer, VOCAB, {EOS})


@pytest.fixture(scope="module")
def token_texts(smollm2_tokenizer) -> list[str]:
    """Each token's text on its own (special tokens as their names, which match no grammar here)."""
    return smollm2_tokenizer.batch_decode([[t] for t in range(VOCAB)])


def mask_of(state) -> set[int]:
    bitmask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    state.fill(bitmask, 0)
    return set(allowed_token_ids(bitmask[0], VOCAB))


def only(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_choice_mask_is_every_token_that_starts_a_choice(compiler, token_texts, smollm2_tokenizer):
    state = compiler.new_state(StructuredOutputs(choice=("yes", "no")))
    expected = {t for t, text in enumerate(token_texts) if text and ("yes".startswith(text) or "no".startswith(text))}
    assert mask_of(state) == expected
    assert state.accept(only(smollm2_tokenizer, "no"))
    assert mask_of(state) == {EOS}  # complete: only the stop token may follow
    assert not state.is_terminated
    assert state.accept(EOS) and state.is_terminated


def test_regex_mask_after_a_digit_is_the_single_digit_tokens_and_eos(compiler, token_texts, smollm2_tokenizer):
    state = compiler.new_state(StructuredOutputs(regex="[0-9]{1,2}"))
    digits = {t for t, text in enumerate(token_texts) if re.fullmatch("[0-9]", text)}
    assert state.accept(only(smollm2_tokenizer, "4"))
    assert mask_of(state) == digits | {EOS}
    assert not state.accept(only(smollm2_tokenizer, "x"))  # refused, state unchanged
    assert state.accept(only(smollm2_tokenizer, "2"))
    assert mask_of(state) == {EOS}


def test_fork_is_independent(compiler, smollm2_tokenizer):
    state = compiler.new_state(StructuredOutputs(choice=("yes", "no")))
    fork = state.fork()
    assert state.accept(only(smollm2_tokenizer, "no"))
    assert mask_of(fork) != mask_of(state)
    assert fork.accept(only(smollm2_tokenizer, "yes"))


def test_catch_up_accepts_each_output_token_once(compiler, smollm2_tokenizer):
    """Async scheduling offers the newest token at the next launch and again when it is appended: one accept."""
    ids = smollm2_tokenizer.encode('{"a": 1}', add_special_tokens=False)
    state = compiler.new_state(StructuredOutputs(json_object=True))
    assert state.catch_up(ids[:2]) and state.num_accepted == 2
    assert state.catch_up(ids[:2]) and state.num_accepted == 2  # already accepted: nothing happens
    fork = state.fork()
    assert fork.num_accepted == 2 and fork.catch_up(ids) and state.catch_up(ids)
    assert mask_of(state) == mask_of(fork) == {EOS}
    refused = smollm2_tokenizer.encode("x", add_special_tokens=False)
    assert not state.catch_up([*ids, *refused]) and state.num_accepted == len(ids)


def test_resumed_state_accepts_the_tokens_or_names_the_first_that_breaks_it(compiler, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode('{"a": 1}', add_special_tokens=False)
    state = compiler.new_state(StructuredOutputs(json_object=True), ids)
    assert mask_of(state) == {EOS}
    bad = ids + smollm2_tokenizer.encode("x", add_special_tokens=False)
    with pytest.raises(ValueError, match=rf"output_token_ids: token \d+ at position {len(ids)} does not follow"):
        compiler.new_state(StructuredOutputs(json_object=True), bad)


def test_compiles_are_cached_by_kind_and_spec_with_a_bound(smollm2_tokenizer):
    compiler = GrammarCompiler(smollm2_tokenizer, VOCAB, {EOS}, cache_size=2)
    first = compiler.compile(StructuredOutputs(regex="a+"))
    assert compiler.compile(StructuredOutputs(regex="a+")) is first
    assert (compiler.hits, compiler.misses) == (1, 1)
    compiler.compile(StructuredOutputs(grammar='root ::= "a"+'))  # same language, another kind: a miss
    compiler.compile(StructuredOutputs(choice=("a",)))  # evicts regex a+, the least recently used
    assert compiler.compile(StructuredOutputs(regex="a+")) is not first
    assert (compiler.hits, compiler.misses) == (1, 4)


def test_the_cache_is_bounded_in_bytes_too(smollm2_tokenizer):
    compiler = GrammarCompiler(smollm2_tokenizer, VOCAB, {EOS}, cache_bytes=1)
    compiler.compile(StructuredOutputs(regex="a+"))
    kept = compiler.compile(StructuredOutputs(regex="b+"))  # the newest stays, whatever its size
    assert compiler.cached_bytes == kept.memory_size_bytes > 1
    assert compiler.compile(StructuredOutputs(regex="b+")) is kept and compiler.misses == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutputs(json='{"type": "foo"}'), 'structured_outputs.json: Unsupported type "foo"'),
        (StructuredOutputs(json='{"type": "object", "properties": '), "structured_outputs.json: Failed to parse JSON"),
        (StructuredOutputs(json='{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum greater than maximum"),
        (StructuredOutputs(regex="(ab"), "structured_outputs.regex: Regex parsing error at position 4"),
        (StructuredOutputs(grammar="root ::= missing"), 'structured_outputs.grammar: .*Rule "missing" is not defined'),
        (StructuredOutputs(grammar="start: unknown"), "structured_outputs.grammar: Lark error .* unknown name"),
    ],
)
def test_invalid_constraints_are_value_errors_naming_the_problem(compiler, spec, message):
    before = compiler.misses
    with pytest.raises(ValueError, match=message):
        compiler.compile(spec)
    with pytest.raises(ValueError, match=message):  # nothing cached for it
        compiler.compile(spec)
    assert compiler.misses == before + 2


def test_choice_grammar_escapes_quotes_and_backslashes(compiler, smollm2_tokenizer):
    choices = ('say "hi"', "back\\slash", "naïve\n")
    assert choice_grammar(choices).startswith('root ::= "say \\"hi\\""')
    for choice in choices:
        state = compiler.new_state(StructuredOutputs(choice=choices))
        assert all(state.accept(t) for t in smollm2_tokenizer.encode(choice, add_special_tokens=False)), choice
        assert mask_of(state) == {EOS}


def test_no_tokenizer_is_a_value_error():
    with pytest.raises(ValueError, match="structured_outputs: this model was loaded without a tokenizer"):
        GrammarCompiler(None, VOCAB, {EOS}).compile(StructuredOutputs(regex="a"))


def test_masks_apply_to_constrained_rows_only(compiler):
    state = compiler.new_state(StructuredOutputs(choice=("yes", "no")))
    logits = torch.randn(3, VOCAB)
    masked = logits.clone()
    apply_grammar_masks(masked, [None, state, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = sorted(mask_of(state))
    assert torch.equal(masked[1, allowed], logits[1, allowed])
    assert (masked[1] == float("-inf")).sum() == VOCAB - len(allowed)


def test_blocked_tokens_are_cleared_unless_nothing_else_is_allowed(compiler, smollm2_tokenizer):
    growing = compiler.new_state(StructuredOutputs(regex="[0-9]+"), smollm2_tokenizer.encode("4"))
    complete = compiler.new_state(StructuredOutputs(choice=("no",)), smollm2_tokenizer.encode("no"))
    logits = torch.zeros(2, VOCAB)
    apply_grammar_masks(logits, [growing, complete], [[EOS], [EOS]])
    assert logits[0, EOS] == float("-inf") and logits[0, smollm2_tokenizer.encode("7")[0]] == 0.0
    assert logits[1, EOS] == 0.0 and (logits[1] == 0.0).sum() == 1  # EOS is all the grammar allows: kept


def test_sampler_masks_but_logprobs_stay_raw(compiler, smollm2_tokenizer):
    """The masked row takes the best allowed token; its logprobs are those of the unmasked distribution."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    state = compiler.new_state(StructuredOutputs(choice=("yes", "no")))
    row = SamplingRow(SamplingParams(temperature=0.0, logprobs=2), [1], [], grammar=state)
    result = Sampler(torch.Generator().manual_seed(0))(logits, [row])
    allowed = sorted(mask_of(state))
    chosen = allowed[int(logits[0, allowed].argmax())]
    assert result.token_ids == [chosen]
    raw = torch.log_softmax(logits[0], dim=-1)
    entry = result.logprobs[0]
    assert entry.logprob == pytest.approx(float(raw[chosen]), abs=1e-5)
    assert [t for t, _ in entry.top] == raw.topk(2).indices.tolist()


def test_sampler_min_tokens_does_not_empty_a_complete_grammar(compiler, smollm2_tokenizer):
    """min_tokens would mask EOS, the only token a complete grammar allows: the grammar wins."""
    state = compiler.new_state(StructuredOutputs(choice=("no",)), smollm2_tokenizer.encode("no"))
    row = SamplingRow(
        SamplingParams(temperature=1.0, min_tokens=5), [1], [0], eos_token_ids=frozenset({EOS}), grammar=state
    )
    result = Sampler(torch.Generator().manual_seed(0))(torch.randn(1, VOCAB), [row])
    assert result.token_ids == [EOS]


# -- on the GPU (the coordinator runs these on an H200) --------------------------------------------------


@pytest.mark.gpu
def test_cuda_masks_apply_on_the_device_without_host_sync(compiler, smollm2_tokenizer):
    """Masks are filled on the host and uploaded from pinned memory: enqueueing a constrained step never waits."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    choice = StructuredOutputs(choice=("yes", "no"))
    digits = compiler.new_state(StructuredOutputs(regex="[0-9]+"), smollm2_tokenizer.encode("4"))
    rows = [
        SamplingRow(SamplingParams(temperature=0.0), [1], [], grammar=compiler.new_state(choice)),
        SamplingRow(SamplingParams(temperature=0.0), [1], []),
        SamplingRow(
            SamplingParams(temperature=0.8, min_tokens=3), [1], [0], eos_token_ids=frozenset({EOS}), grammar=digits
        ),
        SamplingRow(SamplingParams(temperature=0.0, logprobs=3), [1], [], grammar=compiler.new_state(choice)),
    ]
    sampler = Sampler(torch.Generator().manual_seed(0))
    expected = sampler(logits, rows).token_ids  # the CPU path, for the greedy rows
    on_device = logits.cuda()  # outside the checked region: a pageable host -> device copy synchronizes by itself
    sampler.sample(on_device, rows).result()  # warm-up: xgrammar's Triton kernel compiles on first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.sample(on_device, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = pending.result().token_ids
    assert [tokens[i] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]
    assert tokens[2] in mask_of(digits) and tokens[2] != EOS


def test_the_token_table_is_built_in_the_background_before_the_first_compile(smollm2_tokenizer):
    compiler = GrammarCompiler(smollm2_tokenizer, VOCAB, {EOS})
    compiler.prepare_in_background()
    compiler._preparing.join(timeout=60)
    assert compiler._compiler is not None  # built off the caller's thread
    state = compiler.new_state(StructuredOutputs(choice=("yes", "no")))
    assert mask_of(state)
    GrammarCompiler(None, VOCAB, {EOS}).prepare_in_background()  # no tokenizer: nothing to build, no error
