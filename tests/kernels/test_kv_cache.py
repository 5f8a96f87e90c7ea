"""KV-cache write (reference and Triton): every written slot holds its vector; slot -1 and all other slots stay
untouched."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import FP8_DTYPE, FP8_MAX
from kernels.kv_cache import quantize_kv, write_kv, write_kv_reference, write_kv_triton
from tests.kernels.support import CUDA, DEVICE, assert_equal_after_cast, requires_triton


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


INTERPRETER_EXACT_SCALES = (2**-4, 2**-5)  # powers of two: e4m3 grid points times these divide back exactly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fn", [write_kv_reference, pytest.param(write_kv_triton, marks=requires_triton)])
def test_write_kv_fp8_quantizes_with_the_scales(dtype, fn, gen):
    """An e4m3 cache gets ``clamp(x / scale, +-448)`` (values past 448 * scale saturate instead of turning NaN),
    bit-equal to ``quantize_kv``; dequantized it is within e4m3's 2^-4 relative rounding of the input (2^-10 of
    the scale near zero). Other slots keep their bytes.

    Triton's CPU interpreter converts float32 -> e4m3 wrongly when rounding carries into the exponent (1.95 ->
    1.0, not 2.0) and rounds ties away from zero, so under the interpreter the kernel gets inputs on the e4m3
    grid (power-of-two scales: no rounding at all) and only CUDA checks the kernel's rounding."""
    num_blocks, block_size, heads, dim = 4, 16, 3, 64
    num_slots = num_blocks * block_size
    on_grid = fn is write_kv_triton and not CUDA
    k_scale, v_scale = INTERPRETER_EXACT_SCALES if on_grid else (0.05, 0.02)
    slot_mapping = torch.cat([torch.randperm(num_slots - 1, generator=gen)[:9], torch.tensor([-1])]).to(DEVICE)
    k, v = ((torch.randn(len(slot_mapping), heads, dim, generator=gen) * 3).to(DEVICE, dtype) for _ in range(2))
    if on_grid:
        k, v = (quantize_kv(x, s).to(dtype) * s for x, s in ((k, k_scale), (v, v_scale)))
    k[0, 0, :2] = torch.tensor([1e4, -1e4])  # past 448 * k_scale: saturates to +-448
    poison = torch.full((2, num_blocks, block_size, heads, dim), float("nan"), device=DEVICE).to(FP8_DTYPE)
    kv = poison.clone()

    fn(k, v, kv[0], kv[1], slot_mapping, k_scale, v_scale)

    valid = slot_mapping >= 0
    flat = kv.view(2, num_slots, heads, dim)
    for index, (x, s) in enumerate(((k, k_scale), (v, v_scale))):
        written = flat[index, slot_mapping[valid]]
        assert torch.equal(written.view(torch.uint8), quantize_kv(x[valid], s).view(torch.uint8))
        exact = x[valid].double().clamp(-FP8_MAX * s, FP8_MAX * s)
        assert ((written.double() * s - exact).abs() <= exact.abs() * 2**-4 + s * 2**-10).all()
    assert flat[0, slot_mapping[0], 0, :2].float().tolist() == [FP8_MAX, -FP8_MAX]
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEVICE)
    untouched[slot_mapping[valid]] = False
    assert torch.equal(flat[:, untouched].view(torch.uint8), poison.view(2, num_slots, heads, dim)[:, untouched]
                       .view(torch.uint8))  # fmt: skip
