"""Where the host's time goes in n-gram speculation at batch 1: cProfile of the engine loop on the real SmolLM2,
plain and speculating, one request at a time (the repetitive chat prompts of benchmarks/spec_decode.py).

    python -m benchmarks.spec_host_profile [--prompts 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from benchmarks.spec_decode import repetitive_messages, use_speculator
from common.engine import LLM, SamplingParams
from common.engine.llm import render_chat

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def profile(llm: LLM, prompts: list[str], params: SamplingParams, label: str) -> None:
    profiler = cProfile.Profile()
    started, tokens = time.perf_counter(), 0
    profiler.enable()
    for prompt in prompts:
        tokens += len(llm.generate([prompt], params)[0].outputs[0].token_ids)
    profiler.disable()
    elapsed = time.perf_counter() - started
    print(f"== {label}: {elapsed:.2f}s for {tokens} tokens = {elapsed / tokens * 1e3:.3f} ms/token (profiled)")
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(40)
        print(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    llm = LLM("smollm2", dtype="bfloat16", gpu_memory_utilization=0.3, speculative_config=NGRAM)
    speculator = llm.engine.speculator
    speculator.adaptive = False  # profile the verification path itself, not the step-cost gate
    prompts = [render_chat(llm.engine.tokenizer, chat, True, None) for chat in repetitive_messages(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(prompts[:2], params)  # warm-up
    for label, chosen in (("plain", None), ("ngram k=4", speculator)):
        use_speculator(llm.engine, chosen, k=NGRAM["num_speculative_tokens"])
        profile(llm, prompts, params, label)
    print(llm.engine.stats())


if __name__ == "__main__":
    main()
