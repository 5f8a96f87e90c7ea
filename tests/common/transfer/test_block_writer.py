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


def test_fp8_blocks_land_bit_for_bit_and_a_dtype_mismatch_across_fp8_is_refused() -> None:
    """An FP8 cache takes FP8 blocks byte for byte; FP8 KV into a bf16 cache (or the reverse) would be a cast of
    scaled values, so it is refused with a message naming --kv-cache-dtype, and the cache is left untouched."""
    cache = torch.zeros(CACHE, dtype=torch.float8_e4m3fn)
    kv = random_kv((2, 2, 2, 4, 2, 8), torch.float8_e4m3fn)
    BlockWriter(cache).write([7, 2], kv)
    assert torch.equal(cache[:, :, [7, 2]].view(torch.uint8), kv.view(torch.uint8))
    bf16_cache = torch.zeros(CACHE, dtype=torch.bfloat16)
    for writer, wrong in ((BlockWriter(bf16_cache), kv), (BlockWriter(cache), kv.to(torch.bfloat16))):
        before = writer.cache.clone()
        with pytest.raises(ValueError, match="--kv-cache-dtype"):
            writer.write([3, 4], wrong)
        assert torch.equal(writer.cache.view(torch.uint8), before.view(torch.uint8))
