"""Rejection sampling: hand cases, statistical exactness against the target distribution (and a proof that the
check catches wrong samplers), and the CUDA path (no host sync, same result as the CPU).

Chi-square p-values come from torch.special.gammaincc (scipy is not installed): the chi-square survival function
with df degrees of freedom at x is the regularized upper incomplete gamma Q(df / 2, x / 2), exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from common.engine.spec.rejection import PADDING_TOKEN_ID, accept_greedy, rejection_sample

Sampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def one_hot(token: int, vocab: int) -> list[float]:
    return [1.0 if i == token else 0.0 for i in range(vocab)]


def sample(
    target: list[list[list[float]]],
    draft: list[list[list[float]]],
    drafts: list[list[int]],
    num_drafts: list[int],
    accept: list[list[float]] | None = None,
    residual: list[list[float]] | None = None,
) -> tuple[list[list[int]], list[int]]:
    target_probs, draft_probs = torch.tensor(target), torch.tensor(draft).reshape(len(target), len(drafts[0]), -1)
    rows, max_drafts = len(drafts), len(drafts[0])
    accept_uniforms = torch.tensor(accept) if accept else torch.full((rows, max_drafts), 0.5)
    residual_uniforms = torch.tensor(residual) if residual else torch.full((rows, max_drafts + 1), 0.5)
    output, emitted = rejection_sample(
        target_probs,
        draft_probs,
        torch.tensor(drafts, dtype=torch.long).reshape(rows, max_drafts),
        torch.tensor(num_drafts),
        accept_uniforms.reshape(rows, max_drafts),
        residual_uniforms,
    )
    assert output.dtype == emitted.dtype == torch.int64
    return output.tolist(), emitted.tolist()


def test_equal_distributions_accept_every_draft_and_add_a_bonus() -> None:
    probs = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
    bonus = [0.0, 0.0, 1.0, 0.0]
    accept = [[0.0, 0.999], [0.5, 0.9999999]]
    output, emitted = sample(
        [probs[:2] + [bonus]] * 2, [probs[:2]] * 2, [[3, 0], [1, 2]], [2, 2], accept, [[0.3, 0.3, 0.7]] * 2
    )
    assert emitted == [3, 3]
    assert output == [[3, 0, 2], [1, 2, 2]]


def test_a_draft_the_target_forbids_is_always_rejected_even_at_uniform_zero() -> None:
    target = [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
    draft = [[0.0, 0.0, 1.0, 0.0]]
    for accept in (0.0, 0.5, 0.9999999):
        output, emitted = sample([target], [draft], [[2]], [1], [[accept]], [[1.0, 0.5]])
        # Residual max(0, p - q) = p here: u = 1.0 takes the last token it covers.
        assert (output, emitted) == ([[1, PADDING_TOKEN_ID]], [1])


def test_rejection_draws_from_the_residual_with_its_own_uniform() -> None:
    target = [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    draft = [[0.0, 1.0, 0.0, 0.0]]  # accept token 1 with probability p/q = 0.5
    assert sample([target], [draft], [[1]], [1], [[0.4999]], [[0.99, 0.5]]) == ([[1, 3]], [2])
    for residual in (1e-6, 0.5, 1.0):  # residual max(0, p - q) = [0.5, 0, 0, 0]: only token 0
        assert sample([target], [draft], [[1]], [1], [[0.5]], [[residual, 0.5]]) == ([[0, PADDING_TOKEN_ID]], [1])


def test_inverse_cdf_takes_the_first_token_whose_cumulative_weight_reaches_u_times_total() -> None:
    # Residual max(0, p - q) = [0.2, 0, 0.2, 0.2] (total 0.6, not normalized): u * 0.6 against [0.2, 0.2, 0.4, 0.6].
    target = [[0.2, 0.0, 0.4, 0.4], [0.25] * 4]
    draft = [[0.0, 0.6, 0.2, 0.2]]
    for residual, token in [(0.1, 0), (0.33, 0), (0.34, 2), (0.6, 2), (0.67, 3), (1.0, 3)]:
        output, _ = sample([target], [draft], [[1]], [1], [[0.0]], [[residual, 0.5]])
        assert output[0][0] == token, residual


def test_a_zero_residual_falls_back_to_the_target() -> None:
    # p == q, and the draft token has probability 0 under both: rejected, and max(0, p - q) is all zero.
    probs = [0.25, 0.75, 0.0, 0.0]
    for residual, token in [(0.2, 0), (0.3, 1), (1.0, 1)]:
        output, emitted = sample([[probs, probs]], [[probs]], [[2]], [1], [[0.5]], [[residual, 0.5]])
        assert (output, emitted) == ([[token, PADDING_TOKEN_ID]], [1])


def test_rows_stop_at_their_own_draft_length_and_ignore_padding() -> None:
    vocab = 5
    hot = [one_hot(t, vocab) for t in range(vocab)]
    # Target: position j certainly produces token j + 1; the drafts agree with it, so every real draft is accepted.
    target = [hot[1], hot[2], hot[3], hot[4]]
    draft = [hot[1], hot[2], hot[3]]
    drafts = [[1, 2, 3], [1, 2, -7], [1, 99, -1], [-1, -1, -1]]  # padding past each row's length: any value
    output, emitted = sample([target] * 4, [draft] * 4, drafts, [3, 2, 1, 0])
    assert emitted == [4, 3, 2, 1]
    assert output == [[1, 2, 3, 4], [1, 2, 3, -1], [1, 2, -1, -1], [1, -1, -1, -1]]


def test_rows_without_drafts_sample_from_the_first_target_position() -> None:
    target = [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]
    draft = [[1.0, 0.0, 0.0]]
    output, emitted = sample([target] * 3, [draft] * 3, [[0]] * 3, [0, 0, 0], None, [[0.2, 0.5], [0.7, 0.5], [1, 1]])
    assert emitted == [1, 1, 1]
    assert output == [[1, -1], [2, -1], [2, -1]]
    # K = 0: no draft columns at all.
    output, emitted = rejection_sample(
        torch.tensor([target[:1]]),
        torch.zeros(1, 0, 3),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, 0),
        torch.tensor([[0.9]]),
    )
    assert output.tolist() == [[2]] and emitted.tolist() == [1]


def test_shape_mismatch_names_the_argument() -> None:
    with pytest.raises(ValueError, match="residual_uniforms"):
        rejection_sample(
            torch.zeros(2, 3, 4),
            torch.zeros(2, 2, 4),
            torch.zeros(2, 2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, 2),
            torch.zeros(2, 2),
        )


def test_greedy_accepts_while_drafts_match_the_target() -> None:
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]], dtype=torch.int32)
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [4, 6, 7], [5, 6, 0], [5, 6, 7]])
    output, emitted = accept_greedy(target, drafts, torch.tensor([3, 3, 3, 2, 0]))
    assert output.dtype == emitted.dtype == torch.int64
    assert emitted.tolist() == [4, 2, 1, 3, 1]
    assert output.tolist() == [[5, 6, 7, 8], [5, 6, -1, -1], [5, -1, -1, -1], [5, 6, 7, -1], [5, -1, -1, -1]]
    with pytest.raises(ValueError, match="target_token_ids"):
        accept_greedy(target[:, :3], drafts, torch.tensor([3, 3, 3, 2, 0]))


# ---- statistical exactness ---------------------------------------------------------------------------------------
#
# The target is position-only: its distribution at sequence position t is P[t] whatever came before, so the exact
# distribution of the generated sequence is known: token t ~ P[t], independent of the others. A step at position
# `offset` scores drafts at positions offset..offset+K with P[offset:offset+K+1] and drafts them from Q[offset:...].
# Then, for every position j of one step, the j-th emitted token (given the step emitted more than j) ~ P[j], and
# the first two tokens of the generated sequence (a second step where the first emitted only one) ~ P[0] x P[1].

VOCAB = 6
MAX_DRAFTS = 3
ROWS_PER_CALL = 50_000
CALLS = 4


def _position_only_model(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [K+2, V], Q [K+1, V]): random, peaked enough to differ; P forbids a token Q likes at position 1."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(1.5 * torch.randn(MAX_DRAFTS + 2, VOCAB, generator=generator), dim=1)
    draft = torch.softmax(1.5 * torch.randn(MAX_DRAFTS + 1, VOCAB, generator=generator), dim=1)
    forbidden = int(draft[1].argmax())
    target[1, forbidden] = 0.0
    return target / target.sum(1, keepdim=True), draft


def _step(sampler: Sampler, target: torch.Tensor, draft: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One speculative step for ROWS_PER_CALL sequences with random draft lengths: [N, K+1] output tokens."""
    num_drafts = torch.randint(0, MAX_DRAFTS + 1, (ROWS_PER_CALL,), generator=generator)
    drafts = torch.multinomial(draft[:MAX_DRAFTS], ROWS_PER_CALL, replacement=True, generator=generator).T
    drafts = torch.where(torch.arange(MAX_DRAFTS) < num_drafts.unsqueeze(1), drafts, -1)
    output, emitted = sampler(
        target[: MAX_DRAFTS + 1].expand(ROWS_PER_CALL, -1, -1).contiguous(),
        draft[:MAX_DRAFTS].expand(ROWS_PER_CALL, -1, -1).contiguous(),
        drafts,
        num_drafts,
        torch.rand(ROWS_PER_CALL, MAX_DRAFTS, generator=generator),
        1.0 - torch.rand(ROWS_PER_CALL, MAX_DRAFTS + 1, generator=generator),
    )
    assert torch.equal(emitted, (output >= 0).sum(1)) and bool((emitted <= num_drafts + 1).all())
    return output


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of counts to probabilities; 0.0 if a zero-probability cell was observed at all."""
    observed, probs = observed.double().flatten(), probs.double().flatten()
    if bool((observed[probs == 0] > 0).any()):
        return 0.0
    expected = probs[probs > 0] * observed.sum()
    statistic = ((observed[probs > 0] - expected) ** 2 / expected).sum()
    degrees = torch.tensor(expected.numel() - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(degrees / 2, statistic / 2))


def goodness_of_fit(sampler: Sampler, seed: int, calls: int = CALLS) -> dict[str, float]:
    """p-values: each step position's emitted token against P[j], and the first two generated tokens' joint."""
    target, draft = _position_only_model(seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    first_steps, second_steps = [], []
    for _ in range(calls):
        first_steps.append(_step(sampler, target, draft, generator))
        second_steps.append(_step(sampler, target[1:], draft[1:], generator))
    first, second = torch.cat(first_steps), torch.cat(second_steps)
    pvalues = {}
    for j in range(MAX_DRAFTS + 1):
        tokens = first[first[:, j] >= 0, j]
        pvalues[f"position {j}"] = chi_square_pvalue(torch.bincount(tokens, minlength=VOCAB), target[j])
    next_token = torch.where(first[:, 1] >= 0, first[:, 1], second[:, 0])
    pairs = torch.bincount(first[:, 0] * VOCAB + next_token, minlength=VOCAB * VOCAB)
    pvalues["first two tokens"] = chi_square_pvalue(pairs, torch.outer(target[0], target[1]))
    return pvalues


def test_chi_square_pvalue_matches_known_quantiles() -> None:
    # The chi-square 0.95 quantiles for 1 and 5 degrees of freedom, and the 0.999 quantile for 35.
    for degrees, quantile, pvalue in [(1, 3.841459, 0.05), (5, 11.070498, 0.05), (35, 66.618640, 0.001)]:
        probs = torch.full((degrees + 1,), 1.0 / (degrees + 1))
        # One cell's excess chosen so the statistic equals the quantile: counts n*probs + [+a, -a/d, ...].
        total = 1_000_000.0
        expected = total / (degrees + 1)
        excess = (quantile * expected * degrees / (degrees + 1)) ** 0.5
        observed = torch.full((degrees + 1,), expected - excess / degrees, dtype=torch.float64)
        observed[0] = expected + excess
        assert chi_square_pvalue(observed, probs) == pytest.approx(pvalue, rel=1e-4)
    assert chi_square_pvalue(torch.tensor([5.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_emitted_tokens_are_distributed_as_the_target(seed: int) -> None:
    pvalues = goodness_of_fit(rejection_sample, seed)
    assert min(pvalues.values()) > 1e-3, pvalues


def _always_accept(target, draft, drafts, num_drafts, accept_uniforms, residual_uniforms):
    """u = 0 accepts every draft the target allows (0 < p(d)), whatever its probability."""
    return rejection_sample(target, draft, drafts, num_drafts, torch.zeros_like(accept_uniforms), residual_uniforms)


def _accept_with_target_probability(target, draft, drafts, num_drafts, accept_uniforms, residual_uniforms):
    """Accepts d with probability p(d), ignoring q, and resamples from p: the naive rule."""
    ones = torch.ones_like(draft)  # u * 1 < p(d); residual max(0, p - 1) = 0 falls back to p
    return rejection_sample(target, ones, drafts, num_drafts, accept_uniforms, residual_uniforms)


def _resample_from_target_not_residual(target, draft, drafts, num_drafts, accept_uniforms, residual_uniforms):
    """The right acceptance rule, but a rejected position draws from p instead of norm(max(0, p - q))."""
    output, emitted = rejection_sample(target, draft, drafts, num_drafts, accept_uniforms, residual_uniforms)
    accepted = emitted - 1
    rejected = accepted < num_drafts
    rows = torch.arange(len(output))
    probs = target[rows, accepted]
    cdf = probs.cumsum(1)
    from_target = torch.searchsorted(cdf, residual_uniforms[rows, accepted].unsqueeze(1) * cdf[:, -1:]).squeeze(1)
    output[rows[rejected], accepted[rejected]] = from_target[rejected]
    return output, emitted


@pytest.mark.parametrize(
    "wrong_sampler", [_always_accept, _accept_with_target_probability, _resample_from_target_not_residual]
)
def test_the_check_rejects_wrong_samplers(wrong_sampler: Sampler) -> None:
    # A quarter of the samples suffices: each of these is off by far more than chance (p-values underflow to 0).
    pvalues = goodness_of_fit(wrong_sampler, seed=1, calls=1)
    assert min(pvalues.values()) < 1e-6, pvalues


# ---- CUDA ---------------------------------------------------------------------------------------------------------


def _dyadic_probs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random probabilities that are multiples of 2**-20: every partial sum is exact in float32 on any device, so
    CPU and CUDA cumulative sums (different summation orders) agree bit for bit."""
    units = 2**20
    counts = (torch.softmax(2.0 * torch.randn(shape, generator=generator), dim=-1) * units).floor().long()
    top = counts.argmax(dim=-1, keepdim=True)
    counts.scatter_add_(-1, top, units - counts.sum(dim=-1, keepdim=True))
    return counts.float() / units


def _cuda_case(rows: int, max_drafts: int, vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    target = _dyadic_probs((rows, max_drafts + 1, vocab), generator)
    draft = _dyadic_probs((rows, max_drafts, vocab), generator)
    # Half the rows draft the target's own argmax (long accepted runs), half draw from the draft distribution.
    drafted = torch.multinomial(draft.view(-1, vocab), 1, generator=generator).view(rows, max_drafts)
    drafts = torch.where(torch.arange(rows).unsqueeze(1) % 2 == 0, target[:, :max_drafts].argmax(-1), drafted)
    num_drafts = torch.randint(0, max_drafts + 1, (rows,), generator=generator)
    accept = torch.rand(rows, max_drafts, generator=generator)
    residual = 1.0 - torch.rand(rows, max_drafts + 1, generator=generator)
    return [target, draft, drafts, num_drafts, accept, residual]


@pytest.mark.gpu
def test_cuda_matches_cpu_without_host_sync() -> None:
    inputs = _cuda_case(rows=64, max_drafts=4, vocab=32000)
    on_cuda = [tensor.cuda() for tensor in inputs]
    target_tokens = inputs[0].argmax(-1)
    target_on_cuda = target_tokens.cuda()  # a pageable upload syncs: done before the checked region
    rejection_sample(*on_cuda)  # warm-up: lazy CUDA initialization may synchronize
    accept_greedy(target_on_cuda, on_cuda[2], on_cuda[3])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output, emitted = rejection_sample(*on_cuda)
        greedy_output, greedy_emitted = accept_greedy(target_on_cuda, on_cuda[2], on_cuda[3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected_output, expected_emitted = rejection_sample(*inputs)
    assert torch.equal(output.cpu(), expected_output) and torch.equal(emitted.cpu(), expected_emitted)
    assert int(expected_emitted.max()) > 2  # the case exercises accepted runs, not only first-token rejections
    expected_greedy = accept_greedy(target_tokens, inputs[2], inputs[3])
    assert torch.equal(greedy_output.cpu(), expected_greedy[0]) and torch.equal(
        greedy_emitted.cpu(), expected_greedy[1]
    )
