"""Rotary embedding kernel (in place) vs HF's torch code."""

from __future__ import annotations

import pytest
import torch

from common.models.rotary import compute_inv_freq
from kernels.rotary import apply_rope, rope_reference, rope_triton
from tests.kernels.support import DEVICE, assert_equal_after_cast, requires_triton

LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}  # fmt: skip


def fused_qkv(num_tokens, q_heads, kv_heads, head_dim, dtype, gen):
    """q/k/v as views into one fused projection output, as the model slices them (non-contiguous)."""
    qkv = torch.randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.view(num_tokens, q_heads, head_dim), k.view(num_tokens, kv_heads, head_dim), v


def assert_rope_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 may differ by a fused multiply-add; half types round where torch rounds (on CPU the
    interpreter truncates its casts, so allow a few ulps there)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    elif out.is_cuda:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=2**-6, atol=2**-6)


@requires_triton
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "dtype", "params"),
    [
        (9, 3, 64, torch.float32, {"rope_type": "default", "rope_theta": 10000.0}),  # SmolLM2's shape
        (8, 2, 128, torch.bfloat16, LLAMA3),
    ],
)
def test_rope_kernel_in_place(q_heads, kv_heads, head_dim, dtype, params, gen):
    qkv, q, k, v = fused_qkv(11, q_heads, kv_heads, head_dim, dtype, gen)
    positions = torch.cat([torch.tensor([0, 1, 131071]), torch.randint(0, 40000, (8,), generator=gen)]).to(DEVICE)
    inv_freq = compute_inv_freq(head_dim, params).to(DEVICE)
    ref_q, ref_k = rope_reference(positions, q.clone(), k.clone(), inv_freq)
    v_before = v.clone()

    out_q, out_k = rope_triton(positions, q, k, inv_freq)

    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # rotated in place
    assert_rope_close(out_q, ref_q)
    assert_rope_close(out_k, ref_k)
    assert_equal_after_cast(v, v_before)  # the rest of the fused buffer is untouched


def test_dispatch_is_reference_on_cpu(gen):
    q, k = torch.randn(3, 4, 64, generator=gen), torch.randn(3, 2, 64, generator=gen)
    inv_freq = compute_inv_freq(64, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.tensor([0, 5, 9])
    for got, want in zip(apply_rope(positions, q, k, inv_freq), rope_reference(positions, q, k, inv_freq)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (16, 16, 256)])
def test_dispatch_on_cuda(q_heads, kv_heads, head_dim, dtype, gen):
    qkv, q, k, v = fused_qkv(2049, q_heads, kv_heads, head_dim, dtype, gen)
    positions = torch.randint(0, 131072, (2049,), generator=gen).cuda()
    inv_freq = compute_inv_freq(head_dim, LLAMA3).cuda()
    ref_q, ref_k = rope_reference(positions, q.clone(), k.clone(), inv_freq)
    v_before = v.clone()
    out_q, out_k = apply_rope(positions, q, k, inv_freq)
    assert_rope_close(out_q, ref_q)
    assert_rope_close(out_k, ref_k)
    assert torch.equal(v, v_before)
