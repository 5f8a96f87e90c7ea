"""The typed message from the model runner to every attention layer for one forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Flat (varlen, unpadded) batch description shared by all layers of one step.

    Tokens of all sequences are concatenated: sequence i owns query rows
    ``query_start_loc[i] : query_start_loc[i+1]``. Its queries are the last
    ``query_len`` tokens of a context of ``seq_lens[i]`` tokens, so query row j of
    sequence i sits at position ``seq_lens[i] - query_len + j`` and attends causally
    to cache positions ``0 .. seq_lens[i] - query_len + j``.

    Invariant: before attention reads the cache, the layer writes this step's K/V
    into ``slot_mapping`` (slot = block_id * block_size + offset; -1 = padding, skip).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length incl. this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    query_lens_cpu: tuple[int, ...]  # host copies so reference paths never sync
    seq_lens_cpu: tuple[int, ...]
    block_size: int
    # Split-KV decode: how many splits per sequence; fixed when a CUDA graph is captured, else None
    # (the kernel picks from the batch shape).
    num_decode_splits: int | None = None

    # Cached: every layer of a step asks, and these walk the host tuples.
    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @cached_property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @cached_property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @cached_property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1

    @cached_property
    def num_leading_decodes(self) -> int:
        """How many sequences at the front of the batch have query length 1 (decodes come first)."""
        count = 0
        for query_len in self.query_lens_cpu:
            if query_len != 1:
                break
            count += 1
        return count
