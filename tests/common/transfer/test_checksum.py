"""kv_checksum: deterministic, byte-exact, order-sensitive, chunk-independent."""

from __future__ import annotations

import pytest
import torch

from common.transfer.checksum import kv_checksum
from tests.common.transfer.conftest import random_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identical_bytes_identical_checksum(dtype: torch.dtype) -> None:
    a = random_kv((2, 2, 3, 4, 2, 8), dtype, seed=1)
    assert kv_checksum(a) == kv_checksum(a.clone())
    assert 0 <= kv_checksum(a) < 2**64


def test_depends_on_bytes_not_dtype_or_shape() -> None:
    a = random_kv((4, 8), torch.float32)
    assert kv_checksum(a) == kv_checksum(a.view(torch.int32).reshape(32))
    assert kv_checksum(a) == kv_checksum(a.t().contiguous().t())  # same logical tensor, strided view


def test_single_flipped_bit_changes_checksum() -> None:
    a = random_kv((2, 2, 3, 4, 2, 8), torch.bfloat16)
    raw = a.view(torch.uint8).reshape(-1)
    base = kv_checksum(a)
    for index in (0, 1, raw.numel() // 2, raw.numel() - 1):
        for bit in (0, 7):
            flipped = raw.clone()
            flipped[index] ^= 1 << bit
            assert kv_checksum(flipped) != base, (index, bit)


def test_swapped_words_change_checksum() -> None:
    words = random_kv((64,), torch.float32).view(torch.int32)
    swapped = words.clone()
    swapped[[3, 40]] = words[[40, 3]]
    assert kv_checksum(swapped) != kv_checksum(words)


def test_odd_byte_tail_is_covered() -> None:
    a = random_kv((7,), torch.bfloat16)  # 14 bytes: three whole words and a 2-byte tail
    b = a.clone()
    b[-1] = -b[-1]
    assert kv_checksum(a) != kv_checksum(b)
    assert kv_checksum(a[:6]) != kv_checksum(a)  # length is part of the checksum


def test_empty_tensor() -> None:
    assert kv_checksum(torch.empty(0)) == kv_checksum(torch.empty(0, dtype=torch.bfloat16))
