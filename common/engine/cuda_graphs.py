"""CUDA graphs of the model's forward for pure-decode steps, one per batch-size bucket.

A decode step of B sequences runs the graph captured for the smallest bucket >= B, with padding rows
that write no KV (slot -1) and attend over nothing (seq_len 0). Inputs live in static device buffers that
are filled from pinned host staging buffers, so a replay costs one launch and a few async copies and the
host never waits for the device until the sampled token ids are read.

The staging buffers come in two sets used in turn: with async scheduling the host fills step N+1's inputs
while step N's uploads may not have run yet, so a set is refilled only after the event behind its previous
uploads has completed (two steps ago: in practice never a wait).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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
    """Host arrays of one pure-decode step (one query token per sequence)."""

    token_ids: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64
    slots: np.ndarray  # [B] int64
    seq_lens: np.ndarray  # [B] int32
    block_tables: list[tuple[int, ...]]


class _HostStaging:
    """One set of pinned host buffers for the static inputs, and the event behind its last uploads."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int) -> None:
        def pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype).pin_memory()

        self.ids = pinned((max_batch,), torch.int64)
        self.positions = pinned((max_batch,), torch.int64)
        self.slots = pinned((max_batch,), torch.int64)
        self.seq_lens = pinned((max_batch,), torch.int32)
        self.tables = pinned((max_batch, max_blocks_per_seq), torch.int32)
        self.uploaded: torch.cuda.Event | None = None

    def wait_free(self) -> None:
        """Block until the device has read this set's previous contents."""
        if self.uploaded is not None:
            self.uploaded.synchronize()


class _StaticInputs:
    """Device buffers the graphs read, and two sets of pinned host copies they are filled from in turn."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = zeros((max_batch,), torch.int64)
        self.positions = zeros((max_batch,), torch.int64)
        self.slot_mapping = zeros((max_batch,), torch.int64)
        self.seq_lens = zeros((max_batch,), torch.int32)
        self.block_tables = zeros((max_batch, max_blocks_per_seq), torch.int32)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self._staging = [_HostStaging(max_batch, max_blocks_per_seq) for _ in range(2)]
        self._turn = 0

    def fill(self, batch: DecodeBatch, bucket: int) -> None:
        """Copy one step's rows in and pad rows [B, bucket) so they write and read nothing."""
        staging = self._staging[self._turn]
        self._turn ^= 1
        staging.wait_free()
        size = len(batch.token_ids)
        width = max(len(table) for table in batch.block_tables)
        ids, positions, slots, seq_lens = (
            staging.ids.numpy(),
            staging.positions.numpy(),
            staging.slots.numpy(),
            staging.seq_lens.numpy(),
        )
        ids[:size], positions[:size], slots[:size], seq_lens[:size] = (
            batch.token_ids,
            batch.positions,
            batch.slots,
            batch.seq_lens,
        )
        ids[size:bucket], positions[size:bucket], slots[size:bucket], seq_lens[size:bucket] = 0, 0, -1, 0
        tables = staging.tables.numpy()
        for row, table in enumerate(batch.block_tables):
            tables[row, : len(table)] = table
        for host, device in (
            (staging.ids, self.input_ids),
            (staging.positions, self.positions),
            (staging.slots, self.slot_mapping),
            (staging.seq_lens, self.seq_lens),
        ):
            device[:bucket].copy_(host[:bucket], non_blocking=True)
        # Columns past a row's length are stale but never read: kernels stop at ceil(seq_len / block_size).
        self.block_tables[:size, :width].copy_(staging.tables[:size, :width], non_blocking=True)
        staging.uploaded = torch.cuda.Event()
        staging.uploaded.record()

    def metadata(self, bucket: int, block_size: int, num_decode_splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            query_lens_cpu=(1,) * bucket,
            seq_lens_cpu=(1,) * bucket,  # unused by the decode kernel, which reads seq_lens on the device
            block_size=block_size,
            num_decode_splits=num_decode_splits,
        )


class DecodeGraphs:
    """Captures the forward once per bucket; ``run`` replays the right one.

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
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.inputs = _StaticInputs(self.buckets[-1], max_blocks_per_seq, device)
        self.device = device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, size: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, size)]

    def splits_for(self, bucket: int) -> int:
        """Split-KV count of a bucket's graph: sized for the longest context the engine allows."""
        return choose_decode_splits(bucket, self.model.num_kv_heads, self.max_blocks_per_seq * self.block_size)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        started = time.perf_counter()
        before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for bucket in reversed(self.buckets):
            self.inputs.seq_lens[:bucket].fill_(1)  # warm-up reads one (garbage) position; writes go nowhere
            self.inputs.slot_mapping[:bucket].fill_(-1)
            metadata = self.inputs.metadata(bucket, self.block_size, self.splits_for(bucket))
            args = (self.inputs.input_ids[:bucket], self.inputs.positions[:bucket], self.kv_cache, metadata)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.model(*args)  # compiles kernels and sets up cuBLAS outside the capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden = self.model(*args)
            self._graphs[bucket] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        used = before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1fs using %.0f MiB",
            len(self.buckets),
            self.max_batch,
            time.perf_counter() - started,
            used / 2**20,
        )

    def run(self, batch: DecodeBatch, patch: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Hidden states ``[B, hidden]`` of one pure-decode step (a view into the graph's output).

        ``patch(input_ids)`` runs on the device after the upload, before the replay (input ids still on the device).
        """
        size = len(batch.token_ids)
        bucket = self.bucket_for(size)
        self.inputs.fill(batch, bucket)
        if patch is not None:
            patch(self.inputs.input_ids)
        graph, hidden = self._graphs[bucket]
        graph.replay()
        return hidden[:size]
