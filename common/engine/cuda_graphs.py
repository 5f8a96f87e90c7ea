"""CUDA graphs of the model's forward for pure-decode steps, one per batch-size bucket.

A decode step of B sequences runs the graph captured for the smallest bucket >= B, with padding rows
that write no KV (slot -1) and attend over nothing (seq_len 0). Inputs live in static device buffers that
are filled from pinned host staging buffers, so a replay costs one launch and a few async copies and the
host never waits for the device until the sampled token ids are read.

The staging buffers come in two sets used in turn: with async scheduling the host fills step N+1's inputs
while step N's uploads may not have run yet, so a set is refilled only after the event behind its previous
uploads has completed (two steps ago: in practice never a wait).

Multi-LoRA (``lora_pool``): every graph also runs the LoRA ops, reading each row's adapter slot from one more static
buffer (-1: base model; padding rows too). The per-step grouping of rows by slot is built inside the graph from
that buffer, and the kernels' grids depend only on the bucket and the pool's shapes, so one capture serves every
mix of adapters; the slot weights live in fixed tensors that adapters are copied into.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.lora.slots import LoRASlotPool
from common.lora.step import LoRAStep
from kernels.attention_metadata import AttentionMetadata
from kernels.paged_attention import choose_decode_splits

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, then steps of 8 to 256, then steps of 16: under 8 padded rows to 256, under 6% past it."""
    sizes = [1, 2, 4, *range(8, 257, 8), *range(272, 1025, 16)]
    kept = [size for size in sizes if size < max_batch]
    return (*kept, max_batch)


@dataclass(frozen=True)
class DecodeBatch:
    """Host arrays of one pure-decode step (one query token per sequence; ``tokens_per_seq`` for verification)."""

    token_ids: np.ndarray  # [B * tokens_per_seq] int64
    positions: np.ndarray  # [B * tokens_per_seq] int64
    slots: np.ndarray  # [B * tokens_per_seq] int64
    seq_lens: np.ndarray  # [B] int32
    block_tables: list[tuple[int, ...]]
    lora_slots: np.ndarray | None = None  # [B * tokens_per_seq] int32 adapter slot per row (-1: base); None: all base


class _HostStaging:
    """One set of pinned host buffers for the static inputs, and the event behind its last uploads."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, tokens_per_seq: int) -> None:
        def pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype).pin_memory()

        self.ids = pinned((max_batch * tokens_per_seq,), torch.int64)
        self.positions = pinned((max_batch * tokens_per_seq,), torch.int64)
        self.slots = pinned((max_batch * tokens_per_seq,), torch.int64)
        self.seq_lens = pinned((max_batch,), torch.int32)
        self.tables = pinned((max_batch, max_blocks_per_seq), torch.int32)
        self.lora_slots = pinned((max_batch * tokens_per_seq,), torch.int32)
        self.uploaded: torch.cuda.Event | None = None

    def wait_free(self) -> None:
        """Block until the device has read this set's previous contents."""
        if self.uploaded is not None:
            self.uploaded.synchronize()


class _StaticInputs:
    """Device buffers the graphs read, and two sets of pinned host copies they are filled from in turn."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device, tokens_per_seq: int) -> None:
        def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens_per_seq = q = tokens_per_seq
        self.input_ids = zeros((max_batch * q,), torch.int64)
        self.positions = zeros((max_batch * q,), torch.int64)
        self.slot_mapping = zeros((max_batch * q,), torch.int64)
        self.seq_lens = zeros((max_batch,), torch.int32)
        self.block_tables = zeros((max_batch, max_blocks_per_seq), torch.int32)
        self.query_start_loc = torch.arange(0, (max_batch + 1) * q, q, dtype=torch.int32, device=device)
        self.lora_slots = torch.full((max_batch * q,), -1, dtype=torch.int32, device=device)  # read with LoRA only
        self._staging = [_HostStaging(max_batch, max_blocks_per_seq, q) for _ in range(2)]
        self._turn = 0

    def fill(self, batch: DecodeBatch, bucket: int, with_lora: bool = False) -> None:
        """Copy one step's rows in and pad sequences [B, bucket) so they write nothing (their reads stay in block 0)."""
        staging = self._staging[self._turn]
        self._turn ^= 1
        staging.wait_free()
        size, q = len(batch.seq_lens), self.tokens_per_seq
        rows, bucket_rows = size * q, bucket * q
        width = max(len(table) for table in batch.block_tables)
        ids, positions, slots, seq_lens = (
            staging.ids.numpy(),
            staging.positions.numpy(),
            staging.slots.numpy(),
            staging.seq_lens.numpy(),
        )
        ids[:rows], positions[:rows], slots[:rows], seq_lens[:size] = (
            batch.token_ids,
            batch.positions,
            batch.slots,
            batch.seq_lens,
        )
        ids[rows:bucket_rows], positions[rows:bucket_rows], slots[rows:bucket_rows] = 0, 0, -1
        seq_lens[size:bucket] = 0 if q == 1 else q  # a padding sequence of q > 1 rows attends to its own q slots
        tables = staging.tables.numpy()
        for row, table in enumerate(batch.block_tables):
            tables[row, : len(table)] = table
        for host, device, count in (
            (staging.ids, self.input_ids, bucket_rows),
            (staging.positions, self.positions, bucket_rows),
            (staging.slots, self.slot_mapping, bucket_rows),
            (staging.seq_lens, self.seq_lens, bucket),
        ):
            device[:count].copy_(host[:count], non_blocking=True)
        if with_lora:  # every row of the bucket: a stale slot on a padding row would run (harmless) LoRA work
            lora_slots = staging.lora_slots.numpy()
            lora_slots[:rows] = batch.lora_slots if batch.lora_slots is not None else -1
            lora_slots[rows:bucket_rows] = -1
            self.lora_slots[:bucket_rows].copy_(staging.lora_slots[:bucket_rows], non_blocking=True)
        # Columns past a row's length are stale but never read: kernels stop at ceil(seq_len / block_size).
        self.block_tables[:size, :width].copy_(staging.tables[:size, :width], non_blocking=True)
        staging.uploaded = torch.cuda.Event()
        staging.uploaded.record()

    def metadata(self, bucket: int, block_size: int, num_decode_splits: int | None) -> AttentionMetadata:
        q = self.tokens_per_seq
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: bucket * q],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            query_lens_cpu=(q,) * bucket,
            seq_lens_cpu=(q,) * bucket,  # unused by the kernels, which read seq_lens on the device
            block_size=block_size,
            num_decode_splits=num_decode_splits,
        )


class DecodeGraphs:
    """Captures the forward once per bucket; ``run`` replays the right one.

    ``tokens_per_seq`` > 1: graphs of speculative verification steps, every sequence ``tokens_per_seq`` query rows
    (its last token and k drafts, padded to k = tokens_per_seq - 1 with rows that write no KV); attention runs the
    varlen kernel with a fixed grid.

    Invariant: a staging set is refilled only after the device has read its previous contents (its event),
    so the async host-to-device copies never race the next fill, however far the host runs ahead.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        tokens_per_seq: int = 1,
        lora_pool: LoRASlotPool | None = None,
    ) -> None:
        self.model = model
        self.lora_pool = lora_pool
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.tokens_per_seq = tokens_per_seq
        self.inputs = _StaticInputs(self.buckets[-1], max_blocks_per_seq, device, tokens_per_seq)
        self.device = device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        # Tensor-parallel rank 0: tells the other ranks to replay the same bucket on these inputs (see ``run``).
        self.before_replay: Callable[[DecodeGraphs, int], None] | None = None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, size: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, size)]

    def splits_for(self, bucket: int) -> int | None:
        """Split-KV count of a bucket's graph: sized for the longest context the engine allows (None for
        verification graphs: the varlen kernel does not split)."""
        if self.tokens_per_seq > 1:
            return None
        return choose_decode_splits(bucket, self.model.num_kv_heads, self.max_blocks_per_seq * self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        started = time.perf_counter()
        before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        q = self.tokens_per_seq
        for bucket in reversed(self.buckets):
            self.inputs.seq_lens[:bucket].fill_(q)  # warm-up reads q (garbage) positions; writes go nowhere
            self.inputs.slot_mapping[: bucket * q].fill_(-1)
            metadata = self.inputs.metadata(bucket, self.block_size, self.splits_for(bucket))
            rows = bucket * q
            args = (self.inputs.input_ids[:rows], self.inputs.positions[:rows], self.kv_cache, metadata)
            self.inputs.lora_slots[:rows].fill_(-1)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(args, rows)  # compiles kernels and sets up cuBLAS outside the capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden = self._forward(args, rows)
            self._graphs[bucket] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        used = before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d %s CUDA graphs (batch 1..%d) in %.1fs using %.0f MiB",
            len(self.buckets),
            "decode" if q == 1 else f"verification ({q} tokens per sequence)",
            self.max_batch,
            time.perf_counter() - started,
            used / 2**20,
        )

    def _forward(self, args: tuple, rows: int) -> torch.Tensor:
        """The model on the static inputs; with LoRA, rows grouped by slot from the static slot buffer (captured)."""
        if self.lora_pool is None:
            return self.model(*args)
        return self.model(*args, lora=LoRAStep.from_token_slots(self.inputs.lora_slots[:rows], self.lora_pool))

    def run(self, batch: DecodeBatch, patch: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Hidden states ``[B * tokens_per_seq, hidden]`` of one step (a view into the graph's output).

        ``patch(input_ids)`` runs on the device after the upload, before the replay (input ids still on the device).
        """
        size = len(batch.seq_lens)
        bucket = self.bucket_for(size)
        self.inputs.fill(batch, bucket, with_lora=self.lora_pool is not None)
        if patch is not None:
            patch(self.inputs.input_ids)
        if self.before_replay is not None:
            self.before_replay(self, bucket)
        return self.replay(bucket)[: size * self.tokens_per_seq]

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay ``bucket``'s graph on the static inputs as they are; its whole (padded) hidden states."""
        graph, hidden = self._graphs[bucket]
        graph.replay()
        self.replays += 1
        return hidden

    def static_inputs(self, bucket: int) -> list[torch.Tensor]:
        """The device buffers (contiguous views) a replay of ``bucket`` reads; the same shapes on every rank."""
        rows, inputs = bucket * self.tokens_per_seq, self.inputs
        return [
            inputs.input_ids[:rows],
            inputs.positions[:rows],
            inputs.slot_mapping[:rows],
            inputs.seq_lens[:bucket],
            inputs.block_tables[:bucket],
        ]
