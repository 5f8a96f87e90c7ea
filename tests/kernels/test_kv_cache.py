"""KV-cache write: every written slot holds its vector; slot -1 and all other slots stay untouched."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import write_kv, write_kv_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [write_kv_reference, write_kv])
def test_write_kv(dtype, fn, gen):
    num_blocks, block_size, heads, dim = 6, 16, 3, 64
    num_slots = num_blocks * block_size
    # Unique random slots, never the last one: a buggy write of slot -1 would land exactly there.
    slots = torch.randperm(num_slots - 1, generator=gen)[:20]
    slot_mapping = torch.cat([slots[:7], torch.tensor([-1]), slots[7:], torch.tensor([-1, -1])])
    k = torch.randn(len(slot_mapping), heads, dim, generator=gen)
    v = torch.randn(len(slot_mapping), heads, dim, generator=gen)
    kv = torch.randn(2, num_blocks, block_size, heads, dim, generator=gen).to(dtype)
    before = kv.clone()

    fn(k, v, kv[0], kv[1], slot_mapping)

    flat, old = kv.view(2, num_slots, heads, dim), before.view(2, num_slots, heads, dim)
    valid = slot_mapping >= 0
    torch.testing.assert_close(flat[0, slot_mapping[valid]], k[valid].to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(flat[1, slot_mapping[valid]], v[valid].to(dtype), atol=0, rtol=0)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slot_mapping[valid]] = False
    assert untouched[-1]
    assert torch.equal(flat[:, untouched], old[:, untouched])


def test_write_kv_rejects_non_contiguous_cache(gen):
    """Writing into a copy would silently lose the K/V; the reference must fail loudly instead."""
    cache = torch.zeros(16, 4, 2, 8).transpose(0, 1)  # [blocks, bs, heads, dim], blocks not mergeable
    k = torch.randn(1, 2, 8, generator=gen)
    with pytest.raises(RuntimeError, match="view"):
        write_kv_reference(k, k, cache, cache, torch.tensor([3]))
