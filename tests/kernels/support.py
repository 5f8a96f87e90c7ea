"""Shared pieces of the kernel tests: where Triton can run, and how close a kernel must come to its reference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from kernels.attention_metadata import AttentionMetadata

CUDA = torch.cuda.is_available()
# Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter (tests/conftest.py turns it on).
DEVICE = torch.device("cuda" if CUDA else "cpu")
requires_triton = pytest.mark.skipif(
    not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (set before Triton is imported)",
)

# ||out - ref|| / ||ref|| ceilings. float32 dots run in IEEE mode; half types round p and the output.
REL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error in float64; NaN anywhere in ``out`` makes it NaN (which fails every ``<``)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def assert_equal_after_cast(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal, except bfloat16 on CPU: Triton's interpreter truncates float -> bfloat16 casts where
    CUDA (and torch) round to nearest even, so there each element may be one bf16 ulp off."""
    if out.is_cuda or out.dtype != torch.bfloat16:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_err(out, ref)
    assert err < REL_TOLERANCE[dtype], f"relative error {err:.3g} >= {REL_TOLERANCE[dtype]} for {dtype}"


@dataclass(frozen=True)
class PagedBatch:
    """A varlen batch laid out in a paged cache: the metadata plus, per sequence, its block ids."""

    metadata: AttentionMetadata
    blocks: list[list[int]]  # blocks[i][j] = cache block holding positions j*bs .. (j+1)*bs - 1 of seq i


def make_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    block_size: int,
    num_blocks: int,
    gen: torch.Generator,
    lowest_block: int = 1,
) -> PagedBatch:
    """Give each sequence randomly chosen, shuffled cache blocks from ``[lowest_block, num_blocks)`` (never
    block 0, so padding of the block table points at a block nobody owns) and map each query token to its
    slot."""
    needed = [-(-s // block_size) for s in seq_lens]
    pool = (torch.randperm(num_blocks - lowest_block, generator=gen) + lowest_block).tolist()
    assert sum(needed) <= len(pool), "cache too small for this batch"
    blocks, slots = [], []
    for q_len, s_len, n in zip(query_lens, seq_lens, needed):
        own, pool = pool[:n], pool[n:]
        blocks.append(own)
        padding = max(q_len - s_len, 0)  # rows past the context (seq_len 0: CUDA-graph padding) write nothing
        slots += [-1] * padding
        slots += [own[p // block_size] * block_size + p % block_size for p in range(s_len - q_len + padding, s_len)]
    table = torch.zeros(len(seq_lens), max(max(needed), 1), dtype=torch.int32)
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
