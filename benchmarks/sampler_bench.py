"""Micro-benchmark of `Sampler.sample(...).result()`: the current sampler against the sort-based one it replaced.

Cases at batch 256 x vocab 128256 (Llama-3): greedy; temperature 0.8 + top_p 0.9; top_k 50 + top_p 0.9;
repetition 1.1 + frequency 0.2 + presence 0.1 over 1000-token prompts and 200-token outputs (penalties
alone, then with top_p). "old" swaps the former filters and penalties (kept verbatim below) into the sampler
module; everything else (temperature, inverse-CDF draw, the copies) is shared. Times are per call, after
warm-up: CUDA events on a GPU, perf_counter on the CPU. Logits are random normal * 3 (a flat-ish
distribution, so top-p keeps thousands of tokens: the hard case for a sort-free method).

    PYTHONPATH=. python benchmarks/sampler_bench.py [--batch 256] [--vocab 128256] [--iters 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from common.engine import sampler as sampler_module
from common.engine.device_copy import to_device
from common.engine.sampler import Sampler, SamplingRow
from common.engine.sampling_params import SamplingParams

PROMPT_TOKENS, OUTPUT_TOKENS = 1000, 200


# -- the former implementations (sort-based top-p, softmax min-p, host torch.unique penalties) -------------


def old_filter_top_k_top_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    chosen = [i for i, row in enumerate(rows) if row.params.uses_top_k or row.params.top_p < 1.0]
    if not chosen:
        return logits
    vocab = logits.shape[1]
    ks = [min(rows[i].params.top_k, vocab) if rows[i].params.uses_top_k else vocab for i in chosen]
    ps = [rows[i].params.top_p for i in chosen]
    index = _long(chosen, logits)
    out = logits.clone()
    if all(p >= 1.0 for p in ps):
        largest = logits[index].topk(max(ks), dim=-1).values
        kth = largest.gather(1, (_long(ks, logits) - 1).unsqueeze(1))
        out[index] = logits[index].masked_fill(logits[index] < kth, float("-inf"))
    else:
        out[index] = _old_top_k_top_p(logits[index], _long(ks, logits), _column(ps, logits))
    return out


def _old_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    ascending, order = logits.sort(dim=-1, descending=False)
    kth = ascending.gather(1, (logits.shape[1] - k).unsqueeze(1))
    ascending.masked_fill_(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1.0 - p
    outside[:, -1] = False
    ascending.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ascending)


def old_filter_min_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    chosen = [i for i, row in enumerate(rows) if row.params.min_p > 0.0]
    if not chosen:
        return logits
    index = _long(chosen, logits)
    block = logits[index]
    probs = block.softmax(dim=-1)
    threshold = _column([rows[i].params.min_p for i in chosen], logits) * probs.amax(dim=-1, keepdim=True)
    out = logits.clone()
    out[index] = block.masked_fill(probs < threshold, float("-inf"))
    return out


def old_apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if chosen:
        sequences = [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in chosen]
        row_idx, token_idx, _ = seen_token_counts(chosen, sequences, logits)
        penalty = _floats([row.params.repetition_penalty for row in rows], logits)[row_idx]
        values = logits[row_idx, token_idx]
        logits[row_idx, token_idx] = torch.where(values > 0, values / penalty, values * penalty)
    chosen = [i for i, row in enumerate(rows) if row.params.frequency_penalty or row.params.presence_penalty]
    if chosen:
        row_idx, token_idx, counts = seen_token_counts(chosen, [rows[i].output_token_ids for i in chosen], logits)
        frequency = _floats([row.params.frequency_penalty for row in rows], logits)[row_idx]
        presence = _floats([row.params.presence_penalty for row in rows], logits)[row_idx]
        logits[row_idx, token_idx] -= frequency * counts.to(logits.dtype) + presence


def seen_token_counts(
    row_ids: Sequence[int], sequences: Sequence[Sequence[int]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab = like.shape[1]
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    tokens = torch.cat([torch.as_tensor(list(seq), dtype=torch.long) for seq in sequences])
    owners = torch.repeat_interleave(torch.tensor(list(row_ids), dtype=torch.long), lengths)
    valid = (tokens >= 0) & (tokens < vocab)
    keys, counts = torch.unique(owners[valid] * vocab + tokens[valid], return_counts=True)
    keys, counts = to_device(keys, like.device), to_device(counts, like.device)
    return keys // vocab, keys % vocab, counts


def _floats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.tensor(list(values), dtype=like.dtype), like.device)


def _long(values: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.tensor(list(values), dtype=torch.long), like.device)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return _floats(values, like).unsqueeze(1)


@contextlib.contextmanager
def old_sampler() -> Iterator[None]:
    """Swap the former filters and penalties into the sampler module for the duration."""
    names = {
        "filter_top_k_top_p": old_filter_top_k_top_p,
        "filter_min_p": old_filter_min_p,
        "apply_penalties": old_apply_penalties,
    }
    saved = {name: getattr(sampler_module, name) for name in names}
    for name, function in names.items():
        setattr(sampler_module, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(sampler_module, name, function)


# -- cases and timing ----------------------------------------------------------------------------------------


def make_rows(params: SamplingParams, batch: int, vocab: int) -> list[SamplingRow]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=generator).tolist()
        output = torch.randint(0, vocab, (OUTPUT_TOKENS,), generator=generator).tolist()
        rows.append(SamplingRow(params, prompt, output))
    return rows


CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "temp0.8+top_p0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top_k50+top_p0.9": SamplingParams(top_k=50, top_p=0.9),
    "penalties(greedy)": SamplingParams(
        temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1
    ),
    "penalties+top_p0.9": SamplingParams(
        repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1, top_p=0.9
    ),
}


def time_ms(call: Callable[[], object], device: torch.device, iters: int) -> float:
    """Milliseconds per call after two warm-up calls."""
    for _ in range(2):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - begin) * 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    device = torch.device(args.device)
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(1)).mul_(3.0).to(device)
    sampler = Sampler(torch.Generator().manual_seed(2))
    print(f"device={device} batch={args.batch} vocab={args.vocab} iters={args.iters}")
    print(f"{'case':<22}{'old ms':>10}{'new ms':>10}{'speedup':>9}")
    for name in args.cases:
        rows = make_rows(CASES[name], args.batch, args.vocab)
        with old_sampler():
            old = time_ms(lambda: sampler.sample(logits, rows).result(), device, args.iters)  # noqa: B023
        new = time_ms(lambda: sampler.sample(logits, rows).result(), device, args.iters)  # noqa: B023
        print(f"{name:<22}{old:>10.2f}{new:>10.2f}{old / new:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
