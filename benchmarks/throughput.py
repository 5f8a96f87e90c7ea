"""Offline engine throughput and latency on one GPU, with the hardware limits measured in the same run.

    python -m benchmarks.throughput --shape llama8b [--workloads W1,W2,prefill,latency,preempt] [--json out.json]

Random weights of the given shape in bf16 (``--load-format dummy``), prompts of random token ids, EOS ignored.
Prints one table: output and total tokens/s per workload, batch-1 decode ms/token at contexts 512 and 4096,
prefill tokens/s for 2048-token prompts (with its share of the measured bf16 matmul FLOP/s), and the memory
report (weights, KV bytes and tokens); ``preempt`` runs 1,000 concurrent requests of 1,000 tokens and reports
how many preemptions it took instead of running out of memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.attention_kernels import copy_bandwidth, matmul_rate
from benchmarks.workloads import (
    SHAPES,
    Workload,
    decode_ms_per_token,
    random_prompts,
    workload,
    write_shape_config,
)
from common.engine import LLM, SamplingParams


def run_workload(llm: LLM, load: Workload) -> dict:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in load.output_lens]
    prompts = [{"prompt_token_ids": p} for p in load.prompts]
    preempted_before = llm.engine.scheduler.num_preemptions
    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != load.output_tokens:
        raise RuntimeError(f"{load.name}: produced {produced} tokens, expected {load.output_tokens}")
    return {
        "workload": load.name,
        "requests": len(load.prompts),
        "seconds": round(elapsed, 3),
        "output_tok_s": round(produced / elapsed, 1),
        "total_tok_s": round((produced + load.prompt_tokens) / elapsed, 1),
        "preemptions": llm.engine.scheduler.num_preemptions - preempted_before,
    }


def generate_one(llm: LLM):
    """One greedy request to completion, EOS ignored (what decode_ms_per_token times)."""

    def run(prompt: list[int], max_tokens: int) -> None:
        llm.generate(
            {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        )

    return run


class StepBreakdown:
    """Wall time per engine phase over one workload, by wrapping the engine's methods (this run only)."""

    PHASES = (("scheduler", "schedule"), ("runner", "launch"), ("engine", "_apply"))

    def __init__(self, llm: LLM) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        engine = llm.engine
        self._restore = []
        for owner_name, method in self.PHASES:
            owner = engine if owner_name == "engine" else getattr(engine, owner_name)
            self._wrap(owner, method, f"{owner_name}.{method}")
        graphs = engine.runner.decode_graphs
        if graphs is not None:
            self._wrap(graphs, "run", "graphs.run (fill + launch)")
        self._wrap(engine.runner, "_sample", "runner._sample (logits, argmax; no sync)")

    def _wrap(self, owner, method: str, label: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, method, timed)
        self._restore.append((owner, method))

    def close(self) -> dict:
        for owner, method in self._restore:
            delattr(owner, method)  # back to the class attribute
        return {label: {"seconds": round(s, 3), "calls": self.calls[label]} for label, s in self.seconds.items()}


def graph_replay_ms(llm: LLM, batch: int) -> float | None:
    """GPU time of one captured decode step at ``batch`` (its last inputs), median of 20 replays."""
    graphs = llm.engine.runner.decode_graphs
    if graphs is None:
        return None
    graph, _ = graphs._graphs[graphs.bucket_for(batch)]
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[5:])[10]


def model_flops_per_token(llm: LLM) -> float:
    """2 x parameters touched per token (embedding lookup excluded): the matmul work of one token."""
    params = sum(p.numel() for name, p in llm.engine.model.named_parameters() if "embed_tokens" not in name)
    return 2.0 * params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--workloads", default="W1,W2,prefill,latency,preempt")
    parser.add_argument("--max-num-seqs", type=int, default=1024)  # vLLM's default on an H100
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true", help="each step waits for the previous one")
    parser.add_argument("--quantization", choices=("fp8",), help="FP8 weights (the random bf16 weights quantized)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="FP8 KV cache")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each workload this many times in a row (the H200's clocks vary by ~5%% between runs)",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/throughput.py needs a CUDA GPU")

    # The ceilings, measured the same way as in attention_kernels.py (do_bench medians).
    limits = {"copy_GB_s": round(copy_bandwidth().rate * 1e3, 1), "matmul_TFLOP_s": round(matmul_rate().rate, 1)}
    torch.cuda.empty_cache()
    started = time.perf_counter()
    llm = LLM(
        str(write_shape_config(args.shape)),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_async_scheduling,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    memory = llm.engine.memory
    report = {
        "gpu": torch.cuda.get_device_name(),
        "shape": args.shape,
        "startup_s": round(time.perf_counter() - started, 1),
        "weights_GiB": round(memory.weight_bytes / 2**30, 2),
        "kv_cache_GiB": round(memory.kv_cache_bytes / 2**30, 2),
        "kv_blocks": memory.num_kv_blocks,
        "kv_tokens": memory.kv_cache_tokens,
        **limits,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "cuda_graphs": not args.enforce_eager,
        "async_scheduling": not args.no_async_scheduling,
        "quantization": args.quantization or "none",
        "kv_cache_dtype": args.kv_cache_dtype,
        "runs": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    vocab = llm.engine.hf_config.vocab_size
    run_workload(llm, Workload("warmup", random_prompts([64] * 8, vocab, 7), [16] * 8))
    for name in [name for name in args.workloads.split(",") for _ in range(args.repeat)]:
        if name == "latency":
            for context in (512, 4096):
                ms = decode_ms_per_token(generate_one(llm), vocab, context)
                report["runs"].append({"workload": f"batch-1 decode @ctx {context}", "ms_per_token": round(ms, 2)})
                print(report["runs"][-1], flush=True)
            continue
        if name.endswith("-breakdown"):
            breakdown = StepBreakdown(llm)
            result = run_workload(llm, workload(name.removesuffix("-breakdown"), vocab))
            result["workload"] = name
            result["phases"] = breakdown.close()
            result["graph_replay_ms_b256"] = graph_replay_ms(llm, 256)
            report["runs"].append(result)
            print(json.dumps(result), flush=True)
            continue
        result = run_workload(llm, workload(name, vocab))
        if name == "prefill":
            tflops = result["total_tok_s"] * model_flops_per_token(llm) / 1e12
            result["linear_TFLOP_s"] = round(tflops, 1)
            result["of_matmul_peak"] = round(tflops / limits["matmul_TFLOP_s"], 3)
        report["runs"].append(result)
        print(result, flush=True)
    print_table(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


def print_table(report: dict) -> None:
    print(
        f"\n{report['shape']} on {report['gpu']}: weights {report['weights_GiB']} GiB, "
        f"KV {report['kv_cache_GiB']} GiB "
        f"= {report['kv_tokens']} tokens; copy {report['copy_GB_s']} GB/s, matmul {report['matmul_TFLOP_s']} TFLOP/s"
    )
    print(f"{'workload':28s} {'seconds':>8s} {'out tok/s':>10s} {'total tok/s':>12s} {'preempt':>8s} {'ms/tok':>7s}")
    for run in report["runs"]:
        print(
            f"{run['workload']:28s} {run.get('seconds', ''):>8} {run.get('output_tok_s', ''):>10} "
            f"{run.get('total_tok_s', ''):>12} {run.get('preemptions', ''):>8} {run.get('ms_per_token', ''):>7}"
        )


if __name__ == "__main__":
    main()
