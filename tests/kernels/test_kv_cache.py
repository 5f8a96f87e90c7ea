"""KV-cache write (reference and Triton): every written slot holds its vector; slot -1 and all other slots stay
untouched."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import write_kv, write_kv_reference, write_kv_triton
from tests.kernels.support import DEVICE, assert_equal_after_cast, requires_triton


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


@requires_triton
@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_write_kv_triton_strided_views(dtype, cache_dtype, gen):
    """K/V as views into a fused qkv output; the cache one layer's view of a [layers, 2, ...] tensor.
    Written slots equal the cast inputs exactly; every other element (other layers too) keeps its poison."""
    layers, num_blocks, block_size, heads, dim = 3, 5, 16, 3, 64  # 3 heads: padded to 4 in the kernel
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots - 1, generator=gen)[:13]
    slot_mapping = torch.cat([slots[:5], torch.tensor([-1]), slots[5:], torch.tensor([-1])]).to(DEVICE)
    qkv = torch.randn(len(slot_mapping), (2 + 2 * heads) * dim, generator=gen).to(DEVICE, dtype)
    k = qkv[:, 2 * dim : (2 + heads) * dim].view(-1, heads, dim)
    v = qkv[:, (2 + heads) * dim :].view(-1, heads, dim)
    kv = torch.full((layers, 2, num_blocks, block_size, heads, dim), float("nan"), dtype=cache_dtype, device=DEVICE)

    write_kv_triton(k, v, kv[1, 0], kv[1, 1], slot_mapping)

    valid = slot_mapping >= 0
    flat = kv[1].view(2, num_slots, heads, dim)
    assert_equal_after_cast(flat[0, slot_mapping[valid]], k[valid].to(cache_dtype))
    assert_equal_after_cast(flat[1, slot_mapping[valid]], v[valid].to(cache_dtype))
    assert kv.isnan().sum() == kv.numel() - 2 * int(valid.sum()) * heads * dim


@pytest.mark.gpu
def test_write_kv_on_cuda_past_2_pow_31_elements(gen):
    """Slots in the top blocks of a per-layer cache of more than 2**31 elements (int64 addressing)."""
    block_size, heads, dim = 16, 8, 128
    num_blocks = 2**31 // (block_size * heads * dim) + 1024
    num_slots = num_blocks * block_size
    slot_mapping = torch.cat([num_slots - 1 - torch.randperm(4096, generator=gen)[:300], torch.tensor([-1])])
    k = torch.randn(len(slot_mapping), heads, dim, generator=gen)
    v = torch.randn(len(slot_mapping), heads, dim, generator=gen)
    kv = torch.full((2, num_blocks, block_size, heads, dim), float("nan"), dtype=torch.bfloat16, device="cuda")

    write_kv(k.cuda(), v.cuda(), kv[0], kv[1], slot_mapping.cuda())

    valid = slot_mapping >= 0
    flat = kv.view(2, num_slots, heads, dim)
    assert torch.equal(flat[0, slot_mapping[valid].cuda()].cpu(), k[valid].to(torch.bfloat16))
    assert torch.equal(flat[1, slot_mapping[valid].cuda()].cpu(), v[valid].to(torch.bfloat16))
    assert kv.isnan().sum().item() == kv.numel() - 2 * int(valid.sum()) * heads * dim
