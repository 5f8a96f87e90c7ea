"""The near-even partition, and the group's collectives between two real gloo processes."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.distributed.group import create_group, create_store, partition


def test_partition_gives_the_remainder_to_the_first_parts() -> None:
    assert partition(3, 2) == [(0, 2), (2, 3)]
    assert partition(9, 2) == [(0, 5), (5, 9)]
    assert partition(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert partition(1, 2) == [(0, 1), (1, 1)]


@given(total=st.integers(0, 10_000), parts=st.integers(1, 64))
def test_partition_covers_the_range_contiguously_and_near_evenly(total: int, parts: int) -> None:
    bounds = partition(total, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_partition_refuses_zero_parts() -> None:
    with pytest.raises(ValueError):
        partition(4, 0)


def _rank_main(rank: int, port: int, results) -> None:
    group = create_group(rank, 2, port, torch.device("cpu"), timeout_s=30)
    summed = group.all_reduce(torch.tensor([1.0 + rank]))
    smallest = group.all_reduce_min(10 - rank)
    broadcast = group.broadcast(torch.arange(3) * 7 if rank == 0 else torch.zeros(3, dtype=torch.int64))
    local = torch.full((2, 3 - rank), float(rank + 1))  # widths 3 and 2
    gathered = group.gather_columns(local, [3, 2])
    results.put((rank, summed.item(), smallest, broadcast.tolist(), None if gathered is None else gathered.tolist()))


@pytest.mark.timeout(120)
def test_two_gloo_ranks_reduce_broadcast_and_gather_uneven_columns() -> None:
    context = multiprocessing.get_context("spawn")
    store = create_store(2, timeout_s=30)
    results = context.Queue()
    child = context.Process(target=_rank_main, args=(1, store.port, results))
    child.start()
    try:
        group = create_group(0, 2, store.port, torch.device("cpu"), store=store, timeout_s=30)
        summed = group.all_reduce(torch.tensor([1.0]))
        assert summed.item() == 3.0
        assert group.all_reduce_min(10) == 9
        assert group.broadcast(torch.arange(3) * 7).tolist() == [0, 7, 14]
        gathered = group.gather_columns(torch.full((2, 3), 1.0), [3, 2])
        assert gathered.tolist() == [[1.0, 1.0, 1.0, 2.0, 2.0]] * 2
        rank, child_sum, child_min, child_broadcast, child_gathered = results.get(timeout=60)
        assert (rank, child_sum, child_min, child_broadcast, child_gathered) == (1, 3.0, 9, [0, 7, 14], None)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
