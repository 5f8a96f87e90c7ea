"""Builders for paged-attention test batches: random, non-contiguous block tables and slot mappings."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from common.models.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class PagedBatch:
    """A varlen batch laid out in a paged cache: the metadata plus, per sequence, its block ids."""

    metadata: AttentionMetadata
    blocks: list[list[int]]  # blocks[i][j] = cache block holding positions j*bs .. (j+1)*bs - 1 of seq i


def make_paged_batch(
    query_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> PagedBatch:
    """Give each sequence randomly chosen, shuffled cache blocks (never block 0, so padding of the
    block table points at a block nobody owns) and map each query token to its slot."""
    needed = [-(-s // block_size) for s in seq_lens]
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    assert sum(needed) <= len(pool), "cache too small for this batch"
    blocks, slots = [], []
    for q_len, s_len, n in zip(query_lens, seq_lens, needed):
        own, pool = pool[:n], pool[n:]
        blocks.append(own)
        slots += [own[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len)]
    table = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    for i, own in enumerate(blocks):
        table[i, : len(own)] = torch.tensor(own, dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=table,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        block_size=block_size,
    )
    return PagedBatch(metadata, blocks)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def paged_batch():
    """The ``make_paged_batch`` builder (a fixture, so test modules need not import conftest)."""
    return make_paged_batch
