"""Paged KV-cache block bookkeeping: reference counts, an O(1) LRU free queue, prefix-cache index.

Never touches a GPU: it hands out block ids; the model runner owns the tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

BlockHash = bytes
_RUN_CANDIDATES = 32  # free-queue heads whose runs allocate_contiguous examines


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: bytes = b"") -> BlockHash:
    """Stable chained hash of one full block: H(parent, tokens, extra keys).

    sha256 over a fixed byte layout, so router, Redis and workers on any host agree.
    """
    digest = hashlib.sha256()
    digest.update(parent or b"\x00" * 32)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    digest.update(extra_keys)
    return digest.digest()


def lora_extra_keys(lora_name: str | None) -> bytes:
    """A block hash's extra keys for tokens computed under a LoRA adapter: empty for the base model (whose hashes
    stay as they were, so routers hashing base prompts still agree), else a fixed-size digest of the adapter name,
    so the same tokens under two adapters (or one adapter and the base) never share a block."""
    if lora_name is None:
        return b""
    return b"lora:" + hashlib.sha256(lora_name.encode()).digest()


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent: BlockHash | None = None,
    start_block: int = 0,
    extra_keys: bytes = b"",
    lora_name: str | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from ``start_block`` on, chained from ``parent``.

    ``lora_name``: the adapter the KV is computed under (None: the base model); it joins every block's extra keys.
    """
    extra_keys += lora_extra_keys(lora_name)
    hashes: list[BlockHash] = []
    for block_index in range(start_block, len(token_ids) // block_size):
        chunk = token_ids[block_index * block_size : (block_index + 1) * block_size]
        parent = hash_block_tokens(parent, chunk, extra_keys)
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class KVBlock:
    """One physical KV block. ``ref_cnt == 0`` iff it sits in the free queue."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, push to either end, remove from the middle.

    All operations are O(1). The head is evicted first, so pushing a freed cached block to the tail
    keeps the least recently used cached block at the front.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(block_id=-1)
        self._tail = KVBlock(block_id=-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, "block is not free"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: KVBlock) -> None:
        self._insert_after(self._head, block)

    def _insert_after(self, anchor: KVBlock | None, block: KVBlock) -> None:
        assert anchor is not None and block.prev_free is None and block.next_free is None
        block.prev_free, block.next_free = anchor, anchor.next_free
        assert anchor.next_free is not None
        anchor.next_free.prev_free = block
        anchor.next_free = block
        self.num_free += 1

    def first_ids(self, limit: int) -> Iterable[int]:
        """The ids of the first ``limit`` free blocks, head first (lazily; do not mutate while iterating)."""
        block = self._head.next_free
        while limit > 0 and block is not None and block is not self._tail:
            yield block.block_id
            block, limit = block.next_free, limit - 1

    def block_ids(self) -> list[int]:
        """Free block ids from head (evicted first) to tail. O(n): tests and debugging only."""
        ids, block = [], self._head.next_free
        while block is not None and block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """All KV blocks of one worker, with the prefix-cache index over full blocks.

    Invariants: a block is either free (ref_cnt 0, in the queue) or owned (ref_cnt > 0, not queued);
    a block with a hash is findable by that hash until it is evicted for reuse.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0
        # (hash, cached?) in order, for publishing this worker's prefix cache to routers; bounded.
        self.cache_events: list[tuple[BlockHash, bool]] = []
        self.track_cache_events = False

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def allocate(self, count: int) -> list[KVBlock]:
        """Take ``count`` free blocks (evicting their cached contents); each returned with ref_cnt 1."""
        if count > self.num_free_blocks:
            raise ValueError(f"cannot allocate {count} blocks, only {self.num_free_blocks} free")
        taken = [self.free_queue.popleft() for _ in range(count)]
        for block in taken:
            self._evict(block)
            block.ref_cnt = 1
        return taken

    def allocate_contiguous(self, count: int) -> list[KVBlock]:
        """Like ``allocate`` but, best effort, one run of consecutive block ids (a KV receive can then land
        straight in the blocks); falls back to ``allocate`` when the search finds no free run of ``count``.

        The search only looks at the runs holding the first ``_RUN_CANDIDATES`` blocks of the free queue (the
        ones ``allocate`` would take first), so it costs O(count * _RUN_CANDIDATES) at most, never O(pool).
        Blocks taken from the middle of the queue lose their cached content exactly as ``allocate`` evicts;
        a run may so evict a cached block before older ones (LRU is kept for everything outside the run).
        """
        if count > self.num_free_blocks:
            raise ValueError(f"cannot allocate {count} blocks, only {self.num_free_blocks} free")
        start = self._free_run_start(count)
        if start is None:
            return self.allocate(count)
        taken = self.blocks[start : start + count]
        for block in taken:
            self.free_queue.remove(block)
            self._evict(block)
            block.ref_cnt = 1
        return taken

    def _free_run_start(self, count: int) -> int | None:
        """The first id of ``count`` consecutive free blocks around one of the queue's first candidates."""
        if count <= 1:
            return None  # a single block is trivially a run: plain allocate keeps the LRU order exactly
        seen_until = -1  # candidates inside an already searched run are skipped
        for candidate in self.free_queue.first_ids(_RUN_CANDIDATES):
            if candidate <= seen_until:
                continue
            left = candidate
            while left > 0 and candidate - left < count - 1 and self.blocks[left - 1].ref_cnt == 0:
                left -= 1
            right = candidate + 1  # the run is [left, right)
            while right < self.num_blocks and right - left < count and self.blocks[right].ref_cnt == 0:
                right += 1
            if right - left >= count:
                return left
            seen_until = right
        return None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block (prefix-cache hit or fork); revives free cached blocks."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block, in the order given.

        A block reaching 0 goes to the tail if it holds cached content (evicted last, LRU), or to
        the head if it holds nothing reusable (reused first, sparing cached blocks).
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self.free_queue.append(block)
                else:
                    self.free_queue.appendleft(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block's content hash; the first block with a given hash stays the canonical one."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block
            self._record(block_hash, True)

    def take_cache_events(self) -> list[tuple[BlockHash, bool]]:
        events, self.cache_events = self.cache_events, []
        return events

    def _record(self, block_hash: BlockHash, cached: bool) -> None:
        if self.track_cache_events and len(self.cache_events) < 1_000_000:
            self.cache_events.append((block_hash, cached))

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (weights changed, tests). Owned blocks keep their data."""
        for block_hash, block in self.cached.items():
            block.block_hash = None
            self._record(block_hash, False)
        self.cached.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            self._record(block.block_hash, False)
        block.block_hash = None
        self.num_evictions += 1
