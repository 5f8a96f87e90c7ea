"""BlockWriter: received KV lands in exactly the reserved blocks (contiguous run or scattered), nothing else."""

from __future__ import annotations

import pytest
import torch

from common.transfer.block_writer import BlockWriter
from tests.common.transfer.conftest import random_kv

CACHE = (2, 2, 10, 4, 2, 8)


@pytest.mark.parametrize("block_ids", [[3, 4, 5], [7, 1, 4], [9]])
def test_writes_exactly_the_given_blocks(block_ids: list[int]) -> None:
    cache = torch.zeros(CACHE, dtype=torch.bfloat16)
    kv = random_kv((2, 2, len(block_ids), 4, 2, 8), torch.float32)
    BlockWriter(cache).write(block_ids + [0], kv)  # a longer reservation: only the first len(kv) blocks
    for position, block in enumerate(block_ids):
        assert torch.equal(cache[:, :, block], kv[:, :, position].to(torch.bfloat16))
    others = [b for b in range(CACHE[2]) if b not in block_ids]
    assert not cache[:, :, others].any()


def test_refuses_kv_that_does_not_fit() -> None:
    writer = BlockWriter(torch.zeros(CACHE))
    with pytest.raises(ValueError, match="does not fit"):
        writer.write([0, 1], torch.zeros(2, 2, 2, 4, 2, 4))
    with pytest.raises(ValueError, match="reservation holds"):
        writer.write([0], torch.zeros(2, 2, 2, 4, 2, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_write_on_cuda() -> None:
    cache = torch.zeros(CACHE, dtype=torch.bfloat16, device="cuda")
    kv = random_kv((2, 2, 2, 4, 2, 8), torch.bfloat16).cuda()
    BlockWriter(cache).write([6, 2], kv)
    assert torch.equal(cache[:, :, 6], kv[:, :, 0]) and torch.equal(cache[:, :, 2], kv[:, :, 1])
