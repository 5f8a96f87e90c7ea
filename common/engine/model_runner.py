"""Turns a SchedulerOutput into flat batch tensors, runs the model, and samples.

Owns the KV-cache tensor: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].

``launch`` enqueues a step and returns without waiting for the device; ``LaunchedStep.resolve`` brings its
sampled tokens to the host. Async scheduling launches step N+1 before resolving step N: a sequence whose newest
token is still on the device (sampled by N, not yet appended on the host) takes it as input straight from N's
sampled-token tensor (a device-side gather), so the host never waits for N to build N+1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from common.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from common.engine.device_copy import record_event, to_device, to_host_async
from common.engine.kv_cache_manager import BlockCopy
from common.engine.outputs import TokenLogprobs
from common.engine.request import Request
from common.engine.sampler import PendingSample, Sampler, SamplingRow, compute_prompt_logprobs
from common.engine.scheduler import ScheduledRequest, SchedulerOutput
from common.engine.spec.draft_model import DraftModelProposer, DraftSequence
from common.engine.spec.speculator import DRAFT_ON_DEVICE
from common.lora.slots import LoRASlotPool
from common.lora.step import LoRAStep
from kernels.attention_metadata import AttentionMetadata

VERIFY_GRAPH_FREE_ROWS = 256
"""A verification graph's padded rows are always worth replaying up to this many: a forward of a few hundred rows
reads the weights once either way, while an eager forward of a small model is launch-bound (SmolLM2 on an H200,
batch 16: eager verification steps made n-gram 3.7x slower than plain decoding)."""


@dataclass
class RunnerOutput:
    """Per request id: sampled (token, logprobs) pairs (n of them for a request about to fork, one per verified
    row for a speculating one), and a seeded speculating request's generator state before the step's draws."""

    sampled: dict[str, list[tuple[int, TokenLogprobs | None]]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    generator_states: dict[str, torch.Tensor] = field(default_factory=dict)
    draft_tokens: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a draft model's, per verifying request


@dataclass
class LaunchedStep:
    """One step whose kernels are enqueued. ``resolve`` waits for its results (not for later steps)."""

    step: SchedulerOutput
    started: float  # time.monotonic() at launch
    sample: PendingSample | None = None
    owners: list[str] = field(default_factory=list)  # request id per sampled row
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    done: torch.cuda.Event | None = None
    # Seeded verifying requests: their generator's state before this step's draws (verification rewinds it so
    # that exactly one uniform per emitted token is spent, as without speculation).
    generator_states: dict[str, torch.Tensor] = field(default_factory=dict)
    model_drafts: _ModelDrafts | None = None

    def wait(self) -> None:
        """Block until every kernel of this step has run (its KV writes included)."""
        if self.done is not None:
            self.done.synchronize()

    def resolve(self) -> RunnerOutput:
        output = RunnerOutput(prompt_logprobs=self.prompt_logprobs, generator_states=self.generator_states)
        if self.model_drafts is not None:
            output.draft_tokens = self.model_drafts.on_host()
        if self.sample is not None:
            result = self.sample.result()
            for owner, token, logprobs in zip(self.owners, result.token_ids, result.logprobs, strict=True):
                output.sampled.setdefault(owner, []).append((token, logprobs))
        return output


class _ModelDrafts:
    """A draft model's tokens for this step's verifying sequences, their copy to the host under way."""

    def __init__(self, request_ids: list[str], lengths: list[int], token_ids: torch.Tensor) -> None:
        self.request_ids, self.lengths = request_ids, lengths
        (self._host,) = to_host_async([token_ids])
        self._done = record_event(token_ids.device)

    def on_host(self) -> dict[str, tuple[int, ...]]:
        if self._done is not None:
            self._done.synchronize()
        rows = self._host.tolist()
        return {rid: tuple(row[:n]) for rid, row, n in zip(self.request_ids, rows, self.lengths, strict=True)}


class _DeviceTokens:
    """The newest tokens the host has not appended yet: the previous launched step's sampled ids, on the device.

    Input rows that need one are recorded with ``defer`` and filled by ``fill`` after the upload; ``newest``
    hands the sampler a request's such token (penalties and min_tokens count it).
    """

    def __init__(self, previous: LaunchedStep | None) -> None:
        self._sample = previous.sample if previous is not None else None
        self._ids = self._sample.token_ids if self._sample is not None else None
        self._row = {owner: row for row, owner in enumerate(previous.owners)} if previous is not None else {}
        self._rows: list[int] = []
        self._source_rows: list[int] = []

    def defer(self, row: int, request: Request) -> None:
        """Input row ``row`` takes ``request``'s newest token from the device."""
        if self._ids is None:
            raise RuntimeError("a scheduled token is neither on the host nor sampled by the previous step")
        self._rows.append(row)
        self._source_rows.append(self._row[request.request_id])

    def fill(self, input_ids: torch.Tensor) -> None:
        """On the device, after the upload: the deferred rows of ``input_ids``."""
        if self._rows:
            rows = to_device(np.asarray(self._rows), input_ids.device)
            input_ids[rows] = self._ids[to_device(np.asarray(self._source_rows), input_ids.device)]

    def newest(self, request: Request) -> torch.Tensor | None:
        """``request``'s newest token while only the device has it (a view, no sync), else None."""
        if not request.num_pending_tokens or self._ids is None:
            return None
        return self._ids[self._row[request.request_id]]

    def catch_up_grammar(self, request: Request) -> None:
        """Bring ``request``'s grammar up to its newest token before its mask is filled. Waits on the host for the
        previous step's tokens: call it after this step's forward is enqueued, so the GPU has work meanwhile."""
        if request.grammar is None:
            return
        tokens = request.output_token_ids
        if request.num_pending_tokens and self._sample is not None:
            tokens = [*tokens, self._sample.result().token_ids[self._row[request.request_id]]]
        request.grammar.catch_up(tokens)  # a refused token is caught again, and reported, when it is appended


@dataclass
class _BatchPlan:
    """Host-side description of one step, before it becomes tensors."""

    token_ids: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[tuple[int, ...]] = field(default_factory=list)
    sample_rows: list[tuple[Request, int, tuple[int, ...]]] = field(default_factory=list)  # request, row, drafts
    prompt_rows: list[tuple[Request, list[int], list[int]]] = field(default_factory=list)  # rows, targets
    model_drafts: list[tuple[ScheduledRequest, int]] = field(default_factory=list)  # a draft model's: first row


class ModelRunner:
    """Runs one scheduled step on ``device``. Invariant: block copies are applied before the forward."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        device: torch.device,
        sampler: Sampler,
        decode_graphs: DecodeGraphs | None = None,
        draft_proposer: DraftModelProposer | None = None,
        verify_graphs: DecodeGraphs | None = None,
        on_block_copies: Callable[[tuple[BlockCopy, ...]], None] | None = None,
        lora_pool: LoRASlotPool | None = None,
    ) -> None:
        self.model = model
        self.lora_pool = lora_pool  # --enable-lora: rows of a request with an adapter use its (pinned) slot
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.decode_graphs = decode_graphs
        self.draft_proposer = draft_proposer
        self.verify_graphs = verify_graphs
        self.on_block_copies = on_block_copies  # tensor-parallel rank 0: the other ranks copy the same blocks

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """Run one step to completion (launch, then resolve)."""
        return self.launch(step).resolve()

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue one step. Tokens not yet appended on the host come from ``previous``'s sampled tensor."""
        launched = LaunchedStep(step, time.monotonic())
        device_tokens = _DeviceTokens(previous)
        self._apply_block_copies(step)
        if self._can_replay(step):
            batch = self._decode_batch(step.scheduled, device_tokens)
            hidden = self.decode_graphs.run(batch, device_tokens.fill)
            self._sample(hidden, [(item.request, ()) for item in step.scheduled], launched, device_tokens)
        elif self._can_replay_verification(step):
            batch, sample_rows, model_drafts = self._verification_batch(step.scheduled, device_tokens)

            def fill_inputs(input_ids: torch.Tensor) -> None:
                device_tokens.fill(input_ids)
                if model_drafts:
                    launched.model_drafts = self._propose_with_draft_model(model_drafts, input_ids)

            hidden = self.verify_graphs.run(batch, fill_inputs)
            row_index = to_device(np.asarray([row for _, row, _ in sample_rows]), hidden.device)
            rows = [(request, drafts) for request, _, drafts in sample_rows]
            self._sample(hidden[row_index], rows, launched, device_tokens)
        else:
            self._launch_eager(step, device_tokens, launched)
        launched.done = record_event(self.device)
        return launched

    def _launch_eager(self, step: SchedulerOutput, device_tokens: _DeviceTokens, launched: LaunchedStep) -> None:
        plan = self._plan(step.scheduled, device_tokens)
        input_ids, positions, metadata = self._to_tensors(plan)
        device_tokens.fill(input_ids)
        if plan.model_drafts:
            launched.model_drafts = self._propose_with_draft_model(plan.model_drafts, input_ids)
        lora = self._lora_step(step.scheduled)
        if lora is None:
            hidden = self.model(input_ids, positions, self.kv_cache, metadata)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, metadata, lora=lora)
        if plan.sample_rows:
            row_index = to_device(np.asarray([row for _, row, _ in plan.sample_rows]), hidden.device)
            rows = [(request, drafts) for request, _, drafts in plan.sample_rows]
            self._sample(hidden[row_index], rows, launched, device_tokens)
        for request, rows, targets in plan.prompt_rows:  # host-synchronizing: such steps run synchronously
            logits = self.model.compute_logits(hidden[rows])
            k = request.sampling_params.prompt_logprobs or 0
            launched.prompt_logprobs[request.request_id] = compute_prompt_logprobs(logits, targets, k)

    def _lora_step(self, scheduled: tuple[ScheduledRequest, ...]) -> LoRAStep | None:
        """The step's LoRA context (each row's slot, grouped once for all layers), or None when no row has an
        adapter: the base model's forward, unchanged."""
        if self.lora_pool is None or all(item.request.lora_slot is None for item in scheduled):
            return None
        slots = np.concatenate(
            [np.full(item.num_new_tokens, _slot_of(item.request), dtype=np.int32) for item in scheduled]
        )
        return LoRAStep.from_token_slots(to_device(slots, self.device), self.lora_pool)

    def _graph_lora_slots(self, scheduled: tuple[ScheduledRequest, ...], rows_per_seq: int) -> np.ndarray | None:
        """A graph step's slot per row (``rows_per_seq`` rows per sequence), when graphs run LoRA."""
        if self.lora_pool is None:
            return None
        return np.repeat(np.asarray([_slot_of(item.request) for item in scheduled], dtype=np.int32), rows_per_seq)

    def _propose_with_draft_model(
        self, items: list[tuple[ScheduledRequest, int]], input_ids: torch.Tensor
    ) -> _ModelDrafts:
        """Run the draft model for the sequences that verify its drafts and write them into their input rows (on
        the device, before the target's forward); the drafts' host copy is what verification compares with."""
        if self.draft_proposer is None:
            raise RuntimeError("a step plans draft-model tokens but the engine has no draft model")
        sequences = [
            DraftSequence(item.request.request_id, item.request.all_token_ids, item.block_ids, temperature=0.0)
            for item, _ in items
        ]
        lengths = [len(item.spec_token_ids) for item, _ in items]
        proposal = self.draft_proposer.propose(sequences, max(lengths))
        source = [(i, j) for i, length in enumerate(lengths) for j in range(length)]
        rows = [first + j for (_, first), length in zip(items, lengths, strict=True) for j in range(length)]
        source_index = to_device(np.asarray(source, dtype=np.int64), input_ids.device)
        input_ids[to_device(np.asarray(rows), input_ids.device)] = proposal.token_ids[
            source_index[:, 0], source_index[:, 1]
        ]
        return _ModelDrafts([item.request.request_id for item, _ in items], lengths, proposal.token_ids)

    def _can_replay(self, step: SchedulerOutput) -> bool:
        """Pure decode (one new token per sequence, no prompt logprobs) within the captured batch sizes."""
        graphs = self.decode_graphs
        if graphs is None or len(step.scheduled) > graphs.max_batch:
            return False
        return all(
            item.num_new_tokens == 1 and item.completes_sequence and not item.request.wants_prompt_logprobs
            for item in step.scheduled
        )

    def _can_replay_verification(self, step: SchedulerOutput) -> bool:
        """Decodes only, some verifying drafts, within the captured batch sizes, and padded to the graph's rows
        per sequence costing at most twice the real rows (or ``VERIFY_GRAPH_FREE_ROWS``)."""
        graphs, scheduled = self.verify_graphs, step.scheduled
        if graphs is None or len(scheduled) > graphs.max_batch or not any(i.spec_token_ids for i in scheduled):
            return False
        for item in step.scheduled:
            drafts = item.spec_token_ids
            if item.num_new_tokens - len(drafts) != 1 or not item.completes_sequence:
                return False
            if item.request.wants_prompt_logprobs or len(drafts) >= graphs.tokens_per_seq:
                return False
        padded = graphs.bucket_for(len(step.scheduled)) * graphs.tokens_per_seq
        return padded <= max(VERIFY_GRAPH_FREE_ROWS, 2 * step.num_batched_tokens)

    def _verification_batch(
        self, scheduled: tuple[ScheduledRequest, ...], device_tokens: _DeviceTokens
    ) -> tuple[DecodeBatch, list[tuple[Request, int, tuple[int, ...]]], list[tuple[ScheduledRequest, int]]]:
        """Each sequence as ``tokens_per_seq`` rows: its last token, its drafts, then padding rows (no KV written,
        positions repeating the last real one); the rows to sample with the drafts before each; and the sequences
        whose drafts a draft model writes on the device, with their first draft row."""
        q, block_size = self.verify_graphs.tokens_per_seq, self.block_size
        size = len(scheduled)
        token_ids = np.zeros(size * q, dtype=np.int64)
        positions = np.empty(size * q, dtype=np.int64)
        slots = np.full(size * q, -1, dtype=np.int64)
        seq_lens = np.empty(size, dtype=np.int32)
        sample_rows, model_drafts = [], []
        for index, item in enumerate(scheduled):
            base, start, drafts = index * q, item.num_computed_tokens, item.spec_token_ids
            known = item.request.all_token_ids
            if start < len(known):
                token_ids[base] = known[start]
            else:
                device_tokens.defer(base, item.request)
            token_ids[base + 1 : base + 1 + len(drafts)] = drafts
            if drafts and drafts[0] == DRAFT_ON_DEVICE:
                model_drafts.append((item, base + 1))
            real = np.arange(start, start + len(drafts) + 1, dtype=np.int64)
            positions[base : base + q] = start + len(drafts)
            positions[base : base + len(real)] = real
            blocks = np.asarray(item.block_ids, dtype=np.int64)[real // block_size]
            slots[base : base + len(real)] = blocks * block_size + real % block_size
            seq_lens[index] = start + q
            sample_rows.extend((item.request, base + j, drafts[:j]) for j in range(len(drafts) + 1))
        tables = [item.block_ids for item in scheduled]
        batch = DecodeBatch(token_ids, positions, slots, seq_lens, tables, self._graph_lora_slots(scheduled, q))
        return batch, sample_rows, model_drafts

    def _decode_batch(self, scheduled: tuple[ScheduledRequest, ...], device_tokens: _DeviceTokens) -> DecodeBatch:
        """One token per sequence, at position num_computed_tokens: known on the host, or still on the device."""
        size, block_size = len(scheduled), self.block_size
        token_ids = np.zeros(size, dtype=np.int64)
        positions = np.empty(size, dtype=np.int64)
        slots = np.empty(size, dtype=np.int64)
        for row, item in enumerate(scheduled):
            position = item.num_computed_tokens
            known = item.request.all_token_ids
            if position < len(known):
                token_ids[row] = known[position]
            else:
                device_tokens.defer(row, item.request)
            positions[row] = position
            slots[row] = item.block_ids[position // block_size] * block_size + position % block_size
        seq_lens = (positions + 1).astype(np.int32)
        tables = [item.block_ids for item in scheduled]
        return DecodeBatch(token_ids, positions, slots, seq_lens, tables, self._graph_lora_slots(scheduled, 1))

    def _apply_block_copies(self, step: SchedulerOutput) -> None:
        if step.block_copies and self.on_block_copies is not None:
            self.on_block_copies(step.block_copies)
        for copy in step.block_copies:
            self.kv_cache[:, :, copy.dst].copy_(self.kv_cache[:, :, copy.src])

    def _plan(self, scheduled: tuple[ScheduledRequest, ...], device_tokens: _DeviceTokens) -> _BatchPlan:
        plan = _BatchPlan()
        num_rows = 0
        for item in scheduled:
            start, end = item.num_computed_tokens, item.num_computed_tokens + item.num_new_tokens
            positions = np.arange(start, end, dtype=np.int64)
            block_ids = np.asarray(item.block_ids, dtype=np.int64)
            drafts = item.spec_token_ids
            tokens = self._known_tokens(item, start, end - len(drafts), num_rows, device_tokens)
            plan.token_ids.append(np.concatenate([tokens, np.asarray(drafts, dtype=np.int64)]) if drafts else tokens)
            plan.positions.append(positions)
            plan.slots.append(block_ids[positions // self.block_size] * self.block_size + positions % self.block_size)
            plan.query_lens.append(item.num_new_tokens)
            plan.seq_lens.append(end)
            plan.block_tables.append(item.block_ids)
            if drafts and drafts[0] == DRAFT_ON_DEVICE:
                plan.model_drafts.append((item, num_rows + item.num_new_tokens - len(drafts)))
            if item.completes_sequence:  # the last token's row, then one row per draft (each verifies the next)
                first = num_rows + item.num_new_tokens - 1 - len(drafts)
                plan.sample_rows.extend((item.request, first + j, drafts[:j]) for j in range(len(drafts) + 1))
            self._plan_prompt_logprobs(plan, item, num_rows)
            num_rows += item.num_new_tokens
        return plan

    @staticmethod
    def _known_tokens(
        item: ScheduledRequest, start: int, end: int, first_row: int, device_tokens: _DeviceTokens
    ) -> np.ndarray:
        """Input ids of positions [start, end); a last position past the host's tokens is filled on the device."""
        tokens = np.zeros(end - start, dtype=np.int64)
        known = item.request.all_token_ids[start:end]
        tokens[: len(known)] = known
        if len(known) < end - start:  # only the newest token can still be on the device
            device_tokens.defer(first_row + end - start - 1, item.request)
        return tokens

    def _plan_prompt_logprobs(self, plan: _BatchPlan, item: ScheduledRequest, first_row: int) -> None:
        """Row at position p predicts prompt token p+1; collect the ones not yet recorded."""
        request = item.request
        if not request.wants_prompt_logprobs:
            return
        already = len(request.prompt_logprobs)  # entries cover targets 1..already
        start = max(item.num_computed_tokens, already)
        end = min(item.num_computed_tokens + item.num_new_tokens, request.num_prompt_tokens - 1)
        if start >= end:
            return
        rows = [first_row + p - item.num_computed_tokens for p in range(start, end)]
        targets = [request.prompt_token_ids[p + 1] for p in range(start, end)]
        plan.prompt_rows.append((request, rows, targets))

    def _to_tensors(self, plan: _BatchPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        def as_tensor(parts: list[np.ndarray]) -> torch.Tensor:
            return to_device(np.concatenate(parts), self.device)

        width = max(len(table) for table in plan.block_tables)
        tables = np.zeros((len(plan.block_tables), width), dtype=np.int32)
        for row, table in enumerate(plan.block_tables):
            tables[row, : len(table)] = table
        query_start = np.zeros(len(plan.query_lens) + 1, dtype=np.int32)
        np.cumsum(plan.query_lens, out=query_start[1:])
        metadata = AttentionMetadata(
            slot_mapping=as_tensor(plan.slots),
            query_start_loc=to_device(query_start, self.device),
            seq_lens=to_device(np.asarray(plan.seq_lens, dtype=np.int32), self.device),
            block_tables=to_device(tables, self.device),
            query_lens_cpu=tuple(plan.query_lens),
            seq_lens_cpu=tuple(plan.seq_lens),
            block_size=self.block_size,
            num_decode_splits=self._decode_splits(plan),
        )
        return as_tensor(plan.token_ids), as_tensor(plan.positions), metadata

    def _decode_splits(self, plan: _BatchPlan) -> int | None:
        """With graphs, eager decode steps use their bucket's split count so both paths sum alike."""
        if self.decode_graphs is None or max(plan.query_lens) != 1:
            return None  # the kernel picks from the batch shape
        size = len(plan.query_lens)
        if size > self.decode_graphs.max_batch:
            return None
        return self.decode_graphs.splits_for(self.decode_graphs.bucket_for(size))

    def _sample(
        self,
        hidden: torch.Tensor,
        requests: list[tuple[Request, tuple[int, ...]]],
        launched: LaunchedStep,
        device_tokens: _DeviceTokens,
    ) -> None:
        """Sample each (request, drafts before this row) from its row of ``hidden``; a request about to fork
        samples once per sample. A verifying request's rows count the drafts before them as its output (penalties,
        min_tokens) and draw from its generator in order, as consecutive plain steps would."""
        logits = self.model.compute_logits(hidden)
        expanded, rows, owners = [], [], []
        for logit_row, (request, drafts) in enumerate(requests):
            device_tokens.catch_up_grammar(request)
            if drafts == () and request.generator is not None and request.speculating:  # a verification's first row
                launched.generator_states[request.request_id] = request.generator.get_state()
            for generator in [request.generator, *request.fork_generators[: request.pending_forks]]:
                expanded.append(logit_row)
                rows.append(
                    SamplingRow(
                        params=request.sampling_params,
                        prompt_token_ids=request.prompt_token_ids,
                        output_token_ids=[*request.output_token_ids, *drafts] if drafts else request.output_token_ids,
                        generator=generator,
                        eos_token_ids=request.eos_token_ids,
                        pending_token=device_tokens.newest(request),
                        grammar=request.grammar,
                    )
                )
                owners.append(request.request_id)
        if len(expanded) != len(requests):
            logits = logits[to_device(np.asarray(expanded), logits.device)]
        launched.sample = self.sampler.sample(logits, rows)
        launched.owners = owners


def _slot_of(request: Request) -> int:
    """The request's adapter slot, -1 for the base model."""
    return -1 if request.lora_slot is None else request.lora_slot
