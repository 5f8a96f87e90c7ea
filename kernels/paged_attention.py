"""Paged attention over a varlen batch mixing prefill chunks (with cached prefix) and decodes.

Cache layout (per layer, per K or V): ``[num_blocks, block_size, num_kv_heads, head_dim]``.
Sequence i's context position p lives in block ``block_tables[i, p // block_size]`` at offset
``p % block_size``. See ``common.models.attention_metadata.AttentionMetadata`` for the batch layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # type-only: kernels must not import the model package (it imports kernels)
    from common.models.attention_metadata import AttentionMetadata

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Contiguous ``[seq_len, num_kv_heads, head_dim]`` view of one sequence's cached positions [0, seq_len).

    Reads only the first ``ceil(seq_len / block_size)`` blocks of ``block_table``.
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:seq_len]


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
            k = gather_context(k_cache, block_table, seq_len)
            v = gather_context(v_cache, block_table, seq_len)
            out[start : start + q_len] = causal_attention(q[start : start + q_len], k, v, scale)
        start += q_len
    if decode_seqs:
        rows = torch.tensor(decode_rows, device=q.device)
        out[rows] = batched_decode_attention(q.index_select(0, rows), k_cache, v_cache, attn_metadata, decode_seqs,
                                             scale)
    return out


def batched_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn_metadata: AttentionMetadata,
    seqs: list[int], scale: float,
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
    k = k_cache[tables].flatten(1, 2).transpose(1, 2).to(compute_dtype)  # [B, kv_heads, L, dim]
    v = v_cache[tables].flatten(1, 2).transpose(1, 2).to(compute_dtype)
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
) -> torch.Tensor:
    """Attention for every query row of the batch over its sequence's cached context.

    Invariant: this step's K/V are already in the cache (``write_kv`` ran first), and only cache
    positions ``[0, seq_len)`` of each sequence are read. Returns ``[num_tokens, num_heads, head_dim]``.
    """
    # Triton kernels for CUDA (prefill-over-prefix and split-KV decode) plug in here, chosen by
    # q.is_cuda and attn_metadata.is_pure_decode; until then every device uses the reference.
    return paged_attention_reference(q, k_cache, v_cache, attn_metadata, scale)
