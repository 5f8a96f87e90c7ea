"""vLLM on the same GPU, shapes and workloads as benchmarks/throughput.py: the peer users would pick instead.

    PYTHONPATH=/tmp/vllm-site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 python3 -m benchmarks.vllm_peer --shape llama8b

(``../shared/tools/vllm-bundle.sh`` says how vLLM reaches the GPU machine.) Random bf16 weights
(``load_format="dummy"``), no tokenizer, prompts as token ids, EOS ignored; vLLM's own defaults otherwise.
Prints the same table as throughput.py, so the two read side by side.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.workloads import SHAPES, Workload, decode_ms_per_token, random_prompts, workload, write_shape_config


def run_workload(llm, load: Workload) -> dict:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in load.output_lens]
    prompts = [{"prompt_token_ids": p} for p in load.prompts]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "workload": load.name,
        "requests": len(load.prompts),
        "seconds": round(elapsed, 3),
        "output_tok_s": round(produced / elapsed, 1),
        "total_tok_s": round((produced + load.prompt_tokens) / elapsed, 1),
    }


def generate_one(llm):
    """One greedy request to completion, EOS ignored (what decode_ms_per_token times)."""
    from vllm import SamplingParams

    def run(prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--workloads", default="W1,W2,prefill,latency")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--json")
    args = parser.parse_args()
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(
        model=str(write_shape_config(args.shape)),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
    )
    report = {"engine": "vllm", "shape": args.shape, "startup_s": round(time.perf_counter() - started, 1), "runs": []}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    vocab = SHAPES[args.shape]["vocab_size"]
    run_workload(llm, Workload("warmup", random_prompts([64] * 8, vocab, 7), [16] * 8))
    for name in args.workloads.split(","):
        if name == "latency":
            for context in (512, 4096):
                ms = decode_ms_per_token(generate_one(llm), vocab, context)
                report["runs"].append({"workload": f"batch-1 decode @ctx {context}", "ms_per_token": round(ms, 2)})
                print(report["runs"][-1], flush=True)
            continue
        report["runs"].append(run_workload(llm, workload(name, vocab)))
        print(report["runs"][-1], flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
