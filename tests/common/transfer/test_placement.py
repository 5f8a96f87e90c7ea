"""placement: the piece list both ends derive from a header, and sums over landed pieces."""

from __future__ import annotations

import pytest
import torch

from common.transfer.checksum import kv_checksum_sums
from common.transfer.placement import (
    MAX_DIRECT_RUNS,
    BlockRun,
    block_runs,
    cache_piece_sums,
    fits_cache,
    piece_runs,
    pieces,
)
from tests.common.transfer.conftest import random_kv


def test_block_runs_split_at_every_break_in_consecutive_ids() -> None:
    assert block_runs([5, 6, 7, 2, 3, 9, 8]) == [
        BlockRun(0, 5, 3),
        BlockRun(3, 2, 2),
        BlockRun(5, 9, 1),
        BlockRun(6, 8, 1),
    ]
    assert block_runs([]) == []


def test_piece_runs_fall_back_to_one_op_when_runs_are_many_or_blocks_not_whole_words() -> None:
    shape = (2, 2, 5, 4, 2, 8)
    assert piece_runs(shape, 2, [0, 1, 2, 3, 4]) == [BlockRun(0, 0, 5)]
    assert piece_runs(shape, 2, [8, 6, 4, 2, 0]) is None  # five runs > MAX_DIRECT_RUNS
    assert MAX_DIRECT_RUNS == 4
    assert piece_runs((2, 2, 5, 1, 1, 3), 2, [0, 1, 2, 3, 4]) is None  # 6-byte blocks: not whole words
    assert piece_runs((2, 2, 0, 4, 2, 8), 2, []) is None  # nothing to send
    assert piece_runs((2, 2, 5, 4, 2), 2, [0, 1, 2, 3, 4]) is None  # not the KV layout


@pytest.mark.parametrize(
    ("dtype", "block_shape", "ids"),
    [
        (torch.bfloat16, (3, 1, 2), [7, 8, 2, 3, 4]),  # 12-byte blocks, two runs
        (torch.float32, (5, 3, 1), [10, 0, 1, 11]),  # odd element count, three runs
        (torch.uint8, (4, 1, 1), [3, 4, 5, 6]),  # one 4-byte word per block
    ],
)
def test_sums_over_landed_pieces_equal_the_sent_tensors_sums(dtype, block_shape, ids) -> None:  # noqa: ANN001
    cache = random_kv((3, 2, 12, *block_shape), torch.float32, seed=len(ids)).to(dtype)
    kv = random_kv((3, 2, len(ids), *block_shape), torch.float32, seed=99).to(dtype)
    runs = piece_runs(kv.shape, kv.element_size(), ids)
    assert runs is not None and fits_cache(cache, kv.shape, kv.dtype, ids)
    for target, source in zip(pieces(cache, runs, by_block_id=True), pieces(kv, runs, by_block_id=False), strict=True):
        assert target.is_contiguous() and source.is_contiguous()
        target.copy_(source)  # what the recvs do
    assert torch.equal(cache[:, :, ids], kv)
    assert cache_piece_sums(cache, runs, len(ids)).tolist() == kv_checksum_sums(kv).tolist()


def test_fits_cache_needs_same_dtype_layout_and_ids_in_range() -> None:
    cache = torch.zeros(2, 2, 8, 4, 2, 8, dtype=torch.bfloat16)
    assert fits_cache(cache, (2, 2, 3, 4, 2, 8), torch.bfloat16, [5, 6, 7])
    assert not fits_cache(cache, (2, 2, 3, 4, 2, 8), torch.float16, [5, 6, 7])
    assert not fits_cache(cache, (2, 2, 3, 4, 1, 8), torch.bfloat16, [5, 6, 7])
    assert not fits_cache(cache, (2, 2, 3, 4, 2, 8), torch.bfloat16, [6, 7, 8])
    assert not fits_cache(cache[:, :, ::2], (2, 2, 3, 4, 2, 8), torch.bfloat16, [0, 1, 2])
