"""HF transformers on the same GPU and workloads as benchmarks/throughput.py: the peer in the same run.

    python -m benchmarks.hf_baseline --shape llama8b [--modes static64,static256,cb] [--json out.json]

Random bf16 weights of the shape; W1 (256 x 256 prompt tokens, 256 output tokens, EOS ignored) through
``model.generate`` with static batches of 64 and 256, and through ``model.generate_batch`` (continuous
batching, ``attn_implementation="paged|sdpa"``). W2 is not run here: ``generate_batch`` takes one
``max_new_tokens`` for all requests, and static batches padded to 2048 + 512 tokens do not fit at batch 256.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.workloads import SHAPES, workload, write_shape_config


def load_hf(shape: str, attn_implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(write_shape_config(shape))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    return model.eval()


def static_batches(model, prompts: list[list[int]], output_len: int, batch: int) -> float:
    """Seconds for all prompts in static batches (W1's prompts are of equal length: no padding)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[first : first + batch], device="cuda")
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - started


def continuous_batching(model, prompts: list[list[int]], output_len: int) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    model.generate_batch(prompts[:8], generation_config=config)  # warm-up (graph capture, compile)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate_batch(prompts, generation_config=config)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--modes", default="static64,static256,cb")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/hf_baseline.py needs a CUDA GPU")
    import transformers

    load = workload("W1", vocab_size=SHAPES[args.shape]["vocab_size"])
    output_len = load.output_lens[0]
    results = {
        "gpu": torch.cuda.get_device_name(),
        "shape": args.shape,
        "transformers": transformers.__version__,
        "workload": "W1",
        "runs": [],
    }
    for mode in args.modes.split(","):
        attn = "paged|sdpa" if mode == "cb" else "sdpa"
        model = load_hf(args.shape, attn)
        try:
            if mode == "cb":
                seconds = continuous_batching(model, load.prompts, output_len)
            else:
                batch = int(mode.removeprefix("static"))
                static_batches(model, load.prompts[:batch], 8, batch)  # warm-up
                seconds = static_batches(model, load.prompts, output_len, batch)
            run = {
                "mode": mode,
                "seconds": round(seconds, 2),
                "output_tok_s": round(load.output_tokens / seconds, 1),
                "total_tok_s": round((load.output_tokens + load.prompt_tokens) / seconds, 1),
            }
        except Exception as exc:  # report, don't hide: an API change in transformers must show in the table
            run = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]}
        results["runs"].append(run)
        print(run, flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\nHF transformers {results['transformers']} on {results['gpu']}, {args.shape}, W1")
    for run in results["runs"]:
        print(f"{run['mode']:10s} {run.get('output_tok_s', run.get('error'))}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
