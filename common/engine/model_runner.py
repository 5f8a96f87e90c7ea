"""Turns a SchedulerOutput into flat batch tensors, runs the model, and samples.

Owns the KV-cache tensor: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from common.engine.outputs import TokenLogprobs
from common.engine.request import Request
from common.engine.sampler import Sampler, SamplingRow, compute_prompt_logprobs
from common.engine.scheduler import ScheduledRequest, SchedulerOutput
from kernels.attention_metadata import AttentionMetadata


@dataclass
class RunnerOutput:
    """Per request id: sampled (token, logprobs) pairs (n of them for a request about to fork)."""

    sampled: dict[str, list[tuple[int, TokenLogprobs | None]]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class _BatchPlan:
    """Host-side description of one step, before it becomes tensors."""

    token_ids: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[tuple[int, ...]] = field(default_factory=list)
    sample_rows: list[tuple[Request, int]] = field(default_factory=list)  # (request, flat row)
    prompt_rows: list[tuple[Request, list[int], list[int]]] = field(default_factory=list)  # rows, targets


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
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.decode_graphs = decode_graphs

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        self._apply_block_copies(step)
        if self._can_replay(step):
            return self._execute_graph(step)
        plan = self._plan(step.scheduled)
        input_ids, positions, metadata = self._to_tensors(plan)
        hidden = self.model(input_ids, positions, self.kv_cache, metadata)
        output = RunnerOutput()
        if plan.sample_rows:
            row_index = torch.tensor([row for _, row in plan.sample_rows], device=hidden.device)
            self._sample(hidden[row_index], [request for request, _ in plan.sample_rows], output)
        for request, rows, targets in plan.prompt_rows:
            logits = self.model.compute_logits(hidden[rows])
            k = request.sampling_params.prompt_logprobs or 0
            output.prompt_logprobs[request.request_id] = compute_prompt_logprobs(logits, targets, k)
        return output

    def _can_replay(self, step: SchedulerOutput) -> bool:
        """Pure decode (one new token per sequence, no prompt logprobs) within the captured batch sizes."""
        graphs = self.decode_graphs
        if graphs is None or len(step.scheduled) > graphs.max_batch:
            return False
        return all(
            item.num_new_tokens == 1 and item.completes_sequence and not item.request.wants_prompt_logprobs
            for item in step.scheduled
        )

    def _execute_graph(self, step: SchedulerOutput) -> RunnerOutput:
        batch = self._decode_batch(step.scheduled)
        hidden = self.decode_graphs.run(batch)
        output = RunnerOutput()
        self._sample(hidden, [item.request for item in step.scheduled], output)
        return output

    def _decode_batch(self, scheduled: tuple[ScheduledRequest, ...]) -> DecodeBatch:
        """One token per sequence: the last known token, at position num_computed_tokens."""
        size, block_size = len(scheduled), self.block_size
        token_ids = np.empty(size, dtype=np.int64)
        positions = np.empty(size, dtype=np.int64)
        slots = np.empty(size, dtype=np.int64)
        for row, item in enumerate(scheduled):
            position = item.num_computed_tokens
            token_ids[row] = item.request.all_token_ids[position]
            positions[row] = position
            slots[row] = item.block_ids[position // block_size] * block_size + position % block_size
        seq_lens = (positions + 1).astype(np.int32)
        return DecodeBatch(token_ids, positions, slots, seq_lens, [item.block_ids for item in scheduled])

    def _apply_block_copies(self, step: SchedulerOutput) -> None:
        for copy in step.block_copies:
            self.kv_cache[:, :, copy.dst].copy_(self.kv_cache[:, :, copy.src])

    def _plan(self, scheduled: tuple[ScheduledRequest, ...]) -> _BatchPlan:
        plan = _BatchPlan()
        num_rows = 0
        for item in scheduled:
            start, end = item.num_computed_tokens, item.num_computed_tokens + item.num_new_tokens
            positions = np.arange(start, end, dtype=np.int64)
            block_ids = np.asarray(item.block_ids, dtype=np.int64)
            plan.token_ids.append(np.asarray(item.request.all_token_ids[start:end], dtype=np.int64))
            plan.positions.append(positions)
            plan.slots.append(block_ids[positions // self.block_size] * self.block_size + positions % self.block_size)
            plan.query_lens.append(item.num_new_tokens)
            plan.seq_lens.append(end)
            plan.block_tables.append(item.block_ids)
            if item.completes_sequence:
                plan.sample_rows.append((item.request, num_rows + item.num_new_tokens - 1))
            self._plan_prompt_logprobs(plan, item, num_rows)
            num_rows += item.num_new_tokens
        return plan

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
            return torch.from_numpy(np.concatenate(parts)).to(self.device, non_blocking=True)

        width = max(len(table) for table in plan.block_tables)
        tables = np.zeros((len(plan.block_tables), width), dtype=np.int32)
        for row, table in enumerate(plan.block_tables):
            tables[row, : len(table)] = table
        query_start = np.zeros(len(plan.query_lens) + 1, dtype=np.int32)
        np.cumsum(plan.query_lens, out=query_start[1:])
        metadata = AttentionMetadata(
            slot_mapping=as_tensor(plan.slots),
            query_start_loc=torch.from_numpy(query_start).to(self.device),
            seq_lens=torch.tensor(plan.seq_lens, dtype=torch.int32, device=self.device),
            block_tables=torch.from_numpy(tables).to(self.device),
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

    def _sample(self, hidden: torch.Tensor, requests: list[Request], output: RunnerOutput) -> None:
        """Sample each request from its row of ``hidden``; a request about to fork samples once per sample."""
        logits = self.model.compute_logits(hidden)
        expanded, rows, owners = [], [], []
        for logit_row, request in enumerate(requests):
            for generator in [request.generator, *request.fork_generators[: request.pending_forks]]:
                expanded.append(logit_row)
                rows.append(
                    SamplingRow(
                        params=request.sampling_params,
                        prompt_token_ids=request.prompt_token_ids,
                        output_token_ids=request.output_token_ids,
                        generator=generator,
                        eos_token_ids=request.eos_token_ids,
                    )
                )
                owners.append(request.request_id)
        if len(expanded) != len(requests):
            logits = logits[torch.tensor(expanded, device=logits.device)]
        result = self.sampler(logits, rows)
        for owner, token, logprobs in zip(owners, result.token_ids, result.logprobs, strict=True):
            output.sampled.setdefault(owner, []).append((token, logprobs))
