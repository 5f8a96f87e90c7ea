"""Per-request engine state. A request only knows ``num_computed_tokens`` vs ``num_tokens``."""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

import torch

from common.engine.block_pool import BlockHash, hash_full_blocks
from common.engine.outputs import TokenLogprobs
from common.engine.sampling_params import SamplingParams
from common.engine.spec.state import SpeculationState
from common.engine.structured import GrammarState

logger = logging.getLogger(__name__)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    For ``n > 1`` the prompt runs once as sample 0; when its prefill completes the engine forks
    samples 1..n-1 from it (sharing its KV blocks copy-on-write).

    ``grammar`` (structured outputs) has accepted ``output_token_ids`` and, with async scheduling, possibly the
    one token a launched step sampled that the host has not appended yet (see common/engine/structured.py);
    appending catches it up, a fork gets its own copy, and preemption keeps it (the outputs are kept too).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_size: int
    group_id: str = ""
    sample_index: int = 0
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 = not scheduled yet
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    pending_forks: int = 0  # samples still to fork off once the prompt is computed
    fork_generators: list[torch.Generator | None] = field(default_factory=list)
    export_kv: bool = False  # a prefill worker's request: its KV is gathered when it finishes
    # Tokens sampled by launched steps whose results the host has not applied yet (async scheduling): they
    # count towards what is scheduled next, and their ids reach the next step on the device.
    num_pending_tokens: int = 0
    grammar: GrammarState | None = None
    grammar_rejected: bool = False  # a sampled token broke the grammar (a bug: the mask allowed it); it stops
    # Speculative decoding (common/engine/spec/speculator.py): whether the step being scheduled verifies drafts for
    # it (the step then runs synchronously; with a draft model: whether it may speculate), and its back-off state.
    speculating: bool = False
    speculation: SpeculationState | None = None
    # Multi-LoRA: the adapter this request runs under (None: the base model), part of its block hashes; its GPU
    # slot while the scheduler holds one for it (acquired when it starts running, released when it stops).
    lora_name: str | None = None
    lora_slot: int | None = None

    def __post_init__(self) -> None:
        self.group_id = self.group_id or self.request_id
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)
        self._extend_block_hashes()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the scheduler plans with: the host's and the ones still on the device."""
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def reaches_max_tokens(self) -> bool:
        """Its pending tokens already take it to max_tokens: it finishes when they arrive, nothing to schedule."""
        max_tokens = self.sampling_params.max_tokens
        return (
            max_tokens is not None
            and self.num_pending_tokens > 0
            and (self.num_output_tokens + self.num_pending_tokens >= max_tokens)
        )

    @property
    def needs_host_tokens(self) -> bool:
        """Its next step must see every token on the host first (async scheduling waits for this one): a first
        sample forks, a prefill export gathers KV, a verification's accepted count decides the next positions.
        (Penalties and min_tokens take the newest token from the device:
        ``SamplingRow.pending_token``; a grammar waits for it on the host after the next forward is enqueued.)"""
        return self.export_kv or self.pending_forks > 0 or self.speculating

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None and self.sample_index == 0

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        if self.grammar is not None and not self.grammar.catch_up(self.output_token_ids):
            logger.error("%s: sampled token %d is outside its grammar; stopping it", self.request_id, token_id)
            self.grammar_rejected = True
        self._extend_block_hashes()

    def fork(self, sample_index: int, generator: torch.Generator | None) -> Request:
        """A new sample of the same prompt at the same point; the caller shares the KV blocks."""
        child = Request(
            request_id=f"{self.group_id}#{sample_index}",
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=self.sampling_params,
            eos_token_ids=self.eos_token_ids,
            block_size=self.block_size,
            group_id=self.group_id,
            sample_index=sample_index,
            generator=generator,
            arrival_time=self.arrival_time,
            prompt=self.prompt,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            grammar=self.grammar.fork() if self.grammar is not None else None,
            lora_name=self.lora_name,
        )
        return child

    def _extend_block_hashes(self) -> None:
        """Keep one hash per full block of all tokens (prompt and output), chained."""
        if len(self.all_token_ids) // self.block_size <= len(self.block_hashes):
            return
        parent = self.block_hashes[-1] if self.block_hashes else None
        start = len(self.block_hashes)
        self.block_hashes.extend(
            hash_full_blocks(self.all_token_ids, self.block_size, parent, start_block=start, lora_name=self.lora_name)
        )
