"""Offline engine figures on CPU for the default model: load time, tokens/s for 1 and for N requests.

    .venv/bin/python benchmarks/engine_cpu.py [--model smollm2] [--concurrency 32] [--output-len 64]

Prints one table; HF transformers (model.generate, batch 1) runs on the same machine as the peer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common.engine import LLM, SamplingParams


def time_generate(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def hf_batch1_tokens_per_s(llm: LLM, prompt: list[int], output_len: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
    return output_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    llm = LLM(args.model, device="cpu")
    load_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    vocab = llm.engine.hf_config.vocab_size
    prompts = [
        torch.randint(100, vocab, (args.input_len,), generator=generator).tolist() for _ in range(args.concurrency + 1)
    ]
    time_generate(llm, [prompts[-1]], 4)  # warm-up
    one_s, one_tokens = time_generate(llm, [prompts[0]], args.output_len)
    many_s, many_tokens = time_generate(llm, prompts[1:], args.output_len)
    hf = None if args.skip_hf else hf_batch1_tokens_per_s(llm, prompts[0], args.output_len)
    figures = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "batch1_output_tok_s": round(one_tokens / one_s, 1),
        f"concurrent{args.concurrency}_output_tok_s": round(many_tokens / many_s, 1),
        f"concurrent{args.concurrency}_total_tok_s": round(
            (many_tokens + args.concurrency * args.input_len) / many_s, 1
        ),
        "hf_batch1_output_tok_s": None if hf is None else round(hf, 1),
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
