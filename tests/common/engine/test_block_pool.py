"""BlockPool: exact block ids, LRU eviction order, reference counts, prefix index."""

import pytest

from common.engine.block_pool import BlockPool, FreeBlockQueue, KVBlock, hash_block_tokens, hash_full_blocks


def test_free_queue_is_o1_linked_list_with_middle_removal():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.appendleft(blocks[2])
    queue.append(queue.popleft())
    assert queue.block_ids() == [0, 1, 3, 4, 2]
    assert queue.num_free == 5


def test_allocate_hands_out_lowest_ids_first_with_ref_one():
    pool = BlockPool(8)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 5


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 free"):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_uncached_freed_blocks_are_reused_first_and_cached_ones_evicted_lru():
    pool = BlockPool(6)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, b"h-a")
    pool.cache_block(b, b"h-b")
    pool.free([b, a, c])  # b then a go to the tail (cached), c to the head (nothing to keep)
    assert pool.free_queue.block_ids() == [2, 3, 4, 5, 1, 0]
    taken = pool.allocate(5)
    assert [t.block_id for t in taken] == [2, 3, 4, 5, 1]
    assert pool.lookup(b"h-b") is None  # evicted on reuse
    assert pool.lookup(b"h-a") is a
    assert pool.num_evictions == 1


def test_touch_revives_a_free_cached_block_and_refcounts_shared_blocks():
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.cache_block(block, b"h")
    pool.free([block])
    assert pool.num_free_blocks == 4
    pool.touch([pool.lookup(b"h")])
    pool.touch([block])
    assert block.ref_cnt == 2 and pool.num_free_blocks == 3
    pool.free([block])
    assert pool.num_free_blocks == 3
    pool.free([block])
    assert pool.num_free_blocks == 4


def test_double_free_is_caught():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="double free"):
        pool.free([block])


def test_first_block_with_a_hash_stays_canonical():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"same")
    pool.cache_block(b, b"same")
    assert pool.lookup(b"same") is a and b.block_hash is None


def test_caching_disabled_never_finds_anything():
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"h")
    assert pool.lookup(b"h") is None


def test_block_hashes_are_chained_stable_and_full_blocks_only():
    tokens = list(range(40))
    hashes = hash_full_blocks(tokens, 16)
    assert len(hashes) == 2
    assert hashes[0] == hash_block_tokens(None, tokens[:16])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[16:32])
    assert hashes[1] != hash_block_tokens(None, tokens[16:32])  # depends on the prefix
    # stable across processes: a fixed value, not Python's randomized hash()
    assert hash_block_tokens(None, [1, 2, 3]).hex()[:16] == "5a71aa9dad35ec6b"
    assert hash_block_tokens(None, [1, 2, 3], b"adapter") != hash_block_tokens(None, [1, 2, 3])
    assert hash_full_blocks(tokens, 16, hashes[0], start_block=1) == hashes[1:]


def test_allocate_contiguous_takes_the_run_at_the_free_head():
    pool = BlockPool(10)
    blocks = pool.allocate_contiguous(4)
    assert [b.block_id for b in blocks] == [0, 1, 2, 3]
    assert all(b.ref_cnt == 1 for b in blocks) and pool.num_free_blocks == 6


def test_allocate_contiguous_finds_a_run_behind_a_scattered_head_and_evicts_its_cached_blocks():
    pool = BlockPool(12)
    blocks = pool.allocate(12)
    pool.cache_block(blocks[7], b"h7")
    # Free queue head first: 1, 3, 5 (isolated), then 6..9 (7 cached, so it goes to the tail).
    pool.free([blocks[9], blocks[8], blocks[6], blocks[5], blocks[3], blocks[1], blocks[7]])
    assert pool.free_queue.block_ids() == [1, 3, 5, 6, 8, 9, 7]
    taken = pool.allocate_contiguous(4)
    assert [b.block_id for b in taken] == [5, 6, 7, 8]  # the run around candidate 5, 7 taken from the middle
    assert pool.lookup(b"h7") is None and blocks[7].block_hash is None and pool.num_evictions == 1
    assert pool.free_queue.block_ids() == [1, 3, 9]
    assert all(b.ref_cnt == 1 for b in taken)


def test_allocate_contiguous_extends_a_run_to_the_left_of_its_candidate():
    pool = BlockPool(8)
    blocks = pool.allocate(8)
    pool.free([blocks[4], blocks[2], blocks[3]])  # queue: 3, 2, 4 (head first); the run is 2..4
    assert [b.block_id for b in pool.allocate_contiguous(3)] == [2, 3, 4]


def test_allocate_contiguous_falls_back_to_any_blocks_without_a_run():
    pool = BlockPool(8)
    blocks = pool.allocate(8)
    pool.free([blocks[6], blocks[4], blocks[2], blocks[0]])
    taken = pool.allocate_contiguous(3)
    assert [b.block_id for b in taken] == [0, 2, 4]  # allocate's order: the free head first
    assert pool.free_queue.block_ids() == [6]
    with pytest.raises(ValueError, match="only 1 free"):
        pool.allocate_contiguous(2)


def test_allocate_contiguous_search_stays_bounded_on_a_large_fragmented_pool():
    pool = BlockPool(100_000)
    blocks = pool.allocate(100_000)
    pool.free([blocks[2], blocks[4]])  # then the odd ones before them: a run 1..5 exists, far from the head
    pool.free(blocks[1::2])  # each goes to the head: 99_999, 99_997, ... first
    checked = []
    original = pool.free_queue.first_ids
    pool.free_queue.first_ids = lambda limit: (checked.append(limit), original(limit))[1]
    taken = pool.allocate_contiguous(4)
    assert checked == [32]  # only the queue's first candidates are looked at, so this falls back
    assert [b.block_id for b in taken] == [99_999, 99_997, 99_995, 99_993]
