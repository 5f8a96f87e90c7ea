"""Micro-benchmark of the Triton attention kernels against the GPU's own ceilings (CUDA only).

Decode (split-KV) at batch 64/256 x context 1K/4K/16K: achieved HBM bandwidth (K+V read, q read, out
written) next to a device-to-device copy's bandwidth measured in the same run. Prefill at 2048-token
prompts: TFLOP/s (causal, 2 * L^2 * D * heads per sequence) next to an 8192^3 bf16 matmul's, torch SDPA's
flash attention on contiguous K/V, and the torch reference. Shapes: Llama-3-8B attention (32 q heads, 8 kv
heads, dim 128), bf16, block size 16, random block tables. Times are do_bench medians.

    PYTHONPATH=. python benchmarks/attention_kernels.py [--json results.json] [--quick] [--no-reference]
    PYTHONPATH=. python benchmarks/attention_kernels.py --prefill-sweep   # prefill tile configs, 4x2048 and 1x8192
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
REFERENCE_BUDGET_BYTES = 24 * 2**30  # the reference gathers K/V in float32: skip it past this


@dataclass(frozen=True)
class Row:
    """One measurement: what ran, its median time, and the rate it reached."""

    kernel: str
    shape: str
    ms: float
    rate: float
    unit: str
    note: str = ""


def bench_ms(fn) -> float:  # noqa: ANN001 - any zero-argument callable
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> Row:
    """Device-to-device copy of 2 GiB: bytes read + written per second, the decode kernel's ceiling."""
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return Row("torch copy", "2 GiB", ms, 2 * src.nbytes / ms / 1e9, "TB/s")


def matmul_rate() -> Row:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=DTYPE) for _ in range(2))
    ms = bench_ms(lambda: a @ b)
    return Row("torch matmul", "8192^3 bf16", ms, 2 * 8192**3 / ms / 1e9, "TFLOP/s")


def paged_batch(seq_lens: list[int], query_lens: list[int], seed: int):  # noqa: ANN201 - (metadata, k, v)
    """Random K/V in a cache just big enough, each sequence's blocks a random permutation of the pool."""
    from kernels.attention_metadata import AttentionMetadata

    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    kv = torch.empty(2, sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    kv.normal_(generator=gen)
    perm = torch.randperm(sum(blocks), device="cuda", generator=gen).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    for i, start in enumerate(torch.tensor([0, *blocks]).cumsum(0)[:-1].tolist()):
        tables[i, : blocks[i]] = perm[start : start + blocks[i]]
    starts = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    md = AttentionMetadata(
        slot_mapping=torch.full((sum(query_lens),), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=starts.cuda(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        block_size=BLOCK_SIZE,
    )
    return md, kv[0], kv[1]


def decode_rows(batch: int, context: int, with_reference: bool) -> list[Row]:
    from kernels.paged_attention import choose_decode_splits, paged_attention_reference, paged_decode_attention

    md, k_cache, v_cache = paged_batch([context] * batch, [1] * batch, seed=batch + context)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    moved = 2 * batch * context * KV_HEADS * HEAD_DIM * 2 + 2 * q.nbytes  # K+V read, q read, out written
    shape = f"B={batch} ctx={context}"
    rows = []
    chosen = choose_decode_splits(batch, KV_HEADS, context)
    for splits in sorted({1, chosen, 2 * chosen}):  # the heuristic's pick and its neighbours
        ms = bench_ms(lambda s=splits: paged_decode_attention(q, k_cache, v_cache, md.seq_lens, md.block_tables,
                                                              SCALE, s))  # fmt: skip
        note = f"splits={splits}" + (" (chosen)" if splits == chosen else "")
        rows.append(Row("triton decode", shape, ms, moved / ms / 1e9, "TB/s", note))
    if with_reference and 3 * moved < REFERENCE_BUDGET_BYTES:  # bf16 gather + its float32 copy
        ms = bench_ms(lambda: paged_attention_reference(q, k_cache, v_cache, md, SCALE))
        rows.append(Row("torch reference", shape, ms, moved / ms / 1e9, "TB/s"))
    return rows


def prefill_rows(prompts: int, prompt_len: int, with_reference: bool) -> list[Row]:
    import torch.nn.functional as F

    from kernels.paged_attention import paged_attention_reference, paged_prefill_attention

    md, k_cache, v_cache = paged_batch([prompt_len] * prompts, [prompt_len] * prompts, seed=prompt_len)
    q = torch.randn(prompts * prompt_len, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    flops = prompts * 2 * prompt_len**2 * HEAD_DIM * HEADS  # QK^T and PV over the causal half
    shape = f"{prompts}x{prompt_len} tokens"
    ms = bench_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, md.query_start_loc, md.seq_lens,
                                                  md.block_tables, prompt_len, SCALE))  # fmt: skip
    rows = [Row("triton prefill", shape, ms, flops / ms / 1e9, "TFLOP/s")]
    qc = q.view(prompts, prompt_len, HEADS, HEAD_DIM).transpose(1, 2)
    kc = torch.randn(prompts, KV_HEADS, prompt_len, HEAD_DIM, device="cuda", dtype=DTYPE)
    ms = bench_ms(lambda: F.scaled_dot_product_attention(qc, kc, kc, is_causal=True, scale=SCALE, enable_gqa=True))
    rows.append(Row("torch sdpa", shape, ms, flops / ms / 1e9, "TFLOP/s", "contiguous K/V, not paged"))
    if with_reference:
        ms = bench_ms(lambda: paged_attention_reference(q, k_cache, v_cache, md, SCALE))
        rows.append(Row("torch reference", shape, ms, flops / ms / 1e9, "TFLOP/s"))
    return rows


def prefill_sweep() -> list[Row]:
    """The prefill kernel under each tile config (rows, block_n, warps, stages) at 4 x 2048 and 1 x 8192, beside
    SDPA on contiguous K/V: which config to make the default (configs that do not compile are listed as failed)."""
    import functools
    import itertools

    import kernels.paged_attention as pa

    default = pa.prefill_tiles
    rows: list[Row] = []
    for prompts, prompt_len in ((4, 2048), (1, 8192)):
        rows += prefill_rows(prompts, prompt_len, False)
        md, k_cache, v_cache = paged_batch([prompt_len] * prompts, [prompt_len] * prompts, seed=prompt_len)
        q = torch.randn(prompts * prompt_len, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        run = functools.partial(pa.paged_prefill_attention, q, k_cache, v_cache, md.query_start_loc, md.seq_lens,
                                md.block_tables, prompt_len, SCALE)  # looks prefill_tiles up on each call
        expected = run().float()
        flops = prompts * 2 * prompt_len**2 * HEAD_DIM * HEADS
        for tile_rows, block_n, warps, stages in itertools.product((128, 256), (32, 64, 128), (4, 8), (2, 3)):
            config = pa.TileConfig(rows=tile_rows, block_n=block_n, num_warps=warps, num_stages=stages)
            pa.prefill_tiles = lambda head_dim, dtype, config=config: config
            label = f"r{tile_rows} n{block_n} w{warps} s{stages}"
            try:
                error = (run().float() - expected).abs().max().item()
                ms = bench_ms(run)
                note = "" if error < 0.05 else f"WRONG: max abs diff {error:.3f} vs the default config"
                rows.append(Row("prefill " + label, f"{prompts}x{prompt_len}", ms, flops / ms / 1e9, "TFLOP/s", note))
            except Exception as error:  # noqa: BLE001 - out of shared memory or registers: report and go on
                rows.append(Row("prefill " + label, f"{prompts}x{prompt_len}", 0.0, 0.0, "failed", str(error)[:60]))
            finally:
                pa.prefill_tiles = default
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'kernel':<16} {'shape':<20} {'ms':>9} {'rate':>9} {'unit':<8} note")
    for r in rows:
        print(f"{r.kernel:<16} {r.shape:<20} {r.ms:>9.3f} {r.rate:>9.2f} {r.unit:<8} {r.note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--quick", action="store_true", help="batch 64 only, no torch reference")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) torch reference")
    parser.add_argument("--prefill-sweep", action="store_true", help="only the prefill kernel's tile configs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention_kernels: needs a CUDA GPU (the kernels are Triton; nothing to measure on CPU)")
    if args.prefill_sweep:
        print_table(prefill_sweep())
        return
    with_reference = not (args.quick or args.no_reference)
    rows = [copy_bandwidth(), matmul_rate()]
    for batch in (64,) if args.quick else (64, 256):
        for context in (1024, 4096, 16384):
            rows += decode_rows(batch, context, with_reference)
            torch.cuda.empty_cache()  # the next cache may be 4x bigger
    rows += prefill_rows(4, 2048, with_reference)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
