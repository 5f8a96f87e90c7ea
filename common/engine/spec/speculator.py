"""Which requests speculate this step, and their draft tokens (the scheduler asks; verification reports back).

A speculating request's steps run synchronously: its proposer needs every token on the host, and the next step's
length depends on how many drafts this one accepts. That costs the host's step time the async engine hides, so a
request that gains nothing (no proposal, or nothing accepted) for ``MISSES_BEFORE_BACKOFF`` steps in a row stops
speculating for a cool-down of scheduled steps, doubling each time up to ``MAX_COOLDOWN_STEPS``; any accepted
token resets it. With a draft model the drafts are made on the device inside the step (the scheduler plans
placeholders; see ModelRunner). Requests that never speculate: constrained ones (a grammar needs a mask per
position), a prompt about to fork its samples, a prefill worker's export.
"""

from __future__ import annotations

from collections.abc import Callable

from common.engine.request import Request
from common.engine.spec.ngram import NgramProposer
from common.engine.spec.state import (
    MAX_COOLDOWN_STEPS,
    MIN_COOLDOWN_STEPS,
    MISSES_BEFORE_BACKOFF,
    SpeculationState,
)

DRAFT_ON_DEVICE = -1  # a draft token the runner takes from the draft model during the step


class Speculator:
    """Proposes draft tokens per decoding request (n-gram lookup on the host) and backs off where it does not pay.

    ``config`` is a ``common.speculative_config.SpeculativeConfig``; ``max_model_len`` bounds the drafts so that
    every emitted token still fits.
    """

    def __init__(self, config, max_model_len: int, forget: Callable[[str], None] | None = None) -> None:
        if config.method not in ("ngram", "draft_model"):
            raise ValueError(
                f"speculative_config.method: {config.method!r} is not supported yet (ngram and draft_model are)"
            )
        self.config = config
        self.max_model_len = max_model_len
        self.ngram = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self._forget = forget  # the draft model's per-request KV bookkeeping

    @property
    def drafts_on_device(self) -> bool:
        """Drafts come from a draft model inside the step: the scheduler plans ``DRAFT_ON_DEVICE`` placeholders."""
        return self.config.method == "draft_model"

    def forget(self, request: Request) -> None:
        """``request`` finished or was preempted: whatever a draft model cached for it is stale."""
        if self._forget is not None:
            self._forget(request.request_id)

    def drafts_for(self, request: Request, num_running: int, max_drafts: int) -> tuple[int, ...]:
        """Draft tokens for ``request``'s decode step now being scheduled (possibly none); keeps
        ``request.speculating`` up to date (it makes the step synchronous)."""
        state = request.speculation
        if state is None:
            state = request.speculation = SpeculationState()
        request.speculating = self._may_speculate(request, state, num_running)
        if not request.speculating or request.num_pending_tokens:
            return ()
        limit = min(max_drafts, self._room(request))
        if self.drafts_on_device:
            return (DRAFT_ON_DEVICE,) * max(limit, 0)
        drafts = tuple(self.ngram.propose(request.all_token_ids, limit)) if limit > 0 else ()
        if not drafts:
            self._missed(request, state)
        return drafts

    def on_verified(self, request: Request, num_accepted: int) -> None:
        """A verification of ``request``'s drafts kept ``num_accepted`` of them."""
        state = request.speculation
        if state is None:
            return
        if num_accepted:
            state.misses, state.next_cooldown = 0, MIN_COOLDOWN_STEPS
        else:
            self._missed(request, state)

    def _may_speculate(self, request: Request, state: SpeculationState, num_running: int) -> bool:
        if request.grammar is not None or request.export_kv or request.pending_forks:
            return False
        if self.drafts_on_device and request.sampling_params.has_penalties:
            return False  # penalties count earlier drafts, which only the device has
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            return False
        if state.cooldown:
            state.cooldown -= 1
            return False
        return True

    def _room(self, request: Request) -> int:
        """Drafts that keep every token the step may emit (drafts + 1) within max_tokens and max_model_len."""
        room = self.max_model_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return min(room, self.config.num_speculative_tokens)

    @staticmethod
    def _missed(request: Request, state: SpeculationState) -> None:
        state.misses += 1
        if state.misses >= MISSES_BEFORE_BACKOFF:
            state.misses = 0
            state.cooldown = state.next_cooldown
            state.next_cooldown = min(2 * state.next_cooldown, MAX_COOLDOWN_STEPS)
            request.speculating = False
