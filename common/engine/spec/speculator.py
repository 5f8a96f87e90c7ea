"""Which requests speculate this step, and their draft tokens (the scheduler asks; verification reports back).

A step that verifies drafts runs synchronously: the next step's length depends on how many drafts it accepts, so
the host's step time, which the async engine hides, adds to the GPU's. Steps without drafts stay asynchronous: the
n-gram lookup then works from the tokens before the newest one (still on the device). A request whose
verifications accept nothing ``MISSES_BEFORE_BACKOFF`` times in a row stops speculating for a cool-down of scheduled
steps, doubling each time up to ``MAX_COOLDOWN_STEPS``; any accepted token resets it. With a draft model the drafts
are made on the device inside the step (the scheduler plans placeholders; see ModelRunner), and its steps stay
synchronous (the draft reads every token on the host). Requests that never speculate: constrained ones (a grammar
needs a mask per position), a prompt about to fork its samples, a prefill worker's export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from common.engine.request import Request
from common.engine.spec.ngram import NgramProposer
from common.engine.spec.state import MIN_COOLDOWN_STEPS, SpeculationState

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
        # one more than k: a lookup made while the newest token is pending spends its first token guessing that one
        self.ngram = NgramProposer(
            config.num_speculative_tokens + 1, config.prompt_lookup_min, config.prompt_lookup_max
        )
        self._forget = forget  # the draft model's per-request KV bookkeeping
        self.step_times = StepTimes()
        self.adaptive = config.adaptive  # weigh each step's drafts against the measured step times

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
        may = self._may_speculate(request, state, num_running)
        limit = min(max_drafts, self._room(request)) if may else 0
        if self.drafts_on_device:  # the draft model reads every token on the host: keep steps synchronous
            request.speculating = may
            return (DRAFT_ON_DEVICE,) * limit if limit > 0 and not request.num_pending_tokens else ()
        drafts = self._ngram_drafts(request, limit) if limit > 0 else ()
        request.speculating = bool(drafts)  # only a verifying step runs synchronously
        if limit > 0 and not drafts:  # a failed lookup costs host time every step: it counts as a miss too
            state.miss()
        return drafts

    def _ngram_drafts(self, request: Request, limit: int) -> tuple[int, ...]:
        """The n-gram lookup. With the newest token still on the device (the previous step ran asynchronously),
        the lookup uses the tokens before it: the first token its match proposes stands for the unknown newest one
        and the drafts are the tokens after it. A wrong guess only gets the drafts rejected: verification compares
        them with the target's tokens after the real newest token."""
        if not request.num_pending_tokens:
            return tuple(self.ngram.propose(request.all_token_ids, limit))
        return tuple(self.ngram.propose(request.all_token_ids, limit + 1)[1:])

    def on_verified(self, request: Request, num_accepted: int) -> None:
        """A verification of ``request``'s drafts kept ``num_accepted`` of them."""
        state = request.speculation
        if state is None:
            return
        state.observe(num_accepted)
        if num_accepted:
            state.misses, state.next_cooldown = 0, MIN_COOLDOWN_STEPS
        else:
            self._missed(request, state)

    def worth_verifying(self, with_drafts: list[Request], num_decodes: int) -> bool:
        """Whether a step whose ``with_drafts`` requests verify drafts beats a plain step for its ``num_decodes``
        decoding sequences: a speculating step runs synchronously and costs ``ratio`` plain steps (measured per
        batch size), so it pays when the drafts it is expected to accept cover ``num_decodes * (ratio - 1)``.
        It speculates until a speculating step was timed, then holds back once for the plain step time; either time
        is measured again when older than STEP_TIME_STALE_STEPS steps of the other kind."""
        times, bucket = self.step_times, StepTimes.bucket(num_decodes)
        if not self.adaptive or times.stale(times.speculative, times.since_speculative, bucket):
            return True  # this step measures the speculating step time
        if times.stale(times.plain, times.since_plain, bucket):
            return False  # the held-back steps measure the plain step time
        ratio = times.speculative[bucket] / times.plain[bucket]
        expected = sum(request.speculation.expected_accepted for request in with_drafts if request.speculation)
        return expected >= num_decodes * (ratio - 1.0)

    def hold_back(self, requests: list[Request]) -> None:
        """A step not worth verifying: every speculating request of it pauses (its steps go back to async) for the
        shortest cool-down; a request's own misses are what lengthen its cool-downs."""
        for request in requests:
            if request.speculating and request.speculation is not None:
                request.speculation.cooldown = MIN_COOLDOWN_STEPS
                request.speculating = False

    def on_step(self, speculative: bool, num_decodes: int, seconds: float) -> None:
        """A pure-decode step's wall time on the engine thread, speculating or not."""
        self.step_times.record(speculative, num_decodes, seconds)

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
        room = self.max_model_len - request.num_scheduled_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - request.num_pending_tokens - 1)
        return min(room, self.config.num_speculative_tokens)

    @staticmethod
    def _missed(request: Request, state: SpeculationState) -> None:
        state.observe(0)
        if state.miss():
            request.speculating = False


STEP_TIME_EWMA_WEIGHT = 0.2
STEP_TIME_STALE_STEPS = 256  # steps of one kind after which the other kind's time at that batch size is re-measured


@dataclass
class StepTimes:
    """Moving means of pure-decode step wall times per batch-size bucket, plain and speculating."""

    plain: dict[int, float] = field(default_factory=dict)
    speculative: dict[int, float] = field(default_factory=dict)
    since_plain: dict[int, int] = field(default_factory=dict)  # speculative steps since the last plain one
    since_speculative: dict[int, int] = field(default_factory=dict)  # plain steps since the last speculative one

    @staticmethod
    def bucket(num_decodes: int) -> int:
        return next((size for size in (1, 2, 4, 8, 16, 32, 64, 128) if num_decodes <= size), 256)

    def record(self, speculative: bool, num_decodes: int, seconds: float) -> None:
        bucket = self.bucket(num_decodes)
        means = self.speculative if speculative else self.plain
        previous = means.get(bucket)
        means[bucket] = seconds if previous is None else previous + STEP_TIME_EWMA_WEIGHT * (seconds - previous)
        self.since_plain[bucket] = self.since_plain.get(bucket, 0) + 1 if speculative else 0
        self.since_speculative[bucket] = 0 if speculative else self.since_speculative.get(bucket, 0) + 1

    @staticmethod
    def stale(means: dict[int, float], since: dict[int, int], bucket: int) -> bool:
        """Never measured, or not for STEP_TIME_STALE_STEPS steps of the other kind (a slow outlier, e.g. a first
        step that compiled, must not keep speculation off for good)."""
        return bucket not in means or since.get(bucket, 0) > STEP_TIME_STALE_STEPS
