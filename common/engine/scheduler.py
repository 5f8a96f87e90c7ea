"""Iteration-level scheduler: one token budget per step shared by decodes and (chunked) prefills.

Pure Python over the KVCacheManager: it decides which requests run and how many tokens each
computes this step; it never touches tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass

from common.config import SchedulerConfig
from common.engine.kv_cache_manager import BlockCopy, KVCacheManager
from common.engine.request import Request, RequestStatus
from common.engine.spec.speculator import Speculator
from common.lora.registry import LoRAAdapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute tokens [num_computed_tokens, +num_new_tokens).

    ``completes_sequence``: after this step every token (on the host or pending) has KV, so the last row's
    logits give the next token; fixed when scheduled. ``spec_token_ids``: draft tokens proposed after the
    sequence's last token; they are the step's last ``len(spec_token_ids)`` new tokens, and every row from the
    sequence's last token on is sampled to verify them (speculative decoding).
    """

    request: Request
    num_computed_tokens: int
    num_new_tokens: int
    block_ids: tuple[int, ...]
    completes_sequence: bool
    spec_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SchedulerOutput:
    """The typed message from scheduler to model runner for one step."""

    scheduled: tuple[ScheduledRequest, ...]
    block_copies: tuple[BlockCopy, ...]
    preempted: tuple[Request, ...]

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS with preemption by recompute. Never drops a request: a preempted one waits at the front.

    Multi-LoRA (``lora``): a request of an adapter holds (pins) a GPU slot from when it starts running until it
    finishes, is aborted or is preempted. One whose adapter cannot get a slot (every slot pinned by running
    requests of other adapters) stays waiting and later requests may pass it.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        speculator: Speculator | None = None,
        lora: LoRAAdapters | None = None,
    ) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.speculator = speculator
        self.lora = lora
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        self._admit_lora(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adopt a forked sample that already holds its blocks (see KVCacheManager.fork)."""
        self._admit_lora(request)
        if not self._acquire_lora(request):  # a fork's parent pins the same adapter, so this cannot happen
            raise RuntimeError(f"{request.request_id}: no LoRA slot for adapter {request.lora_name!r}")
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request with a finished status and return all its blocks at once."""
        assert status.is_finished
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)
        if self.speculator is not None:
            self.speculator.forget(request)
        if request.lora_name is not None and self.lora is not None:
            self._release_lora(request)
            self.lora.finished(request.lora_name)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled, preempted, budget = self._schedule_running(budget)
        scheduled, budget = self._gate_drafts(scheduled, budget)
        if not preempted:
            scheduled += self._schedule_waiting(budget)
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            block_copies=tuple(self.kv_cache.take_pending_copies()),
            preempted=tuple(preempted),
        )

    def on_step_done(self, output: SchedulerOutput) -> None:
        """Record that the scheduled tokens now have KV in the cache."""
        for item in output.scheduled:
            item.request.num_computed_tokens = item.num_computed_tokens + item.num_new_tokens

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledRequest], list[Request], int]:
        """Decodes and unfinished prefill chunks first, oldest first; preempt the newest when out of blocks."""
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.reaches_max_tokens:  # async scheduling: finishes when its pending token arrives
                index += 1
                continue
            num_new = min(request.num_scheduled_tokens - request.num_computed_tokens, budget)
            drafts = self._drafts(request, num_new, budget)
            if not (drafts and self.kv_cache.allocate_slots(request, num_new + len(drafts))):
                drafts = ()  # no drafts, or no blocks for them: a plain decode (which may preempt)
                if not self._allocate_or_preempt(request, num_new, preempted):
                    break
            scheduled.append(self._record(request, num_new + len(drafts), drafts))
            budget -= num_new + len(drafts)
            index += 1
        return scheduled, preempted, budget

    def _gate_drafts(self, scheduled: list[ScheduledRequest], budget: int) -> tuple[list[ScheduledRequest], int]:
        """Drop this step's drafts when verifying them is not expected to beat a plain step (the speculator's
        measured cost); the requests then pause speculating and the step can run asynchronously."""
        if self.speculator is None or not any(item.spec_token_ids for item in scheduled):
            return scheduled, budget
        with_drafts = [item.request for item in scheduled if item.spec_token_ids]
        num_decodes = sum(1 for item in scheduled if item.num_new_tokens - len(item.spec_token_ids) == 1)
        if self.speculator.worth_verifying(with_drafts, num_decodes):
            return scheduled, budget
        self.speculator.hold_back([item.request for item in scheduled])
        kept = [
            dataclasses.replace(item, num_new_tokens=item.num_new_tokens - len(item.spec_token_ids), spec_token_ids=())
            if item.spec_token_ids
            else item
            for item in scheduled
        ]
        return kept, budget + sum(len(item.spec_token_ids) for item in scheduled)

    def _drafts(self, request: Request, num_new: int, budget: int) -> tuple[int, ...]:
        """Draft tokens to verify after a decoding request's last token (speculative decoding), else ()."""
        if self.speculator is None or num_new != 1 or request.num_computed_tokens + 1 != request.num_scheduled_tokens:
            return ()
        return self.speculator.drafts_for(request, len(self.running), budget - 1)

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, budget: int) -> list[ScheduledRequest]:
        """Admit waiting requests in arrival order while budget, sequence slots and blocks allow."""
        scheduled: list[ScheduledRequest] = []
        index = 0  # waiting requests before it wait for a LoRA slot
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[index]
            if not self._acquire_lora(request):
                index += 1
                continue
            prefix = self.kv_cache.find_cached_prefix(request)
            num_cached = len(prefix) * self.kv_cache.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                self._release_lora(request)
                break
            num_new = min(num_new, budget)
            if not self.kv_cache.allocate_slots(request, num_new, prefix):
                self._release_lora(request)
                break
            del self.waiting[index]
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._record(request, num_new))
            budget -= num_new
        return scheduled

    def _preempt(self, request: Request) -> None:
        """Free everything and recompute later from the first token (outputs so far are kept)."""
        self.kv_cache.free(request)
        if self.speculator is not None:
            self.speculator.forget(request)
        self._release_lora(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        if len(request.prompt_logprobs) < request.num_prompt_tokens - 1:
            request.prompt_logprobs.clear()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _admit_lora(self, request: Request) -> None:
        if request.lora_name is None:
            return
        if self.lora is None:
            raise ValueError(f"lora_request: {request.lora_name!r}, but LoRA is not enabled (enable_lora)")
        self.lora.admit(request.lora_name)

    def _acquire_lora(self, request: Request) -> bool:
        """Pin the request's adapter in a GPU slot (True when it has one or needs none; False: all slots pinned)."""
        if request.lora_name is None or request.lora_slot is not None:
            return True
        request.lora_slot = self.lora.acquire(request.lora_name)
        return request.lora_slot is not None

    def _release_lora(self, request: Request) -> None:
        if request.lora_slot is not None:
            self.lora.release(request.lora_name)
            request.lora_slot = None

    def _record(self, request: Request, num_new: int, drafts: tuple[int, ...] = ()) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            num_computed_tokens=request.num_computed_tokens,
            num_new_tokens=num_new,
            block_ids=self.kv_cache.block_id_tuple(request.request_id),
            completes_sequence=request.num_computed_tokens + num_new - len(drafts) == request.num_scheduled_tokens,
            spec_token_ids=drafts,
        )
