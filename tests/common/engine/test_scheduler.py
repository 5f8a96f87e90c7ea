"""KVCacheManager and Scheduler: exact block ids, prefix hits, CoW, chunking, preemption, invariants."""

import random

from common.config import SchedulerConfig
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import BlockCopy, KVCacheManager
from common.engine.request import Request, RequestStatus
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import Scheduler

BS = 4


def make_request(rid: str, tokens: list[int], n: int = 1) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(n=n),
        eos_token_ids=frozenset(),
        block_size=BS,
        pending_forks=n - 1,
    )


def make_scheduler(
    num_blocks: int, budget: int = 64, max_seqs: int = 8, chunked: bool = True, caching: bool = True
) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, caching), BS)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(config, kv)


def run_step(scheduler: Scheduler, next_token: int = 7):
    """Schedule, mark computed, and append a token to each request that completed its sequence."""
    out = scheduler.schedule()
    scheduler.on_step_done(out)
    for item in out.scheduled:
        if item.completes_sequence:
            item.request.append_output_token(next_token, None)
    return out


def test_prefix_hit_reuses_exact_blocks_and_leaves_one_token_to_compute():
    sched = make_scheduler(16)
    a = make_request("a", list(range(10)))
    sched.add_request(a)
    out = run_step(sched)
    assert out.scheduled[0].block_ids == (0, 1, 2)
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    b = make_request("b", list(range(8)))  # exactly two full cached blocks
    sched.add_request(b)
    out = run_step(sched)
    item = out.scheduled[0]
    assert item.num_computed_tokens == 4 and item.num_new_tokens == 4  # hit capped at 1 block
    assert item.block_ids[0] == 0 and b.num_cached_tokens == 4
    c = make_request("c", list(range(9)))
    sched.add_request(c)
    out = run_step(sched)
    assert out.scheduled[-1].num_computed_tokens == 8
    assert out.scheduled[-1].block_ids[:2] == (0, 1)


def test_chunked_prefill_mixes_with_decode_under_token_budget():
    sched = make_scheduler(32, budget=6)
    a = make_request("a", list(range(3)))
    sched.add_request(a)
    run_step(sched)  # a prefilled, now decoding
    b = make_request("b", list(range(100, 110)))
    sched.add_request(b)
    out = run_step(sched)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 5)]
    assert b.num_output_tokens == 0 and b.num_computed_tokens == 5
    out = run_step(sched)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 5)]
    assert b.num_output_tokens == 1


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(32, budget=12, chunked=False)
    a = make_request("a", list(range(3)))
    sched.add_request(a)
    run_step(sched)
    b = make_request("b", list(range(100, 112)))  # 12 tokens: does not fit next to a's decode
    sched.add_request(b)
    out = run_step(sched)
    assert [i.request.request_id for i in out.scheduled] == ["a"]


def test_out_of_blocks_preempts_newest_and_it_resumes_first():
    sched = make_scheduler(4, budget=64)
    a = make_request("a", list(range(7)))  # 2 blocks
    b = make_request("b", list(range(50, 57)))  # 2 blocks
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # both prefilled: 8 tokens each incl. the sampled one -> next decode writes slot 7
    run_step(sched)  # each now 9 tokens: the 9th token needs a 3rd block on the next step
    out = run_step(sched)
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b]
    assert sched.kv_cache.pool.num_free_blocks == 1
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    out = run_step(sched)
    assert out.scheduled[0].request is b and out.scheduled[0].num_new_tokens + out.scheduled[0].num_computed_tokens == 9


def test_a_lone_request_that_cannot_grow_preempts_itself_not_others():
    sched = make_scheduler(2, budget=64)
    a = make_request("a", list(range(8)))
    sched.add_request(a)
    run_step(sched)
    out = run_step(sched)
    assert [r.request_id for r in out.preempted] == ["a"] and not out.scheduled


def test_fork_shares_blocks_and_copies_the_partial_last_block_on_write():
    sched = make_scheduler(16)
    kv = sched.kv_cache
    parent = make_request("p", list(range(6)), n=2)
    sched.add_request(parent)
    sched.on_step_done(sched.schedule())
    child = parent.fork(1, None)
    kv.fork(parent, child)
    sched.add_running(child)
    assert kv.block_ids("p") == kv.block_ids("p#1") == [0, 1]
    assert kv.pool.blocks[1].ref_cnt == 2 and kv.pool.blocks[0].ref_cnt == 2
    parent.append_output_token(11, None)
    child.append_output_token(12, None)
    out = sched.schedule()
    assert out.block_copies == (BlockCopy(src=1, dst=2),)
    assert kv.block_ids("p") == [0, 2] and kv.block_ids("p#1") == [0, 1]
    assert kv.pool.blocks[0].ref_cnt == 2 and kv.pool.blocks[1].ref_cnt == 1
    assert kv.pool.num_free_blocks == 13  # two forked samples hold 3 blocks, not 4


def test_abort_returns_every_block_at_once():
    sched = make_scheduler(8, caching=False)
    a = make_request("a", list(range(13)))
    sched.add_request(a)
    run_step(sched)
    assert sched.kv_cache.pool.num_free_blocks == 4
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.pool.num_free_blocks == 8 and sched.num_unfinished == 0


def check_invariants(sched: Scheduler) -> None:
    pool = sched.kv_cache.pool
    free_ids = set(pool.free_queue.block_ids())
    assert len(free_ids) == pool.num_free_blocks
    refs = [0] * pool.num_blocks
    for table in sched.kv_cache.tables.values():
        for block in table:
            refs[block.block_id] += 1
    for block in pool.blocks:
        assert block.ref_cnt == refs[block.block_id], f"block {block.block_id} refcount drift"
        assert (block.ref_cnt == 0) == (block.block_id in free_ids), "block both free and owned"
    for block_hash, block in pool.cached.items():
        assert block.block_hash == block_hash
    for request_id in sched.kv_cache.tables:  # the incremental id cache never goes stale
        assert sched.kv_cache.block_id_tuple(request_id) == tuple(sched.kv_cache.block_ids(request_id))


def test_randomized_operations_keep_invariants_and_return_every_block():
    rng = random.Random(1234)
    sched = make_scheduler(24, budget=20, max_seqs=6)
    live: list[Request] = []
    counter = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.25:
            prefix = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [9] * 8, []])
            tokens = prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 14))]
            request = make_request(f"r{counter}", tokens)
            counter += 1
            sched.add_request(request)
            live.append(request)
        elif op < 0.35 and live:
            victim = live.pop(rng.randrange(len(live)))
            sched.finish(victim, RequestStatus.FINISHED_ABORTED)
        elif op < 0.42:
            running = [r for r in sched.running if r.num_computed_tokens == r.num_tokens - 1 and r.output_token_ids]
            if running:
                parent = rng.choice(running)
                child = parent.fork(counter, None)
                counter += 1
                child.output_token_ids = list(parent.output_token_ids)
                child.all_token_ids = list(parent.all_token_ids)
                child.block_hashes = list(parent.block_hashes)
                sched.kv_cache.fork(parent, child)
                sched.add_running(child)
                live.append(child)
        else:
            run_step(sched, next_token=rng.randrange(50))
            for request in [r for r in live if r.num_tokens > 40 and r.status is RequestStatus.RUNNING]:
                sched.finish(request, RequestStatus.FINISHED_LENGTH)
                live.remove(request)
        check_invariants(sched)
    for request in live:
        sched.finish(request, RequestStatus.FINISHED_ABORTED)
    check_invariants(sched)
    assert sched.kv_cache.pool.num_free_blocks == 24 and not sched.kv_cache.tables
    # the run really exercised the hard paths
    assert sched.num_preemptions > 10 and sched.kv_cache.num_hits > 0 and sched.kv_cache.pool.num_evictions > 0
