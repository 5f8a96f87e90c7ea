"""Paged attention: the reference vs naive dense attention, and the Triton kernels vs the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.kv_cache import quantize_kv
from kernels.paged_attention import (
    _decodes_then_prefill,
    causal_attention,
    choose_decode_splits,
    gather_context,
    kernels_support,
    paged_attention,
    paged_attention_reference,
    paged_decode_attention,
    paged_prefill_attention,
)
from tests.kernels.support import DEVICE, assert_close_rel, make_paged_batch, rel_err, requires_triton

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


# --------------------------------------------------------------------------------------------------------
# Triton kernels vs the reference. Small shapes run everywhere (CPU: Triton's interpreter); the full grid,
# 8B-like shapes, >2**31-element caches and CUDA-graph capture need a GPU.
# --------------------------------------------------------------------------------------------------------

NAN = float("nan")


def on_device(md: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    moved = {f: getattr(md, f).to(device) for f in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")}
    return dataclasses.replace(md, **moved)


def poisoned_cache(batch, num_blocks, kv_heads, head_dim, dtype, gen, device=DEVICE):
    """Random K/V at each sequence's positions < seq_len; NaN in every other slot (unowned blocks, block 0
    which pads the block tables, and the tail of each last block): a kernel reading any of them fails."""
    block_size = batch.metadata.block_size
    caches = []
    for _ in range(2):
        cache = torch.full((num_blocks, block_size, kv_heads, head_dim), NAN, dtype=dtype, device=device)
        for own, seq_len in zip(batch.blocks, batch.metadata.seq_lens_cpu):
            if own:
                values = torch.randn(len(own) * block_size, kv_heads, head_dim, generator=gen, device=gen.device)
                values[seq_len:] = NAN
                cache[torch.tensor(own, device=device)] = values.view(len(own), block_size, kv_heads, head_dim).to(
                    device=device, dtype=dtype
                )
        caches.append(cache)
    return caches


def reference_out(q, k_cache, v_cache, md, scale):
    """The reference in float64 (float32 inputs) or float32 (half inputs, as it computes them anyway)."""
    wide = torch.float64 if q.dtype == torch.float32 else torch.float32
    return paged_attention_reference(q.to(wide), k_cache.to(wide), v_cache.to(wide), md, scale)


def check_prefill(query_lens, seq_lens, dtype, head_dim, block_size, kv_heads, group, gen, num_blocks=None):
    needed = sum(-(-s // block_size) for s in seq_lens)
    batch = make_paged_batch(query_lens, seq_lens, block_size, num_blocks or needed + 8, gen)
    md = on_device(batch.metadata, DEVICE)
    k_cache, v_cache = poisoned_cache(batch, num_blocks or needed + 8, kv_heads, head_dim, dtype, gen)
    num_tokens, pad_rows = sum(query_lens), 3
    q = torch.randn(num_tokens + pad_rows, kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, NAN)
    result = paged_prefill_attention(
        q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len, scale, out=out
    )
    assert result is out
    assert_close_rel(out[:num_tokens], reference_out(q, k_cache, v_cache, md, scale)[:num_tokens], dtype)
    assert out[num_tokens:].isnan().all(), "rows past query_start_loc[-1] must not be written"


def check_decode(seq_lens, dtype, head_dim, block_size, kv_heads, group, num_splits, gen, pad_rows=2):
    """Decode rows over the given contexts plus ``pad_rows`` rows of seq_len 0 (CUDA-graph batch padding)."""
    needed = sum(-(-s // block_size) for s in seq_lens)
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, block_size, needed + 8, gen)
    md = on_device(batch.metadata, DEVICE)
    k_cache, v_cache = poisoned_cache(batch, needed + 8, kv_heads, head_dim, dtype, gen)
    rows = len(seq_lens) + pad_rows
    q = torch.randn(rows, kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    seq_lens_dev = torch.cat([md.seq_lens, torch.zeros(pad_rows, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([md.block_tables, torch.zeros(pad_rows, md.block_tables.shape[1], dtype=torch.int32,
                                                     device=DEVICE)])  # fmt: skip
    scale = head_dim**-0.5
    out = torch.full_like(q, NAN)
    paged_decode_attention(q, k_cache, v_cache, seq_lens_dev, tables, scale, num_splits, out=out)
    ref = reference_out(q[: len(seq_lens)], k_cache, v_cache, md, scale)
    assert_close_rel(out[: len(seq_lens)], ref, dtype)
    assert torch.isfinite(out[len(seq_lens) :]).all(), "padding rows (seq_len 0) must come out finite"


@requires_triton
@pytest.mark.parametrize(
    ("dtype", "head_dim", "block_size", "kv_heads", "group"),
    [
        (torch.float32, 64, 16, 2, 1),
        (torch.bfloat16, 128, 32, 1, 8),  # MQA
        (torch.float16, 64, 32, 2, 4),
    ],
)
def test_prefill_kernel_matches_reference(dtype, head_dim, block_size, kv_heads, group, gen):
    query_lens, seq_lens = zip(*MIXED_BATCH)
    check_prefill(list(query_lens), list(seq_lens), dtype, head_dim, block_size, kv_heads, group, gen)


@requires_triton
@pytest.mark.parametrize(
    ("dtype", "head_dim", "block_size", "kv_heads", "group", "num_splits"),
    [
        (torch.float32, 64, 16, 2, 4, 1),
        (torch.bfloat16, 128, 16, 2, 1, 3),
        (torch.float16, 64, 32, 1, 8, 4),
        (torch.float32, 128, 32, 1, 2, 8),  # most splits of the short contexts are empty
    ],
)
def test_decode_kernel_matches_reference(dtype, head_dim, block_size, kv_heads, group, num_splits, gen):
    check_decode([1, 16, 17, 100, 33, 64], dtype, head_dim, block_size, kv_heads, group, num_splits, gen)


@requires_triton
def test_decode_padding_rows_alone_give_zeros(gen):
    """A batch of only seq_len-0 rows (an idle CUDA-graph bucket) reads nothing and writes zeros."""
    q = torch.randn(3, 4, 64, generator=gen).to(DEVICE)
    cache = torch.full((2, 16, 2, 64), NAN, device=DEVICE)
    tables = torch.zeros(3, 4, dtype=torch.int32, device=DEVICE)
    for splits in (1, 4):
        out = paged_decode_attention(q, cache, cache, torch.zeros(3, dtype=torch.int32, device=DEVICE), tables,
                                     0.125, splits)  # fmt: skip
        assert torch.equal(out, torch.zeros_like(q))


def test_choose_decode_splits():
    assert choose_decode_splits(256, 8, 4096, num_sms=132) == 1  # 2048 programs already
    assert choose_decode_splits(1, 8, 32768, num_sms=132) == 32  # capped at MAX_DECODE_SPLITS
    assert choose_decode_splits(1, 8, 700, num_sms=132) == 2  # at most one split per 256 tokens: 3 -> 2
    assert choose_decode_splits(4, 8, None, num_sms=132) == 8  # 2 * 132 / 32 = 8.25 -> 8
    for batch in (1, 3, 16, 64, 1024):
        splits = choose_decode_splits(batch, 2)
        assert 1 <= splits <= 32 and splits & (splits - 1) == 0


GPU_GRID = [
    (dtype, head_dim, block_size, kv_heads, group)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for head_dim in (64, 128)
    for block_size in (16, 32)
    for kv_heads, group in ((4, 1), (2, 4), (8, 4), (1, 8))
]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "kv_heads", "group"), GPU_GRID)
def test_prefill_kernel_grid(dtype, head_dim, block_size, kv_heads, group, gen):
    query_lens = [300, 128, 1, 1, 65, 17, 1, 200]
    seq_lens = [300, 1000, 777, 1, 65, 530, 4096, 231]
    check_prefill(query_lens, seq_lens, dtype, head_dim, block_size, kv_heads, group, gen)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "head_dim", "block_size", "kv_heads", "group"), GPU_GRID)
@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_kernel_grid(dtype, head_dim, block_size, kv_heads, group, num_splits, gen):
    seq_lens = [1, 2, 15, 16, 17, 31, 32, 33, 255, 1000, 2048, 3001]
    check_decode(seq_lens, dtype, head_dim, block_size, kv_heads, group, num_splits, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [2, 3, 16, 32])
def test_decode_kernel_split_counts(num_splits, gen):
    check_decode([1, 7, 64, 129, 5000], torch.bfloat16, 128, 16, 2, 4, num_splits, gen)


def sampled_reference(q, k_cache, v_cache, md, scale, seqs):
    """Reference rows of a few sequences (float32 compute), so huge batches need not be gathered whole."""
    rows = []
    starts = md.query_start_loc.tolist()
    for i in seqs:
        k = gather_context(k_cache, md.block_tables[i], md.seq_lens_cpu[i])
        v = gather_context(v_cache, md.block_tables[i], md.seq_lens_cpu[i])
        rows.append(causal_attention(q[starts[i] : starts[i + 1]].float(), k.float(), v.float(), scale))
    return torch.cat(rows)


def random_filled_cache(num_blocks, block_size, kv_heads, head_dim, dtype, seed):
    """Random K/V everywhere except block 0 (NaN: where padded block tables point); fast for huge caches."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kv = torch.empty(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    for half in kv:
        for chunk in half.split(8192):  # randn in float32 chunks: bounded temporary memory
            chunk.copy_(torch.randn(chunk.shape, generator=gen, device="cuda"))
    kv[:, 0] = NAN
    return kv


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "max_len"), [(64, 32768), (256, 4096)])
def test_decode_8b_shapes(batch, max_len, gen):
    """Llama-3-8B attention (32 q heads, 8 kv heads, dim 128, bf16), long contexts, chosen split counts."""
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    seq_lens[:3] = [max_len, 1, 16 * 37]
    needed = sum(-(-s // 16) for s in seq_lens)
    pb = make_paged_batch([1] * batch, seq_lens, 16, needed + 1, gen)
    md = on_device(pb.metadata, torch.device("cuda"))
    k_cache, v_cache = random_filled_cache(needed + 1, 16, 8, 128, torch.bfloat16, seed=batch)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    splits = choose_decode_splits(batch, 8, max_len)
    out = paged_decode_attention(q, k_cache, v_cache, md.seq_lens, md.block_tables, 128**-0.5, splits)
    assert torch.isfinite(out).all()
    seqs = [0, 1, 2, *range(3, batch, max(batch // 13, 1))]
    expected = sampled_reference(q, k_cache, v_cache, md, 128**-0.5, seqs)
    assert_close_rel(out[seqs], expected, torch.bfloat16)


@pytest.mark.gpu
def test_prefill_8b_shapes(gen):
    """Long prompts and a chunk over a long cached prefix at the 8B attention shape."""
    query_lens, seq_lens = [4096, 2048, 1, 333], [4096, 18000, 9000, 333]
    needed = sum(-(-s // 16) for s in seq_lens)
    pb = make_paged_batch(query_lens, seq_lens, 16, needed + 1, gen)
    md = on_device(pb.metadata, torch.device("cuda"))
    k_cache, v_cache = random_filled_cache(needed + 1, 16, 8, 128, torch.bfloat16, seed=7)
    q = torch.randn(sum(query_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_attention(q, k_cache, v_cache, md, 128**-0.5)
    assert_close_rel(out, sampled_reference(q, k_cache, v_cache, md, 128**-0.5, range(4)), torch.bfloat16)


@pytest.mark.gpu
def test_cache_offsets_past_2_pow_31(gen):
    """A per-layer cache of more than 2**31 elements, the sequences' blocks at its top: int64 addressing."""
    block_size, kv_heads, head_dim = 16, 8, 128
    num_blocks = 2**31 // (block_size * kv_heads * head_dim) + 4096
    seq_lens = [5000, 3000, 1]
    needed = sum(-(-s // block_size) for s in seq_lens)
    pb = make_paged_batch([1, 40, 1], seq_lens, block_size, num_blocks, gen, lowest_block=num_blocks - needed)
    md = on_device(pb.metadata, torch.device("cuda"))
    kv = torch.empty(2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    kv[:, num_blocks - needed :].normal_()
    q = torch.randn(sum(md.query_lens_cpu), 32, head_dim, device="cuda", dtype=torch.bfloat16)
    out = paged_attention(q, kv[0], kv[1], md, 0.1)
    assert_close_rel(out, sampled_reference(q, kv[0], kv[1], md, 0.1, range(3)), torch.bfloat16)
    decode_q = torch.randn(3, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    decode_md = dataclasses.replace(md, query_start_loc=torch.arange(4, dtype=torch.int32, device="cuda"),
                                    query_lens_cpu=(1, 1, 1))  # fmt: skip
    out = paged_decode_attention(decode_q, kv[0], kv[1], md.seq_lens, md.block_tables, 0.1, 4)
    assert_close_rel(out, sampled_reference(decode_q, kv[0], kv[1], decode_md, 0.1, range(3)), torch.bfloat16)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_decodes_take_the_decode_kernel_and_the_rest_the_prefill_kernel(dtype, gen):
    """A mixed batch split in two launches equals the reference on every row (decodes first, then a chunk
    over a cached prefix, a fresh prompt and one more decode that stays in the prefill launch)."""
    query_lens, seq_lens = [1, 1, 1, 9, 17, 1], [40, 1, 77, 30, 17, 20]
    batch = make_paged_batch(query_lens, seq_lens, 16, 32, gen)
    md = on_device(batch.metadata, DEVICE)
    assert md.num_leading_decodes == 3
    k_cache, v_cache = poisoned_cache(batch, 32, 2, 64, dtype, gen)
    q = torch.randn(sum(query_lens), 8, 64, generator=gen).to(DEVICE, dtype)
    out = _decodes_then_prefill(q, k_cache, v_cache, md, 0.125)
    assert_close_rel(out, reference_out(q, k_cache, v_cache, md, 0.125), dtype)


@pytest.mark.gpu
def test_dispatch_on_cuda_matches_reference(gen):
    """paged_attention picks the prefill kernel for mixed batches and the decode kernel for pure decodes
    (with or without a fixed split count), and zeroes trailing rows like the reference."""
    for query_lens, seq_lens in (([37, 20, 1], [37, 70, 45]), ([1, 1, 1], [300, 1, 65]), ([1, 1, 30], [90, 5, 30])):
        batch = make_paged_batch(query_lens, seq_lens, 16, 64, gen)
        k_cache, v_cache = poisoned_cache(batch, 64, 2, 64, torch.bfloat16, gen)
        q = torch.randn(sum(query_lens), 8, 64, generator=gen).to("cuda", torch.bfloat16)
        for splits in (None, 3):
            md = dataclasses.replace(on_device(batch.metadata, torch.device("cuda")), num_decode_splits=splits)
            out = paged_attention(q, k_cache, v_cache, md, 0.125)
            assert_close_rel(out, reference_out(q, k_cache, v_cache, md, 0.125), torch.bfloat16)


@pytest.mark.gpu
def test_decode_kernel_under_cuda_graph(gen):
    """Captured once, replayed with new lengths, block tables and queries: no host values baked in."""
    block_size, num_blocks, width, rows = 16, 256, 32, 6
    kv = torch.randn(2, num_blocks, block_size, 2, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(rows, 8, 64, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.ones(rows, dtype=torch.int32, device="cuda")
    tables = torch.zeros(rows, width, dtype=torch.int32, device="cuda")
    paged_decode_attention(q, kv[0], kv[1], seq_lens, tables, 0.125, 4)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kv[0], kv[1], seq_lens, tables, 0.125, 4)
    for lens in ([5, 500, 17, 0, 1, 0], [512, 3, 0, 0, 100, 64]):
        batch = make_paged_batch([1] * rows, lens, block_size, num_blocks, gen)
        md = on_device(batch.metadata, torch.device("cuda"))
        seq_lens.copy_(md.seq_lens)
        tables.zero_()
        tables[:, : md.block_tables.shape[1]] = md.block_tables
        q.normal_()
        graph.replay()
        live = [i for i, n in enumerate(lens) if n]
        expected = sampled_reference(q, kv[0], kv[1], md, 0.125, live)
        assert_close_rel(out[live], expected, torch.bfloat16)
        assert torch.equal(out[[i for i, n in enumerate(lens) if not n]], torch.zeros_like(out[:2]))


@requires_triton
def test_warm_up_launches_every_tile_height_and_split_count_and_leaves_the_cache_alone(gen):
    from kernels.paged_attention import MAX_DECODE_SPLITS, prefill_tiles, warm_up_attention_kernels

    k_cache = torch.randn(4, 4, 2, 64, generator=gen).to(DEVICE)  # [blocks, block_size, kv_heads, head_dim]
    v_cache = torch.randn(4, 4, 2, 64, generator=gen).to(DEVICE)  # block size 4: the longest query spans 4 blocks
    before = k_cache.clone(), v_cache.clone()

    launches = warm_up_attention_kernels(8, k_cache, v_cache)

    tile_heights = prefill_tiles(64, torch.float32).rows // 4  # group 4: rows // group_pad query tokens
    assert launches == tile_heights.bit_length() + MAX_DECODE_SPLITS.bit_length()
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def compiled_variants(kernel) -> int:
    """How many specializations of a Triton kernel this process has compiled (Triton's per-device caches)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.gpu
def test_mixed_batches_compile_nothing_after_the_warm_up(gen):
    """After warm_up_attention_kernels, mixed steps of any shape launch only variants it compiled: an odd number
    of leading decodes (metadata rows at unaligned addresses) and block tables of any width (3, 7, 33, 16
    blocks here) must not specialize a new kernel, which on a cold cache stalled serving for seconds."""
    from kernels import paged_attention as pa

    kv = torch.randn(2, 512, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    pa.warm_up_attention_kernels(32, kv[0], kv[1])
    before = compiled_variants(pa._prefill_kernel), compiled_variants(pa._decode_split_kernel)
    for decodes, (chunk, context) in [(1, (40, 40)), (2, (3, 100)), (3, (300, 520)), (5, (17, 250)), (6, (9, 9))]:
        query_lens = [1] * decodes + [chunk]
        seq_lens = [16 * (i + 1) + 1 for i in range(decodes)] + [context]
        md = on_device(make_paged_batch(query_lens, seq_lens, 16, 512, gen).metadata, torch.device("cuda"))
        q = torch.randn(sum(query_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
        out = paged_attention(q, kv[0], kv[1], md, 0.1)
        assert_close_rel(out, sampled_reference(q, kv[0], kv[1], md, 0.1, range(decodes + 1)), torch.bfloat16)
    torch.cuda.synchronize()
    assert (compiled_variants(pa._prefill_kernel), compiled_variants(pa._decode_split_kernel)) == before


# ---------------------------------------------------------------------------------------------------------
# FP8 (e4m3) KV cache with per-tensor scales
# ---------------------------------------------------------------------------------------------------------

K_SCALE, V_SCALE = 0.05, 0.02  # not 1.0, so a scale dropped or swapped anywhere shows; randn / 0.05 fits 448
# ||out - float64 attention over the original (unquantized) K/V|| / ||that||: e4m3 keeps 3 mantissa bits, so each
# cached element carries up to 2^-4 relative rounding error (about 2^-6 on average); through the softmax and the
# weighted sum of V this comes to 2.8-3.3% measured here (any q dtype). Ceiling for every q dtype:
FP8_VS_UNQUANTIZED = 0.05


def fp8_case(batch, kv_heads, head_dim, gen):
    """A NaN-poisoned float32 cache pair and its e4m3 quantization (NaN stays NaN, so poisoning survives)."""
    num_blocks = max(max(own, default=0) for own in batch.blocks) + 2
    k_exact, v_exact = poisoned_cache(batch, num_blocks, kv_heads, head_dim, torch.float32, gen)
    return (k_exact, v_exact), (quantize_kv(k_exact, K_SCALE), quantize_kv(v_exact, V_SCALE))


def dequantized_reference(q, k_fp8, v_fp8, md, scale):
    """float64 attention over the dequantized cache (``fp8.float() * scale``): what the kernels must compute."""
    k, v = (cache.double() * s for cache, s in ((k_fp8, K_SCALE), (v_fp8, V_SCALE)))
    return paged_attention_reference(q.double(), k, v, md, scale)


def run_fp8_kernel(kind, q, k_fp8, v_fp8, md, scale, num_splits):
    if kind == "prefill":
        return paged_prefill_attention(q, k_fp8, v_fp8, md.query_start_loc, md.seq_lens, md.block_tables,
                                       md.max_query_len, scale, kv_scales=(K_SCALE, V_SCALE))  # fmt: skip
    return paged_decode_attention(q, k_fp8, v_fp8, md.seq_lens, md.block_tables, scale, num_splits,
                                  kv_scales=(K_SCALE, V_SCALE))  # fmt: skip


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("kind", "head_dim", "block_size", "kv_heads", "group", "num_splits"),
    [("prefill", 64, 16, 2, 3, 1), ("decode", 64, 16, 2, 4, 1), ("decode", 128, 32, 1, 2, 3)],
)
def test_fp8_cache_kernels_match_the_dequantized_reference(
    dtype, kind, head_dim, block_size, kv_heads, group, num_splits, gen
):
    """Against float64 attention over the dequantized cache the kernels keep the query dtype's usual tolerance
    (REL_TOLERANCE: the e4m3 -> q dtype conversion is exact and the scales are folded, not rounded); against the
    unquantized K/V the quantization error shows, bounded by FP8_VS_UNQUANTIZED."""
    lens = MIXED_BATCH if kind == "prefill" else [(1, s) for s in (1, 16, 17, 100, 33, 64)]
    query_lens, seq_lens = (list(x) for x in zip(*lens))
    batch = make_paged_batch(query_lens, seq_lens, block_size, sum(-(-s // block_size) for s in seq_lens) + 4, gen)
    md = on_device(batch.metadata, DEVICE)
    (k_exact, v_exact), (k_fp8, v_fp8) = fp8_case(batch, kv_heads, head_dim, gen)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    scale = head_dim**-0.5
    out = run_fp8_kernel(kind, q, k_fp8, v_fp8, md, scale, num_splits)
    assert_close_rel(out, dequantized_reference(q, k_fp8, v_fp8, md, scale), dtype)
    unquantized = paged_attention_reference(q.double(), k_exact.double(), v_exact.double(), md, scale)
    err = rel_err(out, unquantized)
    assert err < FP8_VS_UNQUANTIZED, f"relative error {err:.3g} vs the unquantized cache"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_cache_reference_dequantizes_on_read(dtype, gen):
    """The reference (what CPU runs) over an FP8 cache = float64 attention over ``fp8.float() * scale``."""
    query_lens, seq_lens = (list(x) for x in zip(*MIXED_BATCH))
    batch = make_paged_batch(query_lens, seq_lens, 16, 40, gen)
    (_, _), (k_fp8, v_fp8) = fp8_case(batch, 2, 64, gen)
    q = torch.randn(sum(query_lens), 4, 64, generator=gen).to(dtype)
    out = paged_attention(q, k_fp8, v_fp8, batch.metadata, 0.125, K_SCALE, V_SCALE)
    assert out.dtype == dtype
    assert_close_rel(out, dequantized_reference(q, k_fp8, v_fp8, batch.metadata, 0.125), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache_dispatch_on_cuda_matches_reference(dtype, gen):
    """On CUDA (capability 8.9+) the dispatcher runs the FP8 kernels: mixed batch and pure decode."""
    assert kernels_support(torch.empty(1, 1, 128, dtype=dtype, device="cuda"),
                           *(torch.empty(1, 16, 1, 128, dtype=torch.float8_e4m3fn, device="cuda"),) * 2)  # fmt: skip
    for lens in (MIXED_BATCH, [(1, s) for s in (5, 300, 1000, 64)]):
        query_lens, seq_lens = (list(x) for x in zip(*lens))
        batch = make_paged_batch(query_lens, seq_lens, 16, 100, gen)
        md = on_device(batch.metadata, DEVICE)
        (_, _), (k_fp8, v_fp8) = fp8_case(batch, 8, 128, gen)
        q = torch.randn(sum(query_lens), 32, 128, generator=gen).to(DEVICE, dtype)
        out = paged_attention(q, k_fp8, v_fp8, md, 128**-0.5, K_SCALE, V_SCALE)
        assert_close_rel(out, dequantized_reference(q, k_fp8, v_fp8, md, 128**-0.5), dtype)
