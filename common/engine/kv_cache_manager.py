"""Block tables per request on top of the BlockPool: prefix-cache lookup, slot allocation, fork + CoW."""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.block_pool import BlockPool, KVBlock
from common.engine.request import Request


@dataclass(frozen=True)
class BlockCopy:
    """Copy-on-write order for the runner: copy block ``src`` into ``dst`` (all layers) before the step."""

    src: int
    dst: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns every request's block table. Blocks listed in a table are pinned until ``free``."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.tables: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.pending_copies: list[BlockCopy] = []
        self.num_queries = 0  # prefix-cache lookups in tokens
        self.num_hits = 0
        self._id_tuples: dict[str, tuple[int, ...]] = {}  # block_id_tuple's cache; dropped when a table goes
        # Blocks requests returned since the engine last cleared it: a step still in flight may write them.
        self.recently_freed: set[int] = set()

    def block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.tables.get(request_id, ())]

    def block_id_tuple(self, request_id: str) -> tuple[int, ...]:
        """The table's block ids, built incrementally: a live table only grows at its end or swaps its last
        block (copy-on-write), so the cached prefix is reused when its last id still matches."""
        table = self.tables.get(request_id)
        if not table:
            return ()
        cached = self._id_tuples.get(request_id, ())
        kept = len(cached)
        if kept and kept <= len(table) and cached[-1] == table[kept - 1].block_id:
            if kept == len(table):
                return cached
            ids = cached + tuple(block.block_id for block in table[kept:])
        else:
            ids = tuple(block.block_id for block in table)
        self._id_tuples[request_id] = ids
        return ids

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of cached full blocks at the start of the request, leaving >= 1 token to compute."""
        if not self.pool.enable_caching or request.wants_prompt_logprobs:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.num_queries += request.num_tokens
        self.num_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_prefix: list[KVBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more KV entries after the computed ones.

        ``cached_prefix`` (first schedule only) is adopted as the start of the table. Returns False and
        changes nothing when the pool cannot supply the blocks.
        """
        cached_prefix = cached_prefix or []
        table = self.tables.get(request.request_id, [])
        needs_cow = self._last_block_needs_copy(request, table)
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, num_needed - len(table) - len(cached_prefix)) + int(needs_cow)
        reviving = sum(1 for block in cached_prefix if block.ref_cnt == 0)
        if num_new_blocks + reviving > self.pool.num_free_blocks:
            return False
        self.pool.touch(cached_prefix)
        table = table + cached_prefix
        if needs_cow:
            table[-1] = self._copy_on_write(table[-1])
        table += self.pool.allocate(num_new_blocks - int(needs_cow))
        self.tables[request.request_id] = table
        self._cache_full_blocks(request, table, num_computed + num_new_tokens)
        return True

    def reserve(self, reservation_id: str, num_tokens: int) -> list[int]:
        """Pin blocks for ``num_tokens`` tokens under ``reservation_id`` (KV arriving from elsewhere); one run of
        consecutive ids when the pool has one near its free head, so the KV can be received straight into it."""
        num_blocks = cdiv(num_tokens, self.block_size)
        if num_blocks > self.pool.num_free_blocks:
            raise ValueError(f"num_tokens: {num_blocks} blocks needed, {self.pool.num_free_blocks} free")
        self._id_tuples.pop(reservation_id, None)
        self.tables[reservation_id] = self.pool.allocate_contiguous(num_blocks)
        return self.block_ids(reservation_id)

    def release(self, reservation_id: str) -> None:
        """Free a reservation that never became a request; a no-op for unknown ids."""
        self._id_tuples.pop(reservation_id, None)
        self.pool.free(reversed(self.tables.pop(reservation_id, [])))

    def adopt(self, reservation_id: str, request: Request) -> None:
        """Hand a filled reservation to ``request``: its tokens but the last are computed from now on."""
        table = self.tables.pop(reservation_id, None)
        self._id_tuples.pop(reservation_id, None)
        self._id_tuples.pop(request.request_id, None)
        if table is None:
            raise ValueError(f"reservation_id {reservation_id!r} is unknown or expired")
        request.num_computed_tokens = request.num_tokens - 1
        needed = cdiv(request.num_computed_tokens, self.block_size)
        if len(table) < needed:
            self.tables[reservation_id] = table
            raise ValueError(f"reservation_id {reservation_id!r} holds {len(table)} blocks, {needed} needed")
        self.tables[request.request_id] = table
        self._cache_full_blocks(request, table, request.num_computed_tokens)

    def fork(self, parent: Request, child: Request) -> None:
        """Child shares every block of the parent (one more reference each)."""
        table = list(self.tables[parent.request_id])
        self.pool.touch(table)
        self.tables[child.request_id] = table
        self._num_cached_blocks[child.request_id] = self._num_cached_blocks.get(parent.request_id, 0)

    def free(self, request: Request) -> None:
        """Return all of a request's blocks; the tail goes first so shared prefixes are evicted last."""
        table = self.tables.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self._id_tuples.pop(request.request_id, None)
        self.recently_freed.update(block.block_id for block in table)
        self.pool.free(reversed(table))

    def take_pending_copies(self) -> list[BlockCopy]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _last_block_needs_copy(self, request: Request, table: list[KVBlock]) -> bool:
        """The next write lands in a partially filled last block that someone else also references."""
        if not table or request.num_computed_tokens % self.block_size == 0:
            return False
        return len(table) * self.block_size > request.num_computed_tokens and table[-1].ref_cnt > 1

    def _copy_on_write(self, shared: KVBlock) -> KVBlock:
        (fresh,) = self.pool.allocate(1)
        self.pending_copies.append(BlockCopy(src=shared.block_id, dst=fresh.block_id))
        self.pool.free([shared])
        return fresh

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_tokens_after_step: int) -> None:
        """Index blocks that become full this step (their content is known: all their tokens exist)."""
        start = self._num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens_after_step // self.block_size, len(request.block_hashes))
        for index in range(start, end):
            self.pool.cache_block(table[index], request.block_hashes[index])
        self._num_cached_blocks[request.request_id] = max(start, end)
