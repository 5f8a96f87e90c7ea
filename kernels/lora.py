"""Batched LoRA products over a flat token batch in which each token row names its adapter slot (-1: base model).

A projection ``out = x @ W.T`` with LoRA becomes ``out += scale[s] * (x @ A[s].T) @ B[s]`` for a token of slot
``s``: ``lora_shrink`` computes ``y = x @ A[s].T`` (``[T, num_slices * max_rank]``), ``lora_expand`` adds
``scale[s] * y @ B[s]`` into ``out`` in place. Rows of slot -1 are neither read nor written.

Layouts (one GPU slot pool per projection and layer, allocated once; ``num_slices`` is 3 for the fused q/k/v
projection, 2 for gate/up, 1 otherwise):
- ``lora_a``: ``[num_slots, num_slices * max_rank, in]``. Slice ``i``'s A (PEFT's ``lora_A.weight``, ``[r, in]``)
  sits in rows ``i * max_rank .. i * max_rank + r``. The shrink reduces over ``in``, which is contiguous, as in an
  ``nn.Linear`` weight, so its tiles load coalesced; and one shrink serves all slices of a fused projection
  because they share the input.
- ``lora_b``: ``[num_slots, max_rank, out]``. Slice ``i``'s B (PEFT's ``lora_B.weight`` transposed, ``[r, n_i]``)
  sits in columns ``slice_starts[i] .. slice_starts[i + 1]``; column ``c`` of slice ``i`` takes its rank vector
  from ``y[:, i * max_rank:(i + 1) * max_rank]``. The expand reduces over the (small) rank and writes ``out``
  columns, which are contiguous in B and in ``out``, so one launch writes the q, k and v parts of a fused output.
Ranks below ``max_rank`` are zero-padded in A and B, so the padding contributes exactly nothing.

One kernel pair serves prefill and decode (SGMV and BGMV at once): ``LoRABatch`` lists the batch's token rows
grouped by slot (a stable sort of the slot ids, on the device). A program takes up to ``BLOCK_M`` rows of one slot,
gathers them and multiplies them by that slot's weights with ``tl.dot``: a prefill segment of one adapter is one
group, and a decode batch whose requests share adapters reads each adapter's weights once per ``BLOCK_M`` tokens
instead of once per token (BGMV). The grid depends only on the token count, the slot count and the shapes, and the
metadata is built without a host sync, so the launches can be captured in a CUDA graph.

Rounding: the shrink accumulates in float32 and ``y`` is float32; the expand rounds ``y`` to B's dtype (as PEFT's
``lora_B(lora_A(x))`` does in the activation dtype), accumulates in float32, scales, adds ``out`` in float32 and
rounds the sum once to ``out``'s dtype. The references do the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels.triton_import import HAS_TRITON, tl, triton

_BLOCK_M = 16  # token rows per program; tl.dot needs at least 16
_SHRINK_BLOCK_K = 64
_EXPAND_BLOCK_N = 64
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoRABatch:
    """Which adapter slot each token row uses, and the rows grouped by slot (what the kernels walk).

    Invariant: ``sorted_rows`` is a stable argsort of ``token_slots``; the rows of slot ``s`` are
    ``sorted_rows[slot_starts[s] : slot_starts[s] + slot_counts[s]]``; base-model rows (-1) come first and belong
    to no slot.
    """

    token_slots: torch.Tensor  # [T] int32, -1 = base model
    sorted_rows: torch.Tensor  # [T] int32
    slot_counts: torch.Tensor  # [num_slots] int32
    slot_starts: torch.Tensor  # [num_slots] int32
    num_slots: int

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def make_lora_batch(token_slots: torch.Tensor, num_slots: int) -> LoRABatch:
    """Group a batch's token rows by slot, on the slots' device, with no host sync (CUDA-graph capturable).

    ``token_slots`` values must lie in ``[-1, num_slots)``; callers map adapter names to slots (``LoRASlotPool``).
    """
    slots = token_slots.to(torch.int32)
    sorted_rows = torch.sort(slots, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=slots.device)
    counts.index_add_(0, (slots + 1).long(), torch.ones_like(slots))  # bin 0 = base rows; bincount would sync
    ends = counts.cumsum(0).to(torch.int32)
    return LoRABatch(slots, sorted_rows, counts[1:], (ends - counts)[1:], num_slots)


# ---------------------------------------------------------------------------------------------------- references


def lora_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """``y[t] = x[t] @ lora_a[slot[t]].T`` in float32; rows of slot -1 are zero."""
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in range(batch.num_slots):
        rows = batch.token_slots == slot
        y[rows] = x[rows].float() @ lora_a[slot].float().T
    return y


def lora_expand_reference(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    out: torch.Tensor,
    scales: torch.Tensor,
    slice_starts: tuple[int, ...],
) -> torch.Tensor:
    """``out[t, cols_i] += scale[slot[t]] * y[t, rank block i] @ lora_b[slot[t]][:, cols_i]`` for every slice
    ``i`` (``cols_i = slice_starts[i] .. slice_starts[i + 1]``), in place; rows of slot -1 are untouched."""
    max_rank = lora_b.shape[1]
    for slot in range(batch.num_slots):
        rows = batch.token_slots == slot
        for i, (start, end) in enumerate(zip(slice_starts, slice_starts[1:])):
            y_slice = y[rows, i * max_rank : (i + 1) * max_rank].to(lora_b.dtype).float()
            delta = scales[slot].float() * (y_slice @ lora_b[slot, :, start:end].float())
            out[rows, start:end] = (out[rows, start:end].float() + delta).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------- dispatch


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """The Triton kernel on CUDA, the reference elsewhere."""
    if _use_kernel(x, lora_a):
        with torch.cuda.device(x.device):
            return lora_shrink_triton(x, lora_a, batch)
    return lora_shrink_reference(x, lora_a, batch)


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    out: torch.Tensor,
    scales: torch.Tensor,
    slice_starts: tuple[int, ...],
    slice_starts_device: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel on CUDA, the reference elsewhere; adds into ``out`` in place and returns it.
    ``slice_starts_device``: ``slice_starts`` as an int32 tensor on ``out``'s device, made once by the caller (a
    CUDA graph capture cannot copy a host list to the device)."""
    if _use_kernel(out, lora_b):
        with torch.cuda.device(out.device):
            return lora_expand_triton(y, lora_b, batch, out, scales, slice_starts, slice_starts_device)
    return lora_expand_reference(y, lora_b, batch, out, scales, slice_starts)


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    scales: torch.Tensor,
    slice_starts: tuple[int, ...],
    slice_starts_device: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out += LoRA delta`` of a (fused) projection whose base output is ``out``: shrink, then expand."""
    y = lora_shrink(x, lora_a, batch)
    return lora_expand(y, lora_b, batch, out, scales, slice_starts, slice_starts_device)


def _use_kernel(x: torch.Tensor, weights: torch.Tensor) -> bool:
    return x.is_cuda and HAS_TRITON and x.dtype in _KERNEL_DTYPES and weights.dtype in _KERNEL_DTYPES


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products for float32 inputs (tf32 would cost ~1e-3 relative error). "upcast" works
    around Triton's CPU interpreter, which multiplies bfloat16 ``tl.dot`` operands as raw bits."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------- kernels


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """Kernel version of ``lora_shrink_reference`` (``x``: ``[T, in]`` with unit column stride)."""
    _check_shapes(x.shape[0], batch, lora_a)
    if x.stride(-1) != 1:
        x = x.contiguous()
    lora_a = lora_a if lora_a.stride(-1) == 1 else lora_a.contiguous()
    num_tokens, width = x.shape
    rank_cols = lora_a.shape[1]
    y = torch.zeros(num_tokens, rank_cols, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return y
    block_n = min(max(triton.next_power_of_2(rank_cols), 16), 64)
    grid = (triton.cdiv(num_tokens, _BLOCK_M), triton.cdiv(rank_cols, block_n), batch.num_slots)
    _shrink_kernel[grid](
        x, lora_a, y, batch.sorted_rows, batch.slot_counts, batch.slot_starts,
        width, rank_cols,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), y.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_SHRINK_BLOCK_K,
        DOT_PRECISION=_dot_precision(lora_a.dtype), num_warps=4,
    )  # fmt: skip
    return y


def lora_expand_triton(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    batch: LoRABatch,
    out: torch.Tensor,
    scales: torch.Tensor,
    slice_starts: tuple[int, ...],
    slice_starts_device: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel version of ``lora_expand_reference``: one launch for all slices of a fused projection."""
    _check_shapes(out.shape[0], batch, lora_b)
    max_rank = lora_b.shape[1]
    if y.shape != (out.shape[0], max_rank * (len(slice_starts) - 1)) or slice_starts[-1] > lora_b.shape[2]:
        raise ValueError(f"lora_expand: y {tuple(y.shape)}, B {tuple(lora_b.shape)} and slices {slice_starts} "
                         "do not fit together")
    if out.stride(-1) != 1 or y.stride(-1) != 1 or lora_b.stride(-1) != 1:
        raise ValueError("lora_expand: out, y and B need unit column stride")
    if out.shape[0] == 0:
        return out
    starts = slice_starts_device
    if starts is None:  # a host-to-device copy: not inside a CUDA graph capture (pass slice_starts_device there)
        starts = torch.tensor(slice_starts, dtype=torch.int32, device=out.device)
    widest = max(end - start for start, end in zip(slice_starts, slice_starts[1:]))
    num_slices = len(slice_starts) - 1
    grid = (triton.cdiv(out.shape[0], _BLOCK_M), triton.cdiv(widest, _EXPAND_BLOCK_N), batch.num_slots * num_slices)
    _expand_kernel[grid](
        y, lora_b, out, scales, starts, batch.sorted_rows, batch.slot_counts, batch.slot_starts,
        max_rank, num_slices,
        y.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_N=_EXPAND_BLOCK_N, BLOCK_K=max(triton.next_power_of_2(max_rank), 16),
        DOT_PRECISION=_dot_precision(lora_b.dtype), num_warps=4,
    )  # fmt: skip
    return out


def _check_shapes(num_tokens: int, batch: LoRABatch, weights: torch.Tensor) -> None:
    if batch.num_tokens != num_tokens or weights.shape[0] != batch.num_slots:
        raise ValueError(f"LoRA batch of {batch.num_tokens} tokens and {batch.num_slots} slots does not fit "
                         f"{num_tokens} rows and weights of {weights.shape[0]} slots")


@triton.jit
def _slot_rows(sorted_rows_ptr, slot_counts_ptr, slot_starts_ptr, slot, BLOCK_M: tl.constexpr):
    """This program's token rows of ``slot`` (block ``program_id(0)`` of its group) and their mask."""
    count = tl.load(slot_counts_ptr + slot)
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs < count
    rows = tl.load(sorted_rows_ptr + tl.load(slot_starts_ptr + slot) + offs, mask=mask, other=0)
    return rows.to(tl.int64), mask, tl.program_id(0) * BLOCK_M < count


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, sorted_rows_ptr, slot_counts_ptr, slot_starts_ptr,
    width, rank_cols,
    stride_x, stride_a_slot, stride_a_rank, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program = up to BLOCK_M rows of one slot x BLOCK_N rank columns: ``y[rows, n] = x[rows] @ A[slot, n].T``."""
    slot = tl.program_id(2)
    rows, row_mask, has_rows = _slot_rows(sorted_rows_ptr, slot_counts_ptr, slot_starts_ptr, slot, BLOCK_M)
    if has_rows:
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = ns < rank_cols
        a_base = a_ptr + slot.to(tl.int64) * stride_a_slot + ns[None, :] * stride_a_rank
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < width
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            a = tl.load(a_base + ks[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [K, N]
            acc += _dot(x.to(a.dtype), a, DOT_PRECISION)
        tl.store(y_ptr + rows[:, None] * stride_y + ns[None, :], acc, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, b_ptr, out_ptr, scales_ptr, slice_starts_ptr, sorted_rows_ptr, slot_counts_ptr, slot_starts_ptr,
    max_rank, num_slices,
    stride_y, stride_b_slot, stride_b_rank, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program = up to BLOCK_M rows of one slot x BLOCK_N columns of one slice:
    ``out[rows, cols] += scale * y[rows, slice's ranks] @ B[slot, :, cols]``."""
    slot = tl.program_id(2) // num_slices
    part = tl.program_id(2) % num_slices
    rows, row_mask, has_rows = _slot_rows(sorted_rows_ptr, slot_counts_ptr, slot_starts_ptr, slot, BLOCK_M)
    col_start = tl.load(slice_starts_ptr + part)
    col_end = tl.load(slice_starts_ptr + part + 1)
    cols = col_start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if has_rows & (col_start + tl.program_id(1) * BLOCK_N < col_end):
        col_mask = cols < col_end
        ks = tl.arange(0, BLOCK_K)
        k_mask = ks < max_rank
        y = tl.load(y_ptr + rows[:, None] * stride_y + (part * max_rank + ks)[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_b_slot + ks[:, None] * stride_b_rank + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        delta = _dot(y.to(b.dtype), b, DOT_PRECISION) * tl.load(scales_ptr + slot).to(tl.float32)
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        total = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32) + delta
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)
