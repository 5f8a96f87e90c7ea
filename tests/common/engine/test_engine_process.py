"""EngineProcess: the engine in a child process gives the same tokens as in process, shares its KV cache, frees
what a stream leaves behind, reports errors, and never outlives its parent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from common.config import EngineConfig
from common.engine import LLM, SamplingParams
from common.engine.engine import LLMEngine
from common.engine.engine_process import EngineProcess

ENGINE_ARGS = dict(model="smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
PROMPT = [1, 504, 3458, 282, 4649, 314]  # any ids of the vocabulary
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_process():
    process = EngineProcess(EngineConfig.from_kwargs(**ENGINE_ARGS))
    yield process
    process.shutdown()


async def _generate(process: EngineProcess, request_id: str) -> list:
    stream = process.stream(request_id, LLMEngine.add_request, prompt_token_ids=PROMPT, sampling_params=GREEDY,
                            request_id=request_id)
    return [output async for output in stream]


def test_greedy_tokens_equal_the_in_process_engine(engine_process):
    outputs = asyncio.run(_generate(engine_process, "a"))
    expected = LLM(**ENGINE_ARGS).generate([{"prompt_token_ids": PROMPT}], GREEDY)[0].outputs[0].token_ids
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == expected
    assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, 13))  # one message per step


def test_reserved_blocks_are_visible_through_the_shared_cache(engine_process):
    async def reserve_write_release():
        blocks = await engine_process.call(LLMEngine.reserve_blocks, "res", 40)
        engine_process.kv_cache[:, :, blocks[0]].fill_(0.25)  # what BlockWriter does with received KV
        seen = await engine_process.call(_mean_of_block, blocks[0])
        freed = await engine_process.call(LLMEngine.release_reservation, "res")
        return blocks, seen, freed

    blocks, seen, _ = asyncio.run(reserve_write_release())
    assert len(blocks) == 3 and seen == pytest.approx(0.25)
    stats = asyncio.run(engine_process.stats())
    assert stats.free_blocks == stats.total_blocks


def _mean_of_block(engine: LLMEngine, block: int) -> float:
    return float(engine.kv_cache[:, :, block].mean())


def test_leaving_a_stream_early_frees_its_blocks(engine_process):
    async def leave_after_two():
        stream = engine_process.stream("gone", LLMEngine.add_request, prompt_token_ids=PROMPT,
                                       sampling_params=SamplingParams(max_tokens=500, ignore_eos=True),
                                       request_id="gone")
        async with contextlib.aclosing(stream) as outputs:
            async for output in outputs:
                if len(output.outputs[0].token_ids) == 2:
                    break
        for _ in range(100):
            stats = await engine_process.stats()
            if stats.num_requests == 0:
                return stats
            await asyncio.sleep(0.02)
        return stats

    stats = asyncio.run(leave_after_two())
    assert stats.num_requests == 0 and stats.free_blocks == stats.total_blocks


def test_a_bad_call_raises_in_the_caller_and_the_engine_goes_on(engine_process):
    async def bad_then_good():
        with pytest.raises(ValueError, match="prompt"):
            await _generate_bad(engine_process)
        return await _generate(engine_process, "after")

    assert asyncio.run(bad_then_good())[-1].finished


async def _generate_bad(process: EngineProcess) -> None:
    stream = process.stream("bad", LLMEngine.add_request, prompt_token_ids=[], sampling_params=GREEDY,
                            request_id="bad")
    async for _ in stream:
        pass


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="failed to load"):
        EngineProcess(EngineConfig.from_kwargs(model=str(tmp_path / "missing"), device="cpu"))


CHILD_OF_KILLED_PARENT = """
import os, sys
from common.config import EngineConfig
from common.engine.engine_process import EngineProcess
process = EngineProcess(EngineConfig.from_kwargs(model="smollm2", dtype="float32", device="cpu",
                                                 kv_cache_memory=32 * 2**20))
print(process._process.pid, flush=True)
sys.stdin.read()
"""


def test_the_engine_process_exits_when_its_worker_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", CHILD_OF_KILLED_PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.2)
        assert not _alive(child)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose
        return stat.read().split()[2] != "Z"
