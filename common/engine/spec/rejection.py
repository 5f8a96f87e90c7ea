"""Rejection sampling for speculative decoding: emitted tokens are distributed exactly as the target's samples.

Leviathan et al. 2023 / Chen et al. 2023, batched over N sequences of up to K draft tokens, on any torch device and
with no host synchronization (the caller reads the results whenever it needs them). Randomness comes in as
uniforms, so a caller with per-request generators decides which stream each row draws from.

For sequence i with k_i draft tokens d_0..d_{k_i-1}, drafted from q_j and scored by the target as p_j:
- d_j is accepted iff ``u_j * q_j(d_j) < p_j(d_j)``, i.e. with probability min(1, p_j(d_j) / q_j(d_j)) for u_j
  uniform in [0, 1). The strict "<" means a token the target forbids (p = 0: top-k, grammar) is never accepted,
  not even at u_j = 0.
- at the first rejection j the emitted token is drawn from the residual norm(max(0, p_j - q_j)), or from p_j where
  that residual is all zero; then the sequence stops.
- when all k_i drafts are accepted a bonus token is drawn from p_{k_i}.
Either way the one sampled token comes from position a_i = the number of accepted drafts, with the uniform
``residual_uniforms[i, a_i]``, so each sequence emits a_i + 1 tokens (1..k_i + 1).
"""

from __future__ import annotations

import torch

PADDING_TOKEN_ID = -1  # output positions past a sequence's emitted tokens


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: torch.Tensor,
    accept_uniforms: torch.Tensor,
    residual_uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output_token_ids [N, K+1] int64, num_emitted [N] int64): emitted tokens first, PADDING_TOKEN_ID after.

    target_probs [N, K+1, V] (row k_i is the bonus position), draft_probs [N, K, V], draft_token_ids [N, K]
    (entries past num_draft_tokens[i] are ignored, any value), num_draft_tokens [N] in 0..K, accept_uniforms [N, K]
    in [0, 1), residual_uniforms [N, K+1] in (0, 1]. All on one device; nothing here waits for it.
    """
    _check_shapes(target_probs, draft_probs, draft_token_ids, num_draft_tokens, accept_uniforms, residual_uniforms)
    num_accepted = _count_accepted(target_probs, draft_probs, draft_token_ids, num_draft_tokens, accept_uniforms)
    distribution = _final_distribution(target_probs, draft_probs, num_accepted, num_draft_tokens)
    uniforms = residual_uniforms.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    final_token_ids = _inverse_cdf(distribution, uniforms)
    padded_drafts = torch.nn.functional.pad(draft_token_ids.long(), (0, 1))  # column K is never a draft
    positions = torch.arange(padded_drafts.shape[1], device=padded_drafts.device)
    output = torch.where(positions < num_accepted.unsqueeze(1), padded_drafts, PADDING_TOKEN_ID)
    output.scatter_(1, num_accepted.unsqueeze(1), final_token_ids.unsqueeze(1))
    return output, num_accepted + 1


def accept_greedy(
    target_token_ids: torch.Tensor, draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: (output_token_ids [N, K+1] int64, num_emitted [N] int64).

    target_token_ids [N, K+1] are the target's argmax tokens at each draft position (the last is the bonus). Drafts
    are accepted while they equal the target's token; sequence i emits the target's tokens t_0..t_{a_i}, where a_i
    is its number of accepted drafts (the first mismatch is replaced by the target's token, or the bonus follows a
    fully accepted draft), then PADDING_TOKEN_ID.
    """
    num_rows, max_drafts = draft_token_ids.shape
    if target_token_ids.shape != (num_rows, max_drafts + 1) or num_draft_tokens.shape != (num_rows,):
        raise ValueError(
            f"expected target_token_ids [{num_rows}, {max_drafts + 1}] and num_draft_tokens [{num_rows}], got "
            f"{list(target_token_ids.shape)} and {list(num_draft_tokens.shape)}"
        )
    in_draft = _draft_mask(num_draft_tokens, max_drafts)
    num_accepted = _leading_true(in_draft & (draft_token_ids == target_token_ids[:, :max_drafts]))
    positions = torch.arange(max_drafts + 1, device=target_token_ids.device)
    output = torch.where(positions <= num_accepted.unsqueeze(1), target_token_ids.long(), PADDING_TOKEN_ID)
    return output, num_accepted + 1


def _count_accepted(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: torch.Tensor,
    accept_uniforms: torch.Tensor,
) -> torch.Tensor:
    """[N] int64: how many leading drafts each sequence accepts (0..num_draft_tokens[i])."""
    max_drafts = draft_token_ids.shape[1]
    in_draft = _draft_mask(num_draft_tokens, max_drafts)
    index = torch.where(in_draft, draft_token_ids.long(), 0).unsqueeze(2)  # padding may hold any value
    target = target_probs[:, :max_drafts].gather(2, index).squeeze(2)
    draft = draft_probs.gather(2, index).squeeze(2)
    return _leading_true(in_draft & (accept_uniforms * draft < target))


def _final_distribution(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, num_accepted: torch.Tensor, num_draft_tokens: torch.Tensor
) -> torch.Tensor:
    """[N, V] unnormalized: the residual max(0, p - q) at a rejected position, else the target's p there.

    Only the one position each sequence samples at is materialized ([N, V], not [N, K+1, V]).
    """
    target = _row_at(target_probs, num_accepted)
    max_drafts = draft_probs.shape[1]
    if max_drafts == 0:
        return target
    residual = (target - _row_at(draft_probs, num_accepted.clamp(max=max_drafts - 1))).clamp_(min=0)
    rejected = num_accepted < num_draft_tokens
    use_residual = rejected & (residual.sum(1) > 0)  # all zero only when p == q there: then draw from p
    return torch.where(use_residual.unsqueeze(1), residual, target)


def _row_at(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """probs[i, positions[i], :] for every i, as [N, V]."""
    index = positions.view(-1, 1, 1).expand(-1, 1, probs.shape[2])
    return probs.gather(1, index).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[N] int64: the first index whose cumulative weight reaches u * total, for u in (0, 1] (common.engine.sampler).

    u > 0 means a zero-weight token at the start of the CDF is never chosen.
    """
    cdf = weights.cumsum(dim=1)
    targets = uniforms.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, targets).squeeze(1).clamp_(max=weights.shape[1] - 1)


def _draft_mask(num_draft_tokens: torch.Tensor, max_drafts: int) -> torch.Tensor:
    """[N, K] bool: which draft positions hold a real draft token."""
    positions = torch.arange(max_drafts, device=num_draft_tokens.device)
    return positions < num_draft_tokens.unsqueeze(1)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[N] int64: the length of each row's leading run of True."""
    return mask.long().cumprod(dim=1).sum(dim=1)


def _check_shapes(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: torch.Tensor,
    accept_uniforms: torch.Tensor,
    residual_uniforms: torch.Tensor,
) -> None:
    """Shapes only (host metadata): checking values would wait for the device."""
    num_rows, max_drafts = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    expected = {
        "target_probs": (target_probs, (num_rows, max_drafts + 1, vocab)),
        "draft_probs": (draft_probs, (num_rows, max_drafts, vocab)),
        "num_draft_tokens": (num_draft_tokens, (num_rows,)),
        "accept_uniforms": (accept_uniforms, (num_rows, max_drafts)),
        "residual_uniforms": (residual_uniforms, (num_rows, max_drafts + 1)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name}: expected shape {list(shape)} for N={num_rows}, K={max_drafts}, V={vocab}, "
                f"got {list(tensor.shape)}"
            )
