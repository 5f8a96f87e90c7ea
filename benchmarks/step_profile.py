"""Where the GPU time of one engine step goes, kernel by kernel (torch.profiler, CUDA activity only).

    python -m benchmarks.step_profile --shape llama8b [--phases prefill,mixed,decode] [--json out.json]

Phases: ``prefill`` (8 prompts of 2048 tokens: one 16,384-token step, as the ``prefill`` workload runs),
``mixed`` (64 decode streams plus one 2,048-token prompt arriving: the mixed steps of serving), ``decode``
(256 streams at context ~300, eager: graphs hide their kernels from some CUPTI versions). ``host`` runs alone, on
an engine with CUDA graphs: W1 under cProfile, the host functions by own time, to show what the host does per
decode step while the GPU replays the graph. Per phase it prints the
GPU time by kernel class (gemm, attention, norm, rotary, activation, sampling, copy, other) and the top kernels,
and the GEMMs' achieved TFLOP/s (2 x non-embedding parameters x tokens over GEMM time) against the measured
matmul peak, so each class reads as a share of the step and the GEMMs as a ratio to the hardware.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.attention_kernels import matmul_rate
from benchmarks.workloads import SHAPES, Workload, random_prompts, workload, write_shape_config
from common.engine import LLM, SamplingParams

# First match wins; patterns are matched against the lower-cased kernel name.
KERNEL_CLASSES = (
    ("gemm", r"gemm|nvjet|sm90_xmma|cutlass|cublas|matmul"),
    ("attention", r"attention|attn|flash|_prefill_kernel|_decode_split|_combine_splits"),
    ("norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|gelu|_and_mul"),
    ("sampling", r"argmax|topk|sort|softmax|multinomial|exponential|scatter|radix"),
    ("kv write", r"reshape_and_cache|cache_write|kv_cache|store_kv"),
    ("copy", r"copy|memcpy|memset|fill|cat|index"),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def _gpu_events(prof) -> list[tuple[str, float, int]]:
    """(kernel name, total GPU ms, calls) for every CUDA kernel/memcpy the profiler saw."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if event.device_type == torch.autograd.DeviceType.CUDA and device_us > 0:
            rows.append((event.key, device_us / 1e3, event.count))
    return rows


def summarize(rows: list[tuple[str, float, int]], gemm_flops: float, peak_tflops: float, top: int) -> dict:
    by_class: dict[str, float] = defaultdict(float)
    for name, ms, _ in rows:
        by_class[kernel_class(name)] += ms
    total = sum(by_class.values())
    gemm_ms = by_class.get("gemm", 0.0)
    gemm_tflops = gemm_flops / (gemm_ms / 1e3) / 1e12 if gemm_ms else 0.0
    return {
        "gpu_ms": round(total, 2),
        "classes": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "gemm_TFLOP_s": round(gemm_tflops, 1),
        "gemm_of_peak": round(gemm_tflops / peak_tflops, 3) if peak_tflops else None,
        "top": [(name[:90], round(ms, 2), calls) for name, ms, calls in sorted(rows, key=lambda r: -r[1])[:top]],
    }


def linear_params(llm: LLM) -> int:
    """Parameters every token multiplies through (embedding and lm_head excluded: logits are per sequence)."""
    skip = ("embed_tokens", "lm_head")
    return sum(p.numel() for name, p in llm.engine.model.named_parameters() if not any(s in name for s in skip))


def profiled(llm: LLM, prompts: list[list[int]], max_tokens: int):
    """Profile one generate call; a warm-up of other prompts first (the same ones would hit the prefix cache)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    warm_up = random_prompts([len(p) for p in prompts[:2]], llm.engine.hf_config.vocab_size, 99)
    llm.generate([{"prompt_token_ids": p} for p in warm_up], params)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(requests, params)
        torch.cuda.synchronize()
    return prof


def phase_prefill(llm: LLM, vocab: int) -> tuple[object, int]:
    prompts = random_prompts([2048] * 8, vocab, 11)
    return profiled(llm, prompts, 1), 8 * 2048


def phase_decode(llm: LLM, vocab: int) -> tuple[object, int]:
    prompts = random_prompts([256] * 256, vocab, 12)
    # 256 x 256 prefill tokens + 256 x 31 decode tokens; the caller subtracts nothing: tokens = all computed.
    return profiled(llm, prompts, 32), 256 * 256 + 256 * 31


def phase_mixed(llm: LLM, vocab: int) -> tuple[object, int]:
    """64 streams decoding while one 2,048-token prompt joins (the chunked prefill rides along their steps)."""
    prompts = random_prompts([512] * 64 + [2048], vocab, 13)
    return profiled(llm, prompts, 24), 64 * 512 + 2048 + 64 * 23 + 23


def host_profile(llm: LLM, vocab: int, top: int) -> dict:
    """W1 (256 x 256 prompt, 256 output) under cProfile: wall time and the host functions by own time."""
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in random_prompts([256] * 16, vocab, 98)], params)
    requests = [{"prompt_token_ids": p} for p in random_prompts([256] * 256, vocab, 14)]
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    started = time.perf_counter()
    profiler.enable()
    llm.generate(requests, params)
    torch.cuda.synchronize()
    profiler.disable()
    wall = time.perf_counter() - started
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print(f"== host: W1 under cProfile, {wall:.3f} s wall\n{text.getvalue()}")
    runtime = runtime_calls(llm, vocab, top)
    timelines = {name: gpu_timeline(llm, workload(name, vocab)) for name in ("W1", "W2")}
    return {"wall_s": round(wall, 3), "stats": text.getvalue(), "runtime": runtime, "timelines": timelines}


def gpu_timeline(llm: LLM, load: Workload) -> dict:
    """``load`` without any profiler: per launched step, a CUDA event before its first kernel and its ``done`` event.

    GPU idle between steps = start(N+1) - done(N) summed (the GPU reached step N+1's start only when the host had
    enqueued it); the span of a step = done - start (host-paced launches inside an eager step count here).
    """
    runner = llm.engine.runner
    original, marks = runner.launch, []

    def launch(step, previous=None):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        launched = original(step, previous)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        marks.append((start, end, runner._can_replay(step), len(step.scheduled)))
        return launched

    runner.launch = launch
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in load.output_lens]
    requests = [{"prompt_token_ids": p} for p in load.prompts]
    torch.cuda.synchronize()
    started = time.perf_counter()
    try:
        llm.generate(requests, params)
        torch.cuda.synchronize()
    finally:
        del runner.launch
    wall = time.perf_counter() - started
    spans = {"graph": 0.0, "eager": 0.0}
    gaps = {"graph": 0.0, "eager": 0.0}
    for (start, end, replay, _), (next_start, _, next_replay, _) in zip(marks, marks[1:] + [(None, None, None, 0)]):
        spans["graph" if replay else "eager"] += start.elapsed_time(end)
        if next_start is not None:
            gaps["graph" if next_replay else "eager"] += max(end.elapsed_time(next_start), 0.0)
    report = {
        "workload": load.name,
        "wall_s": round(wall, 3),
        "output_tok_s": round(load.output_tokens / wall, 1),
        "steps": len(marks),
        "span_ms": spans,
        "gap_before_ms": gaps,
        "graph_steps": sum(1 for m in marks if m[2]),
    }
    print(f"== host: {load.name} GPU timeline (no profiler): {json.dumps(report)}")
    return report


def runtime_calls(llm: LLM, vocab: int, top: int) -> str:
    """torch.profiler's CPU-side view of 256 streams decoding 48 steps: which ops and CUDA runtime calls hold the
    host (a launch that blocks shows up as a long cudaLaunchKernel / cudaGraphLaunch / cudaMalloc)."""
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in random_prompts([256] * 256, vocab, 15)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(requests, params)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print(f"== host: CPU-side ops and CUDA runtime calls, 256 streams x 48 tokens\n{table}")
    return table


def build(shape: str, eager: bool) -> LLM:
    return LLM(
        str(write_shape_config(shape)),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_num_seqs=1024,
        max_num_batched_tokens=16384,
        gpu_memory_utilization=0.85,
        enforce_eager=eager,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--phases", default="prefill,mixed,decode", help="or: host (alone)")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    peak = matmul_rate().rate
    phases = {"prefill": phase_prefill, "mixed": phase_mixed, "decode": phase_decode}
    report = {"gpu": torch.cuda.get_device_name(), "matmul_TFLOP_s": round(peak, 1), "phases": {}}
    if args.phases == "host":
        llm = build(args.shape, eager=False)
        report["host"] = host_profile(llm, llm.engine.hf_config.vocab_size, args.top * 3)
        _write(args.json, report)
        return
    llm = build(args.shape, eager=True)  # eager: every kernel is visible to the profiler
    vocab = llm.engine.hf_config.vocab_size
    flops_per_token = 2.0 * linear_params(llm)
    for name in args.phases.split(","):
        prof, tokens = phases[name](llm, vocab)
        summary = summarize(_gpu_events(prof), flops_per_token * tokens, peak, args.top)
        summary["tokens"] = tokens
        report["phases"][name] = summary
        print(
            f"== {name}: {tokens} tokens, GPU {summary['gpu_ms']} ms, GEMM {summary['gemm_TFLOP_s']} TFLOP/s "
            f"({summary['gemm_of_peak']} of peak)"
        )
        for label, ms in summary["classes"].items():
            print(f"   {label:<11} {ms:9.2f} ms  {ms / summary['gpu_ms']:6.1%}")
        for kernel, ms, calls in summary["top"]:
            print(f"   {ms:9.2f} ms {calls:6d}x  {kernel}")
    _write(args.json, report)


def _write(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
