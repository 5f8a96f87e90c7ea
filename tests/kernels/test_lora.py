"""Batched LoRA shrink/expand: Triton vs the torch references, and the references vs a naive per-row loop."""

from __future__ import annotations

import pytest
import torch

from kernels.lora import (
    add_lora,
    lora_expand,
    lora_expand_reference,
    lora_expand_triton,
    lora_shrink,
    lora_shrink_reference,
    lora_shrink_triton,
    make_lora_batch,
)
from tests.kernels.support import DEVICE, requires_triton

# Relative L2 error ceilings of the kernels against the references. Both accumulate in float32 and round the output
# once; the kernels sum in another order, so in half types a rounding may land one ulp apart (and Triton's CPU
# interpreter truncates float -> bfloat16 casts where torch rounds to nearest: a bias of up to 2**-8 relative, paid
# twice, for y and for the sum, hence bfloat16's looser bound there).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2 if DEVICE.type == "cuda" else 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_slots(num_tokens: int, num_slots: int, gen: torch.Generator, segments: bool) -> torch.Tensor:
    """Per-token slots in [-1, num_slots), with every value present when the batch is big enough: contiguous
    segments (a prefill batch) or shuffled (a decode batch)."""
    slots = (torch.arange(num_tokens) + 1) % (num_slots + 1) - 1  # one token: slot 0
    if segments:
        return slots.sort().values.roll(num_tokens // 3)
    return slots[torch.randperm(num_tokens, generator=gen)]


def padded_weights(num_slots, num_slices, max_rank, in_dim, out_dim, ranks, dtype, gen):
    """Slot-pool tensors with slot ``s`` of rank ``ranks[s]``: random in its rank, zero beyond it."""
    a = torch.zeros(num_slots, num_slices, max_rank, in_dim)
    b = torch.zeros(num_slots, max_rank, out_dim)
    for slot, rank in enumerate(ranks):
        a[slot, :, :rank] = torch.randn(num_slices, rank, in_dim, generator=gen) / in_dim**0.5
        b[slot, :rank] = torch.randn(rank, out_dim, generator=gen) / rank**0.5
    return a.reshape(num_slots, num_slices * max_rank, in_dim).to(DEVICE, dtype), b.to(DEVICE, dtype)


def naive_delta(x, a, b, slots, scales, slice_starts, rank_of=None):
    """Per token row, per slice, in float64, using only the first ``rank_of[slot]`` ranks when given."""
    max_rank = b.shape[1]
    delta = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float64)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        rank = max_rank if rank_of is None else rank_of[slot]
        for i, (start, end) in enumerate(zip(slice_starts, slice_starts[1:])):
            a_i = a[slot, i * max_rank : i * max_rank + rank].double()
            y = a_i @ x[t].double()
            delta[t, start:end] = scales[slot].double() * (y @ b[slot, :rank, start:end].double())
    return delta


# (tokens, slots, max_rank, in, slice widths): fused q/k/v and gate/up shapes, single slices, partial blocks.
GRID = [
    (37, 3, 8, 96, (64, 32, 32)),
    (50, 4, 16, 80, (100,)),
    (19, 2, 64, 128, (72, 72)),
    (5, 5, 16, 64, (48, 16, 16)),
    (1, 2, 8, 32, (40,)),
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "num_slots", "max_rank", "in_dim", "widths"), GRID)
@pytest.mark.parametrize("segments", [True, False])
def test_kernels_match_reference(num_tokens, num_slots, max_rank, in_dim, widths, segments, dtype, gen):
    slice_starts = tuple(torch.tensor((0, *widths)).cumsum(0).tolist())
    a, b = padded_weights(num_slots, len(widths), max_rank, in_dim, slice_starts[-1], [max_rank] * num_slots,
                          dtype, gen)
    x = torch.randn(num_tokens, in_dim, generator=gen).to(DEVICE, dtype)
    # A base output smaller than the deltas, so the comparison of the sums is dominated by the LoRA part.
    base = (0.1 * torch.randn(num_tokens, slice_starts[-1], generator=gen)).to(DEVICE, dtype)
    scales = (torch.rand(num_slots, generator=gen) + 0.5).to(DEVICE)
    batch = make_lora_batch(random_slots(num_tokens, num_slots, gen, segments).to(DEVICE), num_slots)

    y, y_ref = lora_shrink_triton(x, a, batch), lora_shrink_reference(x, a, batch)
    assert y.dtype == y_ref.dtype == torch.float32
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    base_rows = batch.token_slots < 0
    assert torch.equal(y[base_rows], torch.zeros_like(y[base_rows]))

    out = lora_expand_triton(y_ref, b, batch, base.clone(), scales, slice_starts)
    ref = lora_expand_reference(y_ref, b, batch, base.clone(), scales, slice_starts)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out[base_rows], base[base_rows])  # base-model rows untouched, bit for bit


@pytest.mark.parametrize(("num_tokens", "num_slots", "max_rank", "in_dim", "widths"), GRID)
def test_reference_matches_naive_loop(num_tokens, num_slots, max_rank, in_dim, widths, gen):
    slice_starts = tuple(torch.tensor((0, *widths)).cumsum(0).tolist())
    a, b = padded_weights(num_slots, len(widths), max_rank, in_dim, slice_starts[-1], [max_rank] * num_slots,
                          torch.float32, gen)
    a, b = a.cpu(), b.cpu()
    x = torch.randn(num_tokens, in_dim, generator=gen)
    base = torch.randn(num_tokens, slice_starts[-1], generator=gen)
    scales = torch.rand(num_slots, generator=gen) + 0.5
    slots = random_slots(num_tokens, num_slots, gen, segments=False)
    batch = make_lora_batch(slots, num_slots)
    out = add_lora(base.clone(), x, a, b, batch, scales, slice_starts)
    expected = base.double() + naive_delta(x, a, b, slots, scales, slice_starts)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_ranks_contribute_nothing(dtype, gen):
    """Slots of ranks 8, 16 and 64 in a max-rank-64 pool: the result equals the unpadded product of each."""
    ranks, max_rank, in_dim = [8, 16, 64], 64, 96
    slice_starts = (0, 64, 96, 128)  # a fused q/k/v output
    a, b = padded_weights(3, 3, max_rank, in_dim, 128, ranks, dtype, gen)
    x = torch.randn(40, in_dim, generator=gen).to(DEVICE, dtype)
    base = torch.randn(40, 128, generator=gen).to(DEVICE, dtype)
    scales = (torch.rand(3, generator=gen) + 0.5).to(DEVICE)
    slots = random_slots(40, 3, gen, segments=False)
    batch = make_lora_batch(slots.to(DEVICE), 3)
    out = lora_expand_triton(lora_shrink_triton(x, a, batch), b, batch, base.clone(), scales, slice_starts)
    expected = naive_delta(x.cpu(), a.cpu(), b.cpu(), slots, scales.cpu(), slice_starts, rank_of=ranks)
    assert rel_err((out - base).cpu(), expected) < TOLERANCE[dtype]


@requires_triton
def test_expand_writes_a_column_slice_of_a_wider_output(gen):
    """``out`` a column view (row stride > width), as when the LoRA output is one part of a bigger buffer."""
    a, b = padded_weights(2, 1, 16, 48, 40, [16, 16], torch.float32, gen)
    x = torch.randn(9, 48, generator=gen).to(DEVICE)
    wide = torch.randn(9, 100, generator=gen).to(DEVICE)
    before = wide.clone()
    batch = make_lora_batch(torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1]).to(DEVICE), 2)
    scales = torch.tensor([0.5, 2.0], device=DEVICE)
    y = lora_shrink_reference(x, a, batch)
    lora_expand_triton(y, b, batch, wide[:, 30:70], scales, (0, 40))
    ref = lora_expand_reference(y, b, batch, before[:, 30:70].clone(), scales, (0, 40))
    assert rel_err(wide[:, 30:70], ref) < 1e-6
    assert torch.equal(wide[:, :30], before[:, :30]) and torch.equal(wide[:, 70:], before[:, 70:])


def test_make_lora_batch_groups_rows_by_slot():
    batch = make_lora_batch(torch.tensor([2, -1, 0, 2, 2, -1, 0]), 4)
    assert batch.sorted_rows.tolist() == [1, 5, 2, 6, 0, 3, 4]
    assert batch.slot_counts.tolist() == [2, 0, 3, 0]
    assert batch.slot_starts.tolist() == [2, 4, 4, 7]


@requires_triton
def test_empty_batch_and_all_base_rows(gen):
    a, b = padded_weights(2, 1, 8, 32, 16, [8, 8], torch.float32, gen)
    empty = make_lora_batch(torch.empty(0, dtype=torch.int32, device=DEVICE), 2)
    assert lora_shrink_triton(torch.empty(0, 32, device=DEVICE), a, empty).shape == (0, 8)
    base = torch.randn(4, 16, generator=gen).to(DEVICE)
    batch = make_lora_batch(torch.full((4,), -1, device=DEVICE), 2)
    out = lora_expand_triton(lora_shrink_triton(torch.randn(4, 32).to(DEVICE), a, batch), b, batch, base.clone(),
                             torch.ones(2, device=DEVICE), (0, 16))
    assert torch.equal(out, base)


def test_dispatch_on_cpu_runs_the_references(gen):
    a, b = padded_weights(2, 1, 8, 32, 16, [8, 8], torch.float32, gen)
    a, b = a.cpu(), b.cpu()
    x, base = torch.randn(6, 32, generator=gen), torch.randn(6, 16, generator=gen)
    batch = make_lora_batch(torch.tensor([0, 1, -1, 0, 1, 1]), 2)
    scales = torch.tensor([1.0, 0.25])
    assert torch.equal(lora_shrink(x, a, batch), lora_shrink_reference(x, a, batch))
    y = lora_shrink_reference(x, a, batch)
    assert torch.equal(lora_expand(y, b, batch, base.clone(), scales, (0, 16)),
                       lora_expand_reference(y, b, batch, base.clone(), scales, (0, 16)))
