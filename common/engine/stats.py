"""Typed engine statistics: a snapshot of gauges and cumulative counters, plus per-request phase timings.

The engine only counts; services turn these records into Prometheus metrics (the engine never imports
prometheus). Everything here runs on the engine thread, like the scheduler it watches.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.engine.model_runner import RunnerOutput
    from common.engine.request import Request
    from common.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput


@dataclass(frozen=True)
class EngineStats:
    """The engine at one instant. Counters (``num_*`` past the first five) only grow over the engine's life."""

    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    num_requests: int
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached
    prefill_tokens: int = 0  # tokens computed by prefill (prompt or recomputed context); cache hits excluded
    generation_tokens: int = 0  # tokens sampled
    # Speculative decoding (zero without it). A verification of one sequence's k draft tokens is a "draft"; it
    # accepts a prefix of them and emits that prefix plus one token of the target's own.
    spec_drafts: int = 0  # sequences x steps that verified draft tokens
    spec_draft_tokens: int = 0  # draft tokens proposed and verified
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_emitted_tokens: int = 0  # tokens those verifications emitted (accepted + the target's one, when kept)
    spec_accepted_per_position: tuple[int, ...] = ()  # [i]: drafts whose token i (0-based) was accepted
    # Tokens per step with output: [k] counts steps of n tokens with ceil(log2 n) == k, i.e. n in (2^(k-1), 2^k];
    # exact counts for any power-of-two histogram bound (vllm:iteration_tokens_total), in O(log n) memory.
    step_tokens_log2: tuple[int, ...] = ()
    step_tokens_sum: int = 0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by requests or reservations (free cached blocks count as free)."""
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0


@dataclass(frozen=True)
class FinishedRequest:
    """Phase timings of one finished sequence, as this engine saw it (seconds).

    ``prefill_s`` is None when it never got a token here (aborted while queued), ``decode_s`` likewise.
    """

    finish_reason: str  # stop | length | abort
    queue_s: float  # arrival -> first scheduled (or -> finish when never scheduled)
    prefill_s: float | None  # first scheduled -> first token sampled here
    decode_s: float | None  # first token sampled here -> finish
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class _Phases:
    first_scheduled: float
    first_token: float | None = None


class EngineStatsRecorder:
    """Counts tokens per step and times each request's phases.

    Finished-request records accumulate only while ``collect_finished`` is set (a worker drains them with
    ``take_finished``), in a bounded queue, so the offline API never grows memory for records nobody reads.
    """

    def __init__(self, max_finished: int = 100_000) -> None:
        self.prefill_tokens = 0
        self.generation_tokens = 0
        self.speculation = SpeculationCounters()
        self.step_tokens_log2: list[int] = []
        self.step_tokens_sum = 0
        self.collect_finished = False
        self._phases: dict[str, _Phases] = {}
        self._finished: deque[FinishedRequest] = deque(maxlen=max_finished)

    def on_step(self, step: SchedulerOutput, result: RunnerOutput, started: float) -> None:
        """After a step (begun at ``started``, monotonic) ran and its tokens were appended: count tokens, start
        and end phase clocks."""
        now = time.monotonic()
        for item in step.scheduled:
            request = item.request
            if not _is_decode(item):
                self.prefill_tokens += item.num_new_tokens
            phases = self._phases.setdefault(request.request_id, _Phases(first_scheduled=started))
            if phases.first_token is None and result.sampled.get(request.request_id):
                phases.first_token = now
            if request.is_finished:
                self.on_finish(request, now)
        self.generation_tokens += sum(len(tokens) for tokens in result.sampled.values())
        self._count_step_tokens(step.num_batched_tokens)

    def _count_step_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        power = (num_tokens - 1).bit_length()  # ceil(log2 n)
        if len(self.step_tokens_log2) <= power:
            self.step_tokens_log2.extend([0] * (power + 1 - len(self.step_tokens_log2)))
        self.step_tokens_log2[power] += 1
        self.step_tokens_sum += num_tokens

    def on_finish(self, request: Request, now: float | None = None) -> None:
        """A sequence ended (by a token, a limit or an abort): close its record."""
        now = time.monotonic() if now is None else now
        phases = self._phases.pop(request.request_id, None)
        if not self.collect_finished:
            return
        started = phases.first_scheduled if phases is not None else now
        first_token = phases.first_token if phases is not None else None
        self._finished.append(
            FinishedRequest(
                finish_reason=request.status.value,
                queue_s=max(0.0, started - request.arrival_time),
                prefill_s=None if first_token is None else first_token - started,
                decode_s=None if first_token is None else now - first_token,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
            )
        )

    def snapshot(self, scheduler: Scheduler, num_requests: int) -> EngineStats:
        """The scheduler's and its KV cache's gauges now, with this recorder's token counters."""
        kv = scheduler.kv_cache
        return EngineStats(
            total_blocks=kv.pool.num_blocks,
            free_blocks=kv.pool.num_free_blocks,
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            num_requests=num_requests,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=kv.num_queries,
            prefix_cache_hits=kv.num_hits,
            prefill_tokens=self.prefill_tokens,
            generation_tokens=self.generation_tokens,
            spec_drafts=self.speculation.drafts,
            spec_draft_tokens=self.speculation.draft_tokens,
            spec_accepted_tokens=self.speculation.accepted_tokens,
            spec_emitted_tokens=self.speculation.emitted_tokens,
            spec_accepted_per_position=tuple(self.speculation.accepted_per_position),
            step_tokens_log2=tuple(self.step_tokens_log2),
            step_tokens_sum=self.step_tokens_sum,
        )

    def take_finished(self) -> list[FinishedRequest]:
        """Records of sequences finished since the last call, oldest first."""
        taken = list(self._finished)
        self._finished.clear()
        return taken


def _is_decode(item: ScheduledRequest) -> bool:
    """One new token past the prompt: a decode step. Holds before and after the step's tokens are appended;
    a prompt or recomputed context runs as prefill (a lone last chunk token of a resumed context counts as decode).
    """
    num_new = item.num_new_tokens - len(item.spec_token_ids)  # drafts being verified are decode work too
    return num_new == 1 and item.num_computed_tokens + 1 > item.request.num_prompt_tokens


@dataclass
class SpeculationCounters:
    """Cumulative speculative-decoding counts (see the ``spec_*`` fields of EngineStats)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int, num_emitted: int) -> None:
        """One sequence's verification: ``num_draft`` proposed, the first ``num_accepted`` kept."""
        self.drafts += 1
        self.draft_tokens += num_draft
        self.accepted_tokens += num_accepted
        self.emitted_tokens += num_emitted
        if len(self.accepted_per_position) < num_draft:
            self.accepted_per_position.extend([0] * (num_draft - len(self.accepted_per_position)))
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1


@dataclass
class StepClock:
    """Cumulative wall time of the engine's steps on its thread, for comparing with the TPOT clients see.

    ``seconds / steps`` is the engine's own time per step; ``requests / steps`` the mean batch that got output.
    The gap between a stream's time per token and this is the serving overhead around the engine.
    """

    steps: int = 0
    seconds: float = 0.0
    requests: int = 0

    def record(self, seconds: float, num_requests: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.requests += num_requests

    def snapshot(self) -> StepClock:
        return StepClock(self.steps, self.seconds, self.requests)
