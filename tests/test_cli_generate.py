"""`tandem generate` and `tandem chat` against the real default model (SmolLM2 on CPU): streamed text, seeds,
top-p and stop strings give exactly what the engine's own LLM.generate / LLM.chat give."""

from __future__ import annotations

import io

import pytest

from common.engine import LLM, SamplingParams
from services import launch

pytestmark = pytest.mark.timeout(300)
ENGINE = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "64MiB"]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2", device="cpu", dtype="float32", kv_cache_memory=64 << 20)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24),
    SamplingParams(temperature=1.0, top_p=0.8, seed=1234, max_tokens=24),
    SamplingParams(temperature=0.0, max_tokens=48, stop=(".", "\n")),
], ids=["greedy", "seeded-top-p", "stop"])
def test_streamed_pieces_join_to_the_engines_text(llm, params):
    expected = llm.generate([PROMPT], params)[0].outputs[0].text
    pieces = list(launch.stream_completion(llm, PROMPT, params))
    assert "".join(pieces) == expected and (len(pieces) > 1 or params.stop)  # stop: " Paris" then "."
    assert not llm.engine.has_unfinished_requests()


def test_closing_a_stream_early_leaves_no_request(llm):
    stream = launch.stream_completion(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=64))
    next(stream)
    stream.close()
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests() and stats.free_blocks == stats.total_blocks


def test_generate_command_streams_with_seed_top_p_and_stop(llm, capsys):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=40, stop=("\n", "!"))
    expected = llm.generate([PROMPT], params)[0].outputs[0].text
    argv = ["generate", "--prompt", PROMPT, *ENGINE, "--temperature", "0.9", "--top-p", "0.9", "--seed", "7",
            "--max-tokens", "40", "--stop", "\n", "--stop", "!"]
    assert launch.main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert launch.main(argv) == 0
    assert streamed == capsys.readouterr().out == expected + "\n"


def test_chat_streams_the_answer_the_engine_gives(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    first = llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)[0].outputs[0].text
    history = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    second = llm.chat(history, params)[0].outputs[0].text
    out = io.StringIO()
    stdin = io.StringIO("What is the capital of France?\nAnd of Italy?\n")
    launch.chat_repl(llm, params, stdin, out, interactive=False)
    assert out.getvalue() == f"{first}\n{second}\n"
