"""Sampler: processing order, exact penalty arithmetic, reproducible seeded sampling, raw logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from common.engine import sampler as sampler_module
from common.engine.outputs import Logprob, TokenLogprobs
from common.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_logits_processors,
    compute_prompt_logprobs,
    filter_min_p,
    filter_top_k_top_p,
)
from common.engine.sampling_params import SamplingParams

VOCAB = 1000


def make_row(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    eos: frozenset[int] = frozenset(),
) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, prompt or [], output or [], generator, eos)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def new_sampler(seed: int = 1234) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


# -- greedy and filters ----------------------------------------------------------------------------------


def test_greedy_equals_argmax_and_leaves_logits_untouched() -> None:
    logits = random_logits(6)
    before = logits.clone()
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(6)]
    out = new_sampler()(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(logits, before)


def test_processing_never_modifies_callers_logits() -> None:
    logits = random_logits(2)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        min_p=0.1,
        repetition_penalty=1.3,
        logit_bias={1: 5.0},
        min_tokens=2,
        logprobs=3,
    )
    new_sampler()(logits, [make_row(params, [1, 2], [3], seed=1, eos=frozenset({0}))] * 2)
    assert torch.equal(logits, before)


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(8, seed=1)
    rows = [make_row(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(8)]
    assert new_sampler()(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_equals_greedy() -> None:
    logits = random_logits(8, seed=2)
    rows = [make_row(SamplingParams(temperature=1.0, top_p=1e-6)) for _ in range(8)]
    assert new_sampler()(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = random_logits(3, vocab=50, seed=3)
    rows = [make_row(SamplingParams(top_k=k)) for k in (1, 7, 50)]
    filtered = filter_top_k_top_p(logits, rows)
    for row, k in enumerate((1, 7, 50)):
        kept = torch.isfinite(filtered[row]).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(logits[row].topk(k).indices.tolist())
        assert torch.equal(filtered[row][kept], logits[row][kept])


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda p: torch.isfinite(filter_top_k_top_p(logits, [make_row(SamplingParams(top_p=p))])[0])  # noqa: E731
    assert kept(0.5).tolist() == [True, False, False, False]
    assert kept(0.7).tolist() == [True, False, True, False]
    assert kept(0.9).tolist() == [True, False, True, True]
    assert kept(0.99).tolist() == [True, True, True, True]


# -- the sort-free filters against the sort-based reference they replaced ---------------------------------


def reference_top_k_top_p(
    logits: torch.Tensor, ks: list[int], ps: list[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The former sort-based top-k/top-p (k=V and p=1 mean off), optionally computed in float64.

    In float32 its softmax and cumsum over 128k tokens drift by ~1e-5, which can move the cut by tokens.
    """
    vocab = logits.shape[1]
    k = torch.tensor([min(k, vocab) for k in ks])
    p = torch.tensor(ps).unsqueeze(1).to(dtype)
    ascending, order = logits.to(dtype).sort(dim=-1, descending=False)
    kth = ascending.gather(1, (vocab - k).unsqueeze(1))
    ascending.masked_fill_(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1.0 - p
    outside[:, -1] = False
    ascending.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending.to(logits.dtype))


def reference_min_p(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = torch.tensor(min_ps).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _filter_params(rows: int, vocab: int, seed: int, every_row_top_k: bool) -> tuple[list[int], list[float]]:
    """Random top-k (some off unless `every_row_top_k`) and top-p (some 1.0) per row."""
    generator = torch.Generator().manual_seed(seed)
    ks = torch.randint(1 if every_row_top_k else 0, min(vocab, 60), (rows,), generator=generator).tolist()
    ks = [vocab if k == 0 else k for k in ks]
    ps = [1.0 if p > 0.95 else max(p, 0.01) for p in torch.rand(rows, generator=generator).tolist()]
    ps[0] = 0.9  # at least one row with top-p
    if not every_row_top_k:
        ks[0] = vocab  # at least one row without top-k: the radix path
    return ks, ps


def _logits_kind(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: many tokens tie at every threshold
        return torch.randint(0, 6, (rows, vocab), generator=generator).float()
    scale = {"peaked": 12.0, "normal": 3.0, "flat": 0.05}[kind]
    return torch.randn(rows, vocab, generator=generator) * scale


def _assert_same_or_boundary_ties(new: torch.Tensor, old: torch.Tensor, logits: torch.Tensor) -> None:
    """Same kept sets, except that where the old sort split a tie at the cut, all of the tie is kept."""
    kept_new, kept_old = torch.isfinite(new), torch.isfinite(old)
    assert torch.equal(new[kept_new], logits[kept_new])
    assert not (kept_old & ~kept_new).any()
    cut = logits.masked_fill(~kept_old, float("inf")).amin(dim=-1, keepdim=True)
    extra = kept_new & ~kept_old
    assert torch.equal(logits[extra], cut.expand_as(logits)[extra])


@pytest.mark.parametrize("every_row_top_k", [False, True])
@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "ties"])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 7), (9, 1000), (5, 32000), (2, 128256)])
def test_top_k_top_p_matches_sort_reference(kind: str, rows: int, vocab: int, every_row_top_k: bool) -> None:
    for seed in range(3):
        logits = _logits_kind(kind, rows, vocab, seed=100 * seed + rows)
        ks, ps = _filter_params(rows, vocab, seed, every_row_top_k)
        params = [SamplingParams(top_k=k if k < vocab else 0, top_p=p) for k, p in zip(ks, ps, strict=True)]
        new = filter_top_k_top_p(logits, [make_row(param) for param in params])
        # the float32 reference is exact at small V; at 128k its float32 drift can move the cut (see its docstring)
        old = reference_top_k_top_p(logits, ks, ps, torch.float32 if vocab <= 32000 else torch.float64)
        if kind == "ties":
            _assert_same_or_boundary_ties(new, old, logits)
        else:
            assert torch.equal(torch.isfinite(new), torch.isfinite(old))
            assert torch.equal(new[torch.isfinite(new)], logits[torch.isfinite(new)])


@pytest.mark.parametrize("kind", ["normal", "flat", "ties"])
def test_top_p_same_alone_or_batched_and_by_either_path(kind: str) -> None:
    """A row's kept set is the same in any batch: with all rows top-k'd (candidates) or not (radix)."""
    logits = _logits_kind(kind, 8, 5000, seed=21)
    params = [SamplingParams(top_k=k, top_p=p) for k, p in zip([3, 40, 40, 7, 25, 1, 40, 12], [0.3, 0.9] * 4)]
    batched = filter_top_k_top_p(logits, [make_row(param) for param in params])
    with_radix_row = filter_top_k_top_p(
        torch.cat([logits, logits[:1]]), [make_row(param) for param in params] + [make_row(SamplingParams(top_p=0.5))]
    )
    assert torch.equal(with_radix_row[:8], batched)
    for i, param in enumerate(params):
        assert torch.equal(filter_top_k_top_p(logits[i : i + 1], [make_row(param)]), batched[i : i + 1])


@pytest.mark.parametrize(
    ("probs", "top_p", "expected"),
    [
        ([0.5, 0.3, 0.2], 0.8, [True, True, False]),
        ([0.6, 0.3, 0.1], 0.6, [True, False, False]),
        ([0.7, 0.2, 0.1], 0.9, [True, True, False]),
        ([0.5, 0.4, 0.1], 0.9, [True, True, False]),
        ([0.3, 0.3, 0.2, 0.2], 0.6, [True, True, False, False]),
    ],
)
def test_top_p_reached_exactly_stops_the_nucleus(probs: list[float], top_p: float, expected: list[bool]) -> None:
    """Reaching p exactly is enough, though float32 probabilities of these sum a few ulps above or below it."""
    for every_row_top_k in (False, True):
        params = SamplingParams(top_p=top_p, top_k=len(probs) if every_row_top_k else 0)
        kept = torch.isfinite(filter_top_k_top_p(torch.log(torch.tensor([probs])), [make_row(params)]))
        assert kept[0].tolist() == expected


def test_top_p_counts_ties_with_the_kth_value_beyond_the_candidates() -> None:
    """top_k=2 keeps the 10 and all ten 9s: their mass (not one 9's) decides where top-p cuts."""
    logits = torch.tensor([[10.0] + [9.0] * 10 + [0.0] * 5])
    kept = torch.isfinite(filter_top_k_top_p(logits, [make_row(SamplingParams(top_k=2, top_p=0.5))]))
    assert kept[0].tolist() == [True] * 11 + [False] * 5
    kept = torch.isfinite(filter_top_k_top_p(logits, [make_row(SamplingParams(top_k=2, top_p=0.2))]))
    assert kept[0].tolist() == [True] + [False] * 15


def test_top_p_keeps_the_whole_tie_at_the_cut() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.0], [0.4, 0.3, 0.1, 0.1, 0.1]]))
    rows = [make_row(SamplingParams(top_p=0.5)), make_row(SamplingParams(top_p=0.75))]
    kept = torch.isfinite(filter_top_k_top_p(logits, rows))
    # row 0: 0.4 < 0.5, so the next value (0.2) is kept, all three tokens that have it; row 1: 0.7 < 0.75
    assert kept.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_top_p_one_keeps_tokens_of_negligible_probability() -> None:
    logits = torch.tensor([[0.0, -40.0, -90.0, float("-inf")], [0.0, -40.0, -90.0, float("-inf")]])
    rows = [make_row(SamplingParams(top_k=3)), make_row(SamplingParams(top_p=0.5))]
    kept = torch.isfinite(filter_top_k_top_p(logits, rows))
    assert kept.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_top_k_top_p_only_touch_their_rows() -> None:
    logits = random_logits(4, seed=11)
    rows = [
        make_row(SamplingParams()),
        make_row(SamplingParams(top_p=0.3)),
        make_row(SamplingParams(min_p=0.2)),
        make_row(SamplingParams(top_k=4, top_p=0.99)),
    ]
    filtered = filter_top_k_top_p(logits, rows)
    assert torch.equal(filtered[[0, 2]], logits[[0, 2]])
    reference = reference_top_k_top_p(logits[[1, 3]], [VOCAB, 4], [0.3, 0.99])
    assert torch.equal(torch.isfinite(filtered[[1, 3]]), torch.isfinite(reference))


@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "ties"])
def test_min_p_matches_softmax_reference(kind: str) -> None:
    logits = _logits_kind(kind, 6, 5000, seed=3)
    min_ps = [0.0, 0.01, 0.1, 0.5, 0.9, 1.0]
    rows = [make_row(SamplingParams(min_p=m)) for m in min_ps]
    assert torch.equal(filter_min_p(logits, rows), reference_min_p(logits, min_ps))


def test_min_p_masks_below_fraction_of_top_probability() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.5, 0.05, 0.3, 0.15]]))
    rows = [make_row(SamplingParams(min_p=0.35)), make_row(SamplingParams())]
    filtered = filter_min_p(logits, rows)
    assert torch.isfinite(filtered[0]).tolist() == [True, False, True, False]
    assert torch.equal(filtered[1], logits[1])


def test_min_p_sampling_only_draws_allowed_tokens() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])).repeat(2000, 1)
    rows = [make_row(SamplingParams(min_p=0.4))] * 2000
    tokens = new_sampler()(logits, rows).token_ids
    assert set(tokens) == {0, 1, 2}


# -- processors: exact arithmetic ------------------------------------------------------------------------


def test_penalties_match_hand_computed_example() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_logits_processors(logits, [make_row(params, prompt=[0, 1], output=[1, 3, 3])])
    # repetition over {0, 1, 3}: 2/2=1, -1*2=-2, 3/2=1.5; then output counts {1: 1, 3: 2}:
    # token 1: -2 - 0.5*1 - 0.25 = -2.75; token 3: 1.5 - 0.5*2 - 0.25 = 0.25
    assert out.tolist() == [[1.0, -2.75, 0.5, 0.25, -2.0]]


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The former penalties: distinct (row, token) pairs and counts from a host torch.unique, row by row."""
    out, vocab = logits.clone(), logits.shape[1]

    def pairs(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = torch.tensor([i * vocab + t for i, seq in enumerate(sequences) for t in seq if 0 <= t < vocab])
        keys, counts = torch.unique(keys, return_counts=True)
        return keys // vocab, keys % vocab, counts

    reps = torch.tensor([row.params.repetition_penalty for row in rows])
    row_idx, token_idx, _ = pairs([[*row.prompt_token_ids, *row.output_token_ids] for row in rows])
    row_idx, token_idx = row_idx[reps[row_idx] != 1.0], token_idx[reps[row_idx] != 1.0]
    values, penalty = out[row_idx, token_idx], reps[row_idx]
    out[row_idx, token_idx] = torch.where(values > 0, values / penalty, values * penalty)
    frequency = torch.tensor([row.params.frequency_penalty for row in rows])
    presence = torch.tensor([row.params.presence_penalty for row in rows])
    row_idx, token_idx, counts = pairs([list(row.output_token_ids) for row in rows])
    out[row_idx, token_idx] -= frequency[row_idx] * counts.float() + presence[row_idx]
    return out


def test_penalties_identical_to_unique_pair_reference() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = random_logits(12, vocab=300, seed=9)
    rows = []
    for i in range(12):
        prompt = torch.randint(0, 320, (int(torch.randint(0, 60, (1,), generator=generator)),), generator=generator)
        output = torch.randint(0, 40, (int(torch.randint(0, 30, (1,), generator=generator)),), generator=generator)
        params = SamplingParams(
            repetition_penalty=[1.0, 1.3, 0.7][i % 3],
            frequency_penalty=[0.0, 0.5, -1.25, 2.0][i % 4],
            presence_penalty=[0.0, -0.5, 1.5][i % 3],
        )
        rows.append(make_row(params, prompt.tolist(), output.tolist()))  # ids >= 300 are outside the vocab
    assert torch.equal(apply_logits_processors(logits, rows), reference_penalties(logits, rows))


def test_frequency_presence_ignore_prompt_tokens() -> None:
    logits = torch.zeros(1, 4) + 1.0
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)
    out = apply_logits_processors(logits, [make_row(params, prompt=[0, 0, 1], output=[2])])
    assert out.tolist() == [[1.0, 1.0, -1.0, 1.0]]


def test_penalties_only_touch_their_rows() -> None:
    logits = random_logits(3, vocab=20)
    rows = [
        make_row(SamplingParams()),
        make_row(SamplingParams(presence_penalty=1.0), output=[4]),
        make_row(SamplingParams(repetition_penalty=1.5), prompt=[5]),
    ]
    out = apply_logits_processors(logits, rows)
    assert torch.equal(out[0], logits[0])
    expected = logits[1].clone()
    expected[4] -= 1.0
    assert torch.equal(out[1], expected)
    changed = (out[2] != logits[2]).nonzero().flatten().tolist()
    assert changed == [5]


def test_logit_bias_adds_and_steers_greedy() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [make_row(SamplingParams(temperature=0, logit_bias={0: 5.0, 2: -1.5})), make_row(SamplingParams())]
    assert apply_logits_processors(logits, rows).tolist() == [[6.0, 2.0, 1.5], [1.0, 2.0, 3.0]]
    assert new_sampler()(logits[:1], rows[:1]).token_ids == [0]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos: bool) -> None:
    logits = torch.tensor([[9.0, 8.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1], ignore_eos=ignore_eos)
    early = make_row(params, output=[3], eos=frozenset({0}))
    assert apply_logits_processors(logits, [early]).tolist() == [[-math.inf, -math.inf, 1.0, 0.0]]
    assert new_sampler()(logits, [early]).token_ids == [2]
    done = make_row(params, output=[3, 3], eos=frozenset({0}))
    assert new_sampler()(logits, [done]).token_ids == [0]


def test_ignore_eos_alone_does_not_mask() -> None:
    logits = torch.tensor([[9.0, 1.0]])
    row = make_row(SamplingParams(temperature=0, ignore_eos=True), eos=frozenset({0}))
    assert new_sampler()(logits, [row]).token_ids == [0]


# -- reproducibility -------------------------------------------------------------------------------------


def _run_steps(rows: list[SamplingRow], steps: list[torch.Tensor], keep: list[int]) -> list[list[int]]:
    """Sample several steps, growing each row's outputs; return the tokens of rows `keep`."""
    sampler = new_sampler(seed=99)
    outputs: list[list[int]] = [[] for _ in rows]
    for logits in steps:
        for row, output in zip(rows, outputs, strict=True):
            row.output_token_ids = list(output)
        for output, token in zip(outputs, sampler(logits, rows).token_ids, strict=True):
            output.append(token)
    return [outputs[i] for i in keep]


def test_seeded_rows_reproduce_alone_and_in_mixed_batch() -> None:
    plain = SamplingParams(temperature=1.0, seed=7)
    fancy = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.01, presence_penalty=0.5, seed=8)
    steps = [random_logits(5, seed=10 + step) for step in range(6)]

    def batch_rows() -> list[SamplingRow]:
        return [
            make_row(SamplingParams(temperature=0.0)),
            make_row(plain, prompt=[1, 2], seed=7),
            make_row(SamplingParams(temperature=1.2, top_k=3)),
            make_row(fancy, prompt=[3], seed=8),
            make_row(SamplingParams(temperature=0.5, repetition_penalty=1.2), prompt=[4]),
        ]

    batched = _run_steps(batch_rows(), steps, keep=[1, 3])
    alone_plain = _run_steps([make_row(plain, prompt=[1, 2], seed=7)], [s[1:2] for s in steps], keep=[0])
    alone_fancy = _run_steps([make_row(fancy, prompt=[3], seed=8)], [s[3:4] for s in steps], keep=[0])
    assert batched == alone_plain + alone_fancy
    reordered = _run_steps(batch_rows()[::-1], [s.flip(0) for s in steps], keep=[3, 1])
    assert reordered == batched


def test_different_seeds_differ_and_unseeded_uses_shared_generator() -> None:
    logits = torch.zeros(1, VOCAB)
    first = [new_sampler()(logits, [make_row(SamplingParams(), seed=s)]).token_ids[0] for s in range(20)]
    assert len(set(first)) > 10
    shared_a = new_sampler(5)(logits.repeat(4, 1), [make_row(SamplingParams())] * 4).token_ids
    shared_b = new_sampler(5)(logits.repeat(4, 1), [make_row(SamplingParams())] * 4).token_ids
    assert shared_a == shared_b


def test_temperature_sampling_matches_softmax_frequencies() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    temperature, draws = 0.7, 40_000
    rows = [make_row(SamplingParams(temperature=temperature))] * draws
    tokens = new_sampler(2024)(logits.repeat(draws, 1), rows).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=8).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 24.3  # df=7, p=0.001


def test_top_k_sampling_renormalizes_over_kept_tokens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5])
    draws = 20_000
    rows = [make_row(SamplingParams(top_k=3))] * draws
    tokens = new_sampler(7)(logits.repeat(draws, 1), rows).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=5).double()
    expected = torch.cat([torch.softmax(logits[:3].double(), dim=0), torch.zeros(2, dtype=torch.double)]) * draws
    assert observed[3:].sum() == 0
    chi_square = float(((observed[:3] - expected[:3]) ** 2 / expected[:3]).sum())
    assert chi_square < 13.8  # df=2, p=0.001


# -- logprobs --------------------------------------------------------------------------------------------


def _expected_rank(logprobs: torch.Tensor, token: int) -> int:
    return int((logprobs > logprobs[token]).sum()) + 1


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(4, seed=5)
    counts = [0, 3, None, 20]
    rows = [
        make_row(SamplingParams(temperature=0.9, top_k=10, logprobs=counts[0], presence_penalty=2.0), output=[1]),
        make_row(SamplingParams(temperature=0.0, logprobs=counts[1], logit_bias={7: 100.0})),
        make_row(SamplingParams(logprobs=counts[2])),
        make_row(SamplingParams(temperature=2.0, logprobs=counts[3], repetition_penalty=1.7), prompt=[2, 3]),
    ]
    out = new_sampler()(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[1] == 7
    assert out.logprobs[2] is None
    for row, count in enumerate(counts):
        entry = out.logprobs[row]
        if count is None:
            continue
        token = out.token_ids[row]
        assert isinstance(entry, TokenLogprobs) and entry.token_id == token
        assert entry.logprob == pytest.approx(float(reference[row, token]), abs=1e-6)
        assert entry.rank == _expected_rank(reference[row], token)
        top = reference[row].topk(count)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_prompt_logprobs_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_module, "PROMPT_LOGPROBS_CHUNK", 3)
    logits = random_logits(7, vocab=40, seed=6)
    targets = [3, 0, 39, 5, 5, 17, 2]
    result = compute_prompt_logprobs(logits, targets, k=2)
    reference = torch.log_softmax(logits, dim=-1)
    assert [r.token_id for r in result] == targets
    for row, (entry, token) in enumerate(zip(result, targets, strict=True)):
        assert entry.logprob == pytest.approx(float(reference[row, token]), abs=1e-6)
        assert entry.rank == _expected_rank(reference[row], token)
        assert [t for t, _ in entry.top] == reference[row].topk(2).indices.tolist()


def test_prompt_logprobs_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        compute_prompt_logprobs(torch.zeros(3, 5), [1, 2], k=0)


def test_token_logprobs_to_vllm_dict() -> None:
    entry = TokenLogprobs(token_id=9, logprob=-3.0, rank=4, top=((1, -0.1), (2, -0.5)))
    assert entry.to_dict() == {9: Logprob(-3.0, 4), 1: Logprob(-0.1, 1), 2: Logprob(-0.5, 2)}
    inside = TokenLogprobs(token_id=2, logprob=-0.5, rank=2, top=((1, -0.1), (2, -0.5)))
    assert inside.to_dict(str) == {2: Logprob(-0.5, 2, "2"), 1: Logprob(-0.1, 1, "1")}


# -- on the GPU (the coordinator runs these on an H200) --------------------------------------------------


def _mixed_rows(vocab: int) -> list[SamplingRow]:
    prompt, output = list(range(0, vocab, 97)), [5, 5, 9, vocab - 1]
    return [
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(temperature=0.8, top_p=0.9), seed=3),
        make_row(SamplingParams(top_k=50, top_p=0.9)),
        make_row(SamplingParams(top_k=20, min_p=0.05, logprobs=5)),
        make_row(SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.2), prompt, output),
        make_row(SamplingParams(temperature=0.0, logit_bias={7: 3.0}, min_tokens=9), output=output, eos=frozenset({2})),
    ]


@pytest.mark.gpu
def test_cuda_sample_enqueues_without_host_sync() -> None:
    logits = random_logits(6, vocab=32000, seed=12).cuda()
    sampler = new_sampler()
    for every_row_top_k in (False, True):
        rows = _mixed_rows(32000)
        if every_row_top_k:
            rows = [make_row(SamplingParams(top_k=40, top_p=0.8), seed=i) for i in range(6)]
        sampler.sample(logits, rows).result()  # warm-up: lazy CUDA initialization may synchronize
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = sampler.sample(logits, rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(pending.result().token_ids) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "ties"])
@pytest.mark.parametrize("every_row_top_k", [False, True])
def test_cuda_top_k_top_p_matches_float64_sort_reference(kind: str, every_row_top_k: bool) -> None:
    for rows, vocab in [(16, 32000), (8, 128256)]:
        logits = _logits_kind(kind, rows, vocab, seed=rows)
        ks, ps = _filter_params(rows, vocab, seed=rows, every_row_top_k=every_row_top_k)
        params = [SamplingParams(top_k=k if k < vocab else 0, top_p=p) for k, p in zip(ks, ps, strict=True)]
        new = filter_top_k_top_p(logits.cuda(), [make_row(param) for param in params]).cpu()
        _assert_same_or_boundary_ties(new, reference_top_k_top_p(logits, ks, ps, torch.float64), logits)


@pytest.mark.gpu
def test_cuda_penalties_identical_to_cpu_reference() -> None:
    logits = random_logits(6, vocab=32000, seed=13)
    rows = [row for row in _mixed_rows(32000) if row.params.min_tokens == 0]
    assert torch.equal(apply_logits_processors(logits.cuda(), rows).cpu(), reference_penalties(logits, rows))


@pytest.mark.gpu
def test_cuda_seeded_rows_reproduce_alone_and_in_mixed_batch() -> None:
    steps = [random_logits(6, vocab=128256, seed=30 + step).cuda() for step in range(4)]
    batched = _run_steps(_mixed_rows(128256), steps, keep=[1])
    alone = _run_steps([_mixed_rows(128256)[1]], [s[1:2] for s in steps], keep=[0])
    assert batched == alone


def test_a_pending_token_on_the_device_counts_as_the_newest_output_token() -> None:
    """Async scheduling: the newest token is still on the device; penalties and min_tokens must see it exactly
    as if the host had appended it."""
    logits = random_logits(4, seed=21)
    sampled = torch.tensor([7, 3, 7, 11])  # the previous step's sampled ids (the device tensor)
    prompt, output = [1, 2, 3, 7], [3, 5]
    params = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(frequency_penalty=0.9, presence_penalty=0.4),
        SamplingParams(min_tokens=3),  # 2 on the host + 1 pending = 3: EOS no longer masked
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=4),
    ]
    pending = [
        SamplingRow(p, prompt, output, eos_token_ids=frozenset({0}), pending_token=sampled[i])
        for i, p in enumerate(params)
    ]
    appended = [
        SamplingRow(p, prompt, [*output, int(sampled[i])], eos_token_ids=frozenset({0}))
        for i, p in enumerate(params)
    ]
    assert torch.equal(apply_logits_processors(logits, pending), apply_logits_processors(logits, appended))
    assert not torch.equal(
        apply_logits_processors(logits, pending),
        apply_logits_processors(logits, [SamplingRow(p, prompt, output, eos_token_ids=frozenset({0})) for p in params]),
    )
