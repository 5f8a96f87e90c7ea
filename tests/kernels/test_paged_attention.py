"""Reference paged attention vs naive dense attention over contiguous K/V."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention, paged_attention_reference

# (query_len, seq_len): fresh prefill, prefill chunk over a cached prefix, decodes, a short chunk.
MIXED_BATCH = [(37, 37), (20, 70), (1, 45), (1, 1), (5, 33), (1, 64)]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 textbook attention of the last len(q) positions over contiguous k/v (GQA by repeat)."""
    q_len, seq_len = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(rep, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def build_case(batch, kv_heads, rep, head_dim, dtype, gen):
    """Random q and per-sequence contiguous k/v, scattered into a NaN-poisoned paged cache."""
    num_heads = kv_heads * rep
    seqs = [
        (torch.randn(s, kv_heads, head_dim, generator=gen), torch.randn(s, kv_heads, head_dim, generator=gen))
        for s in batch.metadata.seq_lens_cpu
    ]
    num_blocks, block_size = 64, batch.metadata.block_size
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for (k, v), own in zip(seqs, batch.blocks):
        for pos in range(k.shape[0]):  # only positions < seq_len are filled: the rest stays NaN
            k_cache[own[pos // block_size], pos % block_size] = k[pos].to(dtype)
            v_cache[own[pos // block_size], pos % block_size] = v[pos].to(dtype)
    q = torch.randn(sum(batch.metadata.query_lens_cpu), num_heads, head_dim, generator=gen).to(dtype)
    return q, seqs, k_cache, v_cache


def expected_output(q, seqs, query_lens, scale):
    rows, start = [], 0
    for (k, v), q_len in zip(seqs, query_lens):
        rows.append(dense_attention(q[start : start + q_len], k, v, scale))
        start += q_len
    return torch.cat(rows)


@pytest.mark.parametrize("rep", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reference_matches_dense(rep, head_dim, block_size, paged_batch, gen):
    query_lens, seq_lens = zip(*MIXED_BATCH)
    batch = paged_batch(list(query_lens), list(seq_lens), block_size, 64, gen)
    q, seqs, k_cache, v_cache = build_case(batch, 2, rep, head_dim, torch.float32, gen)
    scale = head_dim**-0.5
    out = paged_attention_reference(q, k_cache, v_cache, batch.metadata, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "a NaN-poisoned slot was read"
    torch.testing.assert_close(out.double(), expected_output(q, seqs, query_lens, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_dense(dtype, paged_batch, gen):
    query_lens, seq_lens = zip(*MIXED_BATCH)
    batch = paged_batch(list(query_lens), list(seq_lens), 16, 64, gen)
    q, seqs, k_cache, v_cache = build_case(batch, 2, 4, 64, dtype, gen)
    # The dense reference sees the same rounded inputs the cache holds.
    seqs = [(k.to(dtype).float(), v.to(dtype).float()) for k, v in seqs]
    out = paged_attention(q, k_cache, v_cache, batch.metadata, 0.125)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = expected_output(q.float(), seqs, query_lens, 0.125)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_dispatch_equals_reference(paged_batch, gen):
    batch = paged_batch([3, 1], [10, 7], 16, 8, gen)
    q, _, k_cache, v_cache = build_case(batch, 1, 2, 64, torch.float32, gen)
    ref = paged_attention_reference(q, k_cache, v_cache, batch.metadata, 0.1)
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, batch.metadata, 0.1), ref)


def test_does_not_sync_or_read_device_tensors_for_control_flow(paged_batch, gen):
    """Control flow uses only the host tuples: lengths on the device tensors may be garbage."""
    batch = paged_batch([4, 1], [9, 20], 16, 8, gen)
    q, seqs, k_cache, v_cache = build_case(batch, 2, 2, 64, torch.float32, gen)
    md = batch.metadata
    garbage = type(md)(
        md.slot_mapping,
        md.query_start_loc * 0,
        md.seq_lens * 0,
        md.block_tables,
        md.query_lens_cpu,
        md.seq_lens_cpu,
        md.block_size,
    )
    out = paged_attention_reference(q, k_cache, v_cache, garbage, 0.1)
    torch.testing.assert_close(out.double(), expected_output(q, seqs, (4, 1), 0.1), atol=1e-5, rtol=1e-5)
