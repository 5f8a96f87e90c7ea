"""Paged attention over a varlen batch mixing prefill chunks (with cached prefix) and decodes.

Cache layout (per layer, per K or V): ``[num_blocks, block_size, num_kv_heads, head_dim]``.
Sequence i's context position p lives in block ``block_tables[i, p // block_size]`` at offset
``p % block_size``. See ``kernels.attention_metadata.AttentionMetadata`` for the batch layout.

An FP8 (e4m3) cache is read as ``cache.float() * scale`` with per-layer ``k_scale`` / ``v_scale`` (see
``kernels.kv_cache``). The kernels convert the e4m3 tiles to the query dtype (exact: every e4m3 value is a
float16/bfloat16 value), fold ``k_scale`` into the softmax scale and apply ``v_scale`` to the normalized output,
which is the same attention; the references dequantize on read. Non-FP8 caches ignore the scales.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention_metadata import AttentionMetadata
from kernels.fp8 import FP8_DTYPE
from kernels.triton_import import HAS_TRITON, tl, triton

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Contiguous ``[seq_len, num_kv_heads, head_dim]`` view of one sequence's cached positions [0, seq_len).

    Reads only the first ``ceil(seq_len / block_size)`` blocks of ``block_table``.
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:seq_len]


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached K or V in ``dtype``: an FP8 tensor times its scale (in float32 first), anything else just cast."""
    if x.dtype == FP8_DTYPE:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last ``len(q)`` positions of a context over the whole context ``k``/``v``.

    ``q``: ``[q_len, num_heads, dim]``, ``k``/``v``: ``[seq_len, num_kv_heads, dim]`` with
    ``seq_len >= q_len``; query row j sits at position ``seq_len - q_len + j`` and sees keys
    ``0 .. seq_len - q_len + j``. Query head h uses kv head ``h // (num_heads // num_kv_heads)``.
    Low-precision inputs are computed in float32; the result has ``q``'s dtype.
    """
    q_len, seq_len = q.shape[0], k.shape[0]
    compute_dtype = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    qt, kt, vt = (x.transpose(0, 1).to(compute_dtype) for x in (q, k, v))
    mask = None
    if q_len > 1:  # a single query (decode) sees the whole context: no mask needed
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=q.device)[None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1).to(q.dtype)


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-torch reference: decodes in one padded batch, prefill chunks one sequence at a time.

    ``q`` is ``[num_tokens, num_heads, head_dim]``; returns the same shape. Uses only the host
    tuples ``query_lens_cpu``/``seq_lens_cpu`` for control flow, so it never syncs the device.
    Rows not owned by any sequence (trailing padding) are zero.
    """
    out = torch.zeros_like(q)
    decode_seqs, decode_rows = [], []
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(attn_metadata.query_lens_cpu, attn_metadata.seq_lens_cpu)):
        if q_len == 1:
            decode_seqs.append(i)
            decode_rows.append(start)
        else:
            block_table = attn_metadata.block_tables[i]
            compute_dtype = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
            k = dequantize_kv(gather_context(k_cache, block_table, seq_len), k_scale, compute_dtype)
            v = dequantize_kv(gather_context(v_cache, block_table, seq_len), v_scale, compute_dtype)
            out[start : start + q_len] = causal_attention(q[start : start + q_len], k, v, scale)
        start += q_len
    if decode_seqs:
        rows = torch.tensor(decode_rows, device=q.device)
        out[rows] = batched_decode_attention(
            q.index_select(0, rows), k_cache, v_cache, attn_metadata, decode_seqs, scale, k_scale, v_scale
        )
    return out


def batched_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_metadata: AttentionMetadata,
    seqs: list[int],
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query per sequence over its whole context, all sequences in one masked SDPA call.

    Contexts are gathered padded to the longest; positions at or past a sequence's length are masked out,
    so whatever the padding blocks hold is never used. ``q``: ``[len(seqs), num_heads, dim]``.
    """
    block_size = k_cache.shape[1]
    max_len = max(attn_metadata.seq_lens_cpu[i] for i in seqs)
    num_blocks = -(-max_len // block_size)
    index = torch.tensor(seqs, device=q.device)
    tables = attn_metadata.block_tables.index_select(0, index)[:, :num_blocks].long()
    lengths = torch.tensor([attn_metadata.seq_lens_cpu[i] for i in seqs], device=q.device)
    compute_dtype = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    k = dequantize_kv(k_cache[tables], k_scale, compute_dtype).flatten(1, 2).transpose(1, 2)  # [B, kv_heads, L, dim]
    v = dequantize_kv(v_cache[tables], v_scale, compute_dtype).flatten(1, 2).transpose(1, 2)
    mask = torch.arange(num_blocks * block_size, device=q.device)[None, :] < lengths[:, None]
    # Padding rows may hold anything (even NaN): zero them so 0-weight x garbage cannot poison the sum.
    hidden = ~mask[:, None, :, None]
    k, v = k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)
    qb = q.to(compute_dtype)[:, :, None, :]  # [B, heads, 1, dim]
    result = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return result[:, :, 0, :].to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention for every query row of the batch over its sequence's cached context.

    Invariant: this step's K/V are already in the cache (``write_kv`` ran first), and only cache
    positions ``[0, seq_len)`` of each sequence are read. Returns ``[num_tokens, num_heads, head_dim]``.
    CUDA tensors go to the Triton kernels: the split-KV decode kernel when every query length is 1
    (splits from ``attn_metadata.num_decode_splits`` when set, which CUDA graphs need, else
    ``choose_decode_splits``), the varlen prefill kernel otherwise. Everything else uses the reference.
    """
    if not (q.is_cuda and kernels_support(q, k_cache, v_cache)):
        return paged_attention_reference(q, k_cache, v_cache, attn_metadata, scale, k_scale, v_scale)
    md = attn_metadata
    kv_scales = (k_scale, v_scale)
    with torch.cuda.device(q.device):  # Triton launches on the current device
        if md.is_pure_decode and q.shape[0] == md.num_seqs:
            num_splits = getattr(md, "num_decode_splits", None)
            if num_splits is None:
                num_splits = choose_decode_splits(md.num_seqs, k_cache.shape[2], md.max_seq_len)
            return paged_decode_attention(
                q, k_cache, v_cache, md.seq_lens, md.block_tables, scale, num_splits, kv_scales=kv_scales
            )
        if 0 < md.num_leading_decodes < md.num_seqs:
            out = _decodes_then_prefill(q, k_cache, v_cache, md, scale, kv_scales)
        else:
            out = paged_prefill_attention(
                q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len, scale,
                kv_scales=kv_scales,
            )  # fmt: skip
    num_tokens = md.num_tokens
    if num_tokens < out.shape[0]:
        out[num_tokens:] = 0  # trailing padding rows, as the reference leaves them
    return out


def _decodes_then_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """A mixed batch: its leading decode rows through the split-KV decode kernel, the rest (prefill chunks)
    through the prefill kernel. In the prefill kernel a decode row would fill a whole query tile with one
    token and make every tile of its context cost a full matmul."""
    decodes = md.num_leading_decodes
    out = torch.empty_like(q)
    splits = choose_decode_splits(decodes, k_cache.shape[2], md.max_seq_len)
    paged_decode_attention(
        q[:decodes],
        k_cache,
        v_cache,
        md.seq_lens[:decodes],
        md.block_tables[:decodes],
        scale,
        splits,
        out=out[:decodes],
        kv_scales=kv_scales,
    )
    rest_lens = md.query_lens_cpu[decodes:]
    paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        md.query_start_loc,
        md.seq_lens,
        md.block_tables,
        max(rest_lens),
        scale,
        out=out,
        first_seq=decodes,
        kv_scales=kv_scales,
    )
    return out


# ---------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: decode pads a group's query heads up to this
MAX_DECODE_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write, reduce) dominates
DEFAULT_NUM_SMS = 132  # H100 SXM, used when no CUDA device can be asked


@dataclass(frozen=True)
class TileConfig:
    """Static tile shape and launch options of one attention kernel variant."""

    rows: int  # query rows per program (tokens x heads of one kv group)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


def prefill_tiles(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Fixed tiles per head dim (no autotuning, so each shape compiles once). float32 tiles are halved to
    fit registers and shared memory."""
    if dtype == torch.float32:
        return TileConfig(rows=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return TileConfig(rows=128, block_n=64, num_warps=4, num_stages=3)
    # H200, 32/8 heads, bf16 (benchmarks/attention_kernels.py --prefill-sweep, 24 configs, 2026-12-01): 256 rows
    # (64 tokens x 4 heads), block_n 64, 8 warps, 3 stages: 311 TFLOP/s at 4 x 2048 and 407 at 1 x 8192, against
    # 286 / 340 for the former 128/32/8/2 (H100: 288 at 4 x 2048). 4 warps with 256 rows spill (~100).
    return TileConfig(rows=256, block_n=64, num_warps=8, num_stages=3)


def decode_tiles(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Decode is memory-bound: few rows, deep pipelining of the K/V tile loads. On an H100 (batch 64, 32/8
    heads, dim 128, bf16) this reaches 2.5 TB/s at 1K context and 2.9 at 4K; other shapes were within 2%."""
    block_n = 32 if dtype == torch.float32 and head_dim > 64 else 64
    return TileConfig(rows=MIN_DOT_ROWS, block_n=block_n, num_warps=4, num_stages=3)


def kernels_support(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these operands; otherwise callers use the reference. The cache holds
    the query dtype, or FP8 where the device converts e4m3 (compute capability 8.9+, or the CPU interpreter)."""
    head_dim = q.shape[-1]
    return (
        HAS_TRITON
        and q.dtype in _KERNEL_DTYPES
        and k_cache.dtype == v_cache.dtype
        and (k_cache.dtype == q.dtype or (k_cache.dtype == FP8_DTYPE and _converts_fp8(k_cache.device)))
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and q.stride(-1) == 1
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
    )


def _converts_fp8(device: torch.device) -> bool:
    """Triton's e4m3 (float8e4nv) conversions need Ada/Hopper or newer; the CPU interpreter has them too."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products for float32 inputs (tf32 would cost ~1e-3 relative error). "upcast" works
    around Triton's CPU interpreter, which multiplies bfloat16 ``tl.dot`` operands as raw bits."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    first_seq: int = 0,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Varlen causal attention of every query row over its sequence's paged context (Triton).

    Same contract as ``paged_attention_reference`` for any mix of query lengths >= 1; ``max_query_len``
    (a host int) sizes the grid. Only sequences ``first_seq..`` are attended (a mixed batch's decode rows go
    to the decode kernel): their rows of ``out`` are written, every other row keeps whatever it held. The
    metadata tensors are passed whole, not sliced: a slice starting at an odd row is a pointer that is not
    16-byte aligned, and Triton compiles a separate variant for it (seconds on a cold cache, mid-serving).
    ``kv_scales`` (k_scale, v_scale) apply to an FP8 cache only.
    """
    num_seqs, num_kv_heads = seq_lens.shape[0] - first_seq, k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    tiles = prefill_tiles(q.shape[-1], q.dtype)
    # Short queries (decodes, small chunks) get a smaller tile so padding rows do not multiply the work.
    block_q = max(1, min(tiles.rows // group_pad, triton.next_power_of_2(max(max_query_len, 1))))
    block_q = max(block_q, triton.cdiv(MIN_DOT_ROWS, group_pad))
    out = torch.empty_like(q) if out is None else out
    if max_query_len == 0 or num_seqs == 0:
        return out
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        *_folded_scales(scale, k_cache.dtype, kv_scales),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), first_seq,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=tiles.block_n, HEAD_DIM=q.shape[-1],
        BLOCK_SIZE=k_cache.shape[1], DOT_PRECISION=_dot_precision(q.dtype), KV_FP8=k_cache.dtype == FP8_DTYPE,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


def _folded_scales(scale: float, cache_dtype: torch.dtype, kv_scales: tuple[float, float]) -> tuple[float, float]:
    """(log2-domain softmax scale, output scale): an FP8 cache's k_scale folds into the first (q . k * k_scale
    = (q . k) * k_scale) and its v_scale becomes the second (sum p * v * v_scale = v_scale * sum p * v)."""
    if cache_dtype != FP8_DTYPE:
        return scale * _LOG2E, 1.0
    k_scale, v_scale = kv_scales
    return scale * _LOG2E * k_scale, v_scale


def warm_up_attention_kernels(
    num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, query_dtype: torch.dtype | None = None
) -> int:
    """Compile every variant the eager path can launch (each prefill query tile height, each decode split
    count) on a dummy sequence whose every block is block 0, so the first requests after start-up do not wait
    for Triton's JIT (seconds on a cold cache). Reads the cache, writes nothing to it. Returns the launch count.
    ``query_dtype`` is the model's (default: the cache's, which an FP8 cache cannot be)."""
    device, dtype, head_dim = k_cache.device, query_dtype or k_cache.dtype, k_cache.shape[-1]
    group_pad = triton.next_power_of_2(num_heads // k_cache.shape[2])
    rows = prefill_tiles(head_dim, dtype).rows // group_pad
    # Every position of the longest dummy query maps to block 0: the table must cover all of them.
    tables = torch.zeros(1, triton.cdiv(max(rows, 1), k_cache.shape[1]), dtype=torch.int32, device=device)
    launches = 0
    query_len = 1
    while query_len <= max(rows, 1):  # every BLOCK_Q the prefill wrapper can pick
        q = torch.zeros(query_len, num_heads, head_dim, dtype=dtype, device=device)
        starts = torch.tensor([0, query_len], dtype=torch.int32, device=device)
        lens = torch.tensor([query_len], dtype=torch.int32, device=device)
        paged_prefill_attention(q, k_cache, v_cache, starts, lens, tables, query_len, 1.0)
        query_len, launches = query_len * 2, launches + 1
    q = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    splits = 1
    while splits <= MAX_DECODE_SPLITS:
        paged_decode_attention(q, k_cache, v_cache, lens, tables, 1.0, splits)
        splits, launches = splits * 2, launches + 1
    return launches


def choose_decode_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int | None = None, num_sms: int | None = None
) -> int:
    """How many KV splits a decode batch needs to keep every SM busy (a power of two, 1..32).

    Aims at two (sequence, kv head, split) programs per SM; ``max_seq_len`` (the longest context, or the
    model's max length when capturing a CUDA graph) caps the splits at one per 256 tokens. ``num_sms``
    defaults to the current CUDA device's (132, an H100, without one).
    """
    sms = num_sms or _device_sms()
    wanted = triton.cdiv(2 * sms, max(num_seqs * num_kv_heads, 1))
    if max_seq_len is not None:
        wanted = min(wanted, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT))
    wanted = max(1, min(wanted, MAX_DECODE_SPLITS))
    return 1 << (wanted.bit_length() - 1)  # round down: fewer compiled variants, and >= one program per SM


def _device_sms() -> int:
    if not torch.cuda.is_available():
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """One query row per sequence over its whole paged context, split-KV (flash-decoding; Triton).

    ``q`` ``[S, Hq, D]`` with row i belonging to sequence i. CUDA-graph capturable: reads lengths and block
    tables on the device only; ``num_splits`` and the shapes are the only host inputs. Each split covers
    ``ceil(ceil(seq_len / num_splits) / BLOCK_N)`` key tiles; a row with seq_len 0 gets zeros. Writes
    every row of ``out`` (allocated when None). ``kv_scales`` (k_scale, v_scale) apply to an FP8 cache only;
    as Python floats they are kernel arguments, so a captured graph replays them without a host sync.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    tiles = decode_tiles(head_dim, q.dtype)
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    part_out, part_lse = out, out  # unused when there is one split: the kernel writes ``out`` directly
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_out, part_lse,
        *_folded_scales(scale, k_cache.dtype, kv_scales),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), MIN_DOT_ROWS), BLOCK_N=tiles.block_n,
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(q.dtype), KV_FP8=k_cache.dtype == FP8_DTYPE,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _combine_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        )  # fmt: skip
    return out


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos, start, kv_end,
    k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    scale_log2,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over keys ``[start, start + BLOCK_N)`` (those >= kv_end are not read).

    Scores are in the log2 domain (scale folded with log2 e). With CAUSAL, row r sees key p iff
    ``p <= q_pos[r]``; without it, every key read must be visible to every row. KV_FP8: the e4m3 tiles are
    converted to q's dtype unscaled (the caller folded k_scale into scale_log2 and applies v_scale at the end).
    """
    pos = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    in_range = pos < kv_end
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    k_off = block * stride_kb + slot * stride_ks + kv_head * stride_kh
    k = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None], mask=in_range[None, :], other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    qk = _dot(q, k, DOT_PRECISION) * scale_log2
    if CAUSAL:
        qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v_off = block * stride_vb + slot * stride_vs + kv_head * stride_vh
    v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


# The block-table width and the first sequence change from step to step; specializing on them (== 1, % 16)
# would compile new variants while serving. Their values cost nothing at run time.
@triton.jit(do_not_specialize=["stride_table", "first_seq"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale_log2, out_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_table, first_seq,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):  # fmt: skip
    """Program (query tile, sequence, kv head): BLOCK_Q query tokens x the GROUP query heads of one kv
    head as ``BLOCK_Q * GROUP_PAD`` rows (row r = token r // GROUP_PAD, head r % GROUP_PAD)."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) tiles first: better load balance
    seq = first_seq + tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # context position of the sequence's first query row
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (token < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_start + token).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = first_pos + token
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    kv_end = first_pos + tl.minimum((tile + 1) * BLOCK_Q, q_len)  # one past the last row's position
    # Keys below every row's position need no causal mask; the first tile always holds key 0, so no row's
    # running max stays -inf past its first step.
    full_end = (first_pos + tile * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start, kv_end, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2,
            BLOCK_N, HEAD_DIM, BLOCK_SIZE, False, DOT_PRECISION, KV_FP8,
        )  # fmt: skip
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start, kv_end, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2,
            BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, DOT_PRECISION, KV_FP8,
        )  # fmt: skip
    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * out_scale
    o_off = (q_start + token).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    tl.store(out_ptr + o_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["stride_table"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, out_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):  # fmt: skip
    """Program (sequence, kv head, split): the group's query heads (padded to GROUP_PAD rows) over one
    contiguous key range. With one split it writes the normalized output; otherwise the split's
    normalized partial and its log2-sum-exp (-inf for an empty range) for ``_combine_splits_kernel``."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    rows = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q_off = seq.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = tl.full([GROUP_PAD], 0, dtype=tl.int32) + end - 1  # keys [start, end) are all visible
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    for tile_start in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, tile_start, end, k_cache_ptr, v_cache_ptr, table_ptr, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2,
            BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, DOT_PRECISION, KV_FP8,
        )  # fmt: skip
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * out_scale  # before the split combine, which is linear in the partials
    if NUM_SPLITS == 1:
        o_off = seq.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(out_ptr + o_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Program (sequence, query head): weight each split's partial by exp2(lse - max lse). All-empty
    rows (seq_len 0) get zeros rather than 0/0."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    partial = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * partial, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))
