"""Where a pair transfer's bytes land: straight in the receiver's reserved cache blocks, or a fresh buffer.

The data of one transfer travels as a list of pieces that both ends derive from the header alone
(``piece_runs``): the receiver's block ids split into runs of consecutive ids, and each (layer, k, run) is one
point-to-point op. Both the sender's contiguous ``kv[l, k, i:i + n]`` and the receiver's
``cache[l, k, b:b + n]`` are contiguous, so the receiver can post its recvs straight into the cache (no
scatter copy). When the ids form more than ``MAX_DIRECT_RUNS`` runs (or a block is not a whole number of
4-byte words) the data travels as one op of the whole tensor into a buffer, and ``BlockWriter`` scatters it.

Invariants:
- ``piece_runs`` is a pure function of the header: sender and receiver always post matching op lists, whether
  the receiver lands the pieces in its cache or (reservation unknown, claimed, or shaped differently) in the
  same pieces of a fresh buffer.
- The receiver's sums over the landed pieces (``cache_piece_sums``) equal ``kv_checksum_sums`` of the whole
  sent tensor, so the checksum stays end to end whichever way the bytes land.
- A ``DirectPlacement`` is settled exactly once: ``commit`` after the bytes verified (it may refuse with
  ``ValueError``), or ``abandon`` on any failure; until then its blocks belong to the transfer in flight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.checksum import checksum_rows_sums

MAX_DIRECT_RUNS = 4  # more runs than this: one whole-tensor op into a buffer, then a scatter


@dataclass(frozen=True)
class BlockRun:
    """``length`` consecutive blocks: positions ``index..`` of the sent tensor, ids ``block..`` of the cache."""

    index: int
    block: int
    length: int


@dataclass
class DirectPlacement:
    """The receiver's cache (``[L, 2, blocks, bs, H, D]``) claimed for one transfer's reserved blocks."""

    cache: torch.Tensor
    commit: Callable[[], None]  # the bytes verified: mark the reservation filled (ValueError: refuse)
    abandon: Callable[[], None]  # the transfer failed: the reservation stays unfilled and unclaimed


def block_runs(block_ids: Sequence[int]) -> list[BlockRun]:
    """``block_ids`` as maximal runs of consecutive ids, in order."""
    runs: list[BlockRun] = []
    for index, block in enumerate(block_ids):
        last = runs[-1] if runs else None
        if last is not None and block == last.block + last.length:
            runs[-1] = BlockRun(last.index, last.block, last.length + 1)
        else:
            runs.append(BlockRun(index, int(block), 1))
    return runs


def piece_runs(shape: Sequence[int], itemsize: int, block_ids: Sequence[int]) -> list[BlockRun] | None:
    """The runs the data travels as (ops per (layer, k, run)), or None for one op of the whole tensor."""
    if len(shape) != 6 or not math.prod(shape) or len(block_ids) != shape[2]:
        return None
    if math.prod(shape[3:]) * itemsize % 4:  # pieces must be whole checksum words
        return None
    runs = block_runs(block_ids)
    return runs if len(runs) <= MAX_DIRECT_RUNS else None


def pieces(tensor: torch.Tensor, runs: list[BlockRun], by_block_id: bool) -> list[torch.Tensor]:
    """The contiguous pieces ``tensor[l, k, start:start + n]`` in wire order (layer, k, run); ``start`` is
    the run's cache block id (``by_block_id``, the receiver's cache) or its position (the sent tensor)."""
    starts = [(run.block if by_block_id else run.index, run.length) for run in runs]
    return [
        tensor[layer, k, start : start + length]
        for layer in range(tensor.shape[0])
        for k in range(tensor.shape[1])
        for start, length in starts
    ]


def fits_cache(cache: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, block_ids: Sequence[int]) -> bool:
    """Whether a transfer of ``shape``/``dtype`` can land bit for bit in ``block_ids`` of ``cache``."""
    return (
        cache.dtype == dtype
        and cache.is_contiguous()
        and cache.dim() == len(shape) == 6
        and tuple(cache.shape[0:2]) == tuple(shape[0:2])
        and tuple(cache.shape[3:]) == tuple(shape[3:])
        and all(0 <= b < cache.shape[2] for b in block_ids)
    )


def cache_piece_sums(cache: torch.Tensor, runs: list[BlockRun], num_blocks: int) -> torch.Tensor:
    """The checksum sums of the landed pieces, weighted at their positions in the sent tensor of
    ``num_blocks`` blocks; equal to ``kv_checksum_sums`` of that tensor. Enqueued on the current stream."""
    rows = cache.reshape(cache.shape[0] * cache.shape[1], -1).view(torch.uint8).view(torch.int32)
    block_words = rows.shape[1] // cache.shape[2]
    sums = torch.zeros(2, dtype=torch.int64, device=cache.device)
    for run in runs:
        piece = rows[:, run.block * block_words : (run.block + run.length) * block_words]
        sums += checksum_rows_sums(piece, num_blocks * block_words, run.index * block_words)
    return sums
