"""`tandem profile`: measure one worker's capacity on this machine with the engine in process, as a ``Profile``.

Prefill: batches of seeded random prompts of the workload's length, each prompt asking for one token; a batch's
rate is its prompt tokens over the wall time until all finished, and the median batch counts (the first, untimed
prompt warms the model up). Decode: at each running batch size b of the ladder, b streams with prompts of the
workload's length are prefilled, then ``warmup_steps`` engine steps run untimed and ``decode_steps`` timed; TPOT(b)
is the median step time (every step then samples one token per stream). The ladder is cut at ``max_batch``, the
streams of prompt + output tokens the KV cache holds (and at most ``max_num_seqs``); a ladder past it ends with
``max_batch`` itself.

Random prompts differ in their first block, so the prefix cache never shortens a measurement.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common.config import ProfileConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from services.planner.profile import DecodeProfile, PrefillProfile, Profile


@dataclass(frozen=True)
class DecodePoint:
    """One rung of the ladder: the mean step time measured, and the TPOT the profile keeps (``monotone_tpot``)."""

    batch: int
    measured_ms: float
    tpot_ms: float


@dataclass(frozen=True)
class Measurement:
    """What `tandem profile` measured: the prefill batch rates, the decode ladder and the KV limit."""

    prefill_tokens_per_s: tuple[float, ...]
    decode: tuple[DecodePoint, ...]
    max_batch: int

    def profile(self, overhead_ms: float, source: str) -> Profile:
        prefill = PrefillProfile(tokens_per_s=statistics.median(self.prefill_tokens_per_s), overhead_ms=overhead_ms)
        points = tuple((float(p.batch), p.tpot_ms) for p in self.decode)
        return Profile(prefill=prefill, decode=DecodeProfile(tpot_ms_by_batch=points, max_batch=self.max_batch),
                       source=source)


def monotone_tpot(measured_ms: Sequence[float]) -> list[float]:
    """The running maximum of TPOTs measured at increasing batch sizes.

    ``DecodeProfile`` requires TPOT never to fall as the batch grows (a larger batch never makes a step faster);
    a measured dip is timing noise (a busy neighbour during the smaller batch), so the larger batch keeps the
    smaller one's time: the profile errs towards more decode replicas, never fewer.
    """
    highest, kept = 0.0, []
    for ms in measured_ms:
        highest = max(highest, ms)
        kept.append(highest)
    return kept


def max_batch(engine: LLMEngine, config: ProfileConfig) -> int:
    """Streams of ``prompt_tokens + output_tokens`` the KV cache holds at once, at most ``max_num_seqs``."""
    context = config.prompt_tokens + config.output_tokens
    if context > engine.max_model_len:
        raise ValueError(f"--prompt-tokens + --output-tokens = {context} exceeds the model's length "
                         f"{engine.max_model_len}")
    blocks_per_stream = math.ceil(context / engine.config.cache.block_size)
    streams = min(engine.stats().total_blocks // blocks_per_stream, engine.config.scheduler.max_num_seqs)
    if streams < 1:
        raise ValueError(f"the KV cache ({engine.stats().total_blocks} blocks) holds no stream of {context} tokens")
    return streams


def ladder(batches: Sequence[int], limit: int) -> list[int]:
    """The batch sizes at most `limit`; if any was cut, `limit` itself closes the ladder."""
    kept = [b for b in batches if b <= limit]
    return kept + [limit] if len(kept) < len(batches) and limit not in kept else kept


class PromptSource:
    """Seeded random prompts of token ids below the vocabulary size (no special meaning, no shared prefix)."""

    def __init__(self, vocab_size: int, length: int, seed: int) -> None:
        self.vocab_size, self.length = vocab_size, length
        self.generator = torch.Generator().manual_seed(seed)

    def take(self, count: int) -> list[list[int]]:
        return torch.randint(0, self.vocab_size, (count, self.length), generator=self.generator).tolist()


def _run_until_done(engine: LLMEngine, request_ids: Sequence[str]) -> None:
    pending = set(request_ids)
    while pending:
        pending -= {out.request_id for out in engine.step(only_finished=True) if out.finished}
    engine.finish_in_flight()


def measure_prefill(engine: LLMEngine, prompts: PromptSource, config: ProfileConfig) -> list[float]:
    """Prompt tokens a second of each timed batch (one token asked per prompt)."""
    one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    _run_until_done(engine, [engine.add_request(None, ids, one_token) for ids in prompts.take(1)])  # warm-up
    rates = []
    for _ in range(config.prefill_batches):
        batch = prompts.take(config.prefill_batch_size)
        started = time.perf_counter()
        _run_until_done(engine, [engine.add_request(None, ids, one_token) for ids in batch])
        rates.append(len(batch) * prompts.length / (time.perf_counter() - started))
    return rates


def measure_step_ms(engine: LLMEngine, prompts: PromptSource, batch: int, config: ProfileConfig) -> float:
    """Median engine step time (ms) with `batch` streams decoding (the median, not the mean: a neighbour's burst
    on a shared machine slows a few steps, not the engine); ValueError if the streams did not all stay running."""
    steps = config.warmup_steps + config.decode_steps
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)  # none ends while timed
    before = engine.stats()
    request_ids = [engine.add_request(None, ids, params) for ids in prompts.take(batch)]
    try:
        while engine.stats().prefill_tokens - before.prefill_tokens < batch * prompts.length:
            engine.step()
        for _ in range(config.warmup_steps):
            engine.step()
        step_s = []
        for _ in range(config.decode_steps):
            started = time.perf_counter()
            engine.step()
            step_s.append(time.perf_counter() - started)
        _check_steady(engine, before.num_preemptions, batch)
        return statistics.median(step_s) * 1e3
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)
        engine.finish_in_flight()


def _check_steady(engine: LLMEngine, preemptions_before: int, batch: int) -> None:
    stats = engine.stats()
    if stats.num_preemptions != preemptions_before or stats.running != batch:
        raise ValueError(f"decode at batch {batch}: {stats.running} running, "
                         f"{stats.num_preemptions - preemptions_before} preempted; the KV cache is too small")


def measure(engine: LLMEngine, config: ProfileConfig, report: Callable[[str], None] = lambda line: None
            ) -> Measurement:
    """Prefill rates, then the decode ladder (each point reported as it is measured)."""
    limit = max_batch(engine, config)
    prompts = PromptSource(engine.hf_config.vocab_size, config.prompt_tokens, config.prompt_seed)
    rates = measure_prefill(engine, prompts, config)
    report(f"prefill: {', '.join(f'{rate:.0f}' for rate in rates)} prompt tokens/s")
    batches, measured = ladder(config.decode_batches, limit), []
    for batch in batches:
        measured.append(measure_step_ms(engine, prompts, batch, config))
        report(f"decode: batch {batch}: {measured[-1]:.2f} ms/step")
    points = tuple(DecodePoint(b, ms, kept) for b, ms, kept in zip(batches, measured, monotone_tpot(measured)))
    return Measurement(tuple(rates), points, limit)


def source_line(engine: LLMEngine, config: ProfileConfig) -> str:
    """Where a profile came from: the model, device and numeric type, the workload shape, the date (UTC)."""
    model = engine.config.model
    return (f"tandem profile: {model.model} on {engine.device} ({engine.dtype}, load {model.load_format}), "
            f"prompt {config.prompt_tokens} + output {config.output_tokens} tokens, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def format_table(measurement: Measurement) -> str:
    """The decode ladder (measured and kept TPOT) under the prefill rate and the KV limit."""
    rate = statistics.median(measurement.prefill_tokens_per_s)
    lines = [f"prefill: {rate:.0f} prompt tokens/s (median of {len(measurement.prefill_tokens_per_s)} batches)",
             f"decode: max_batch {measurement.max_batch} (KV cache)",
             f"{'batch':>7} {'step ms':>9} {'TPOT ms':>9}"]
    lines += [f"{p.batch:>7} {p.measured_ms:>9.2f} {p.tpot_ms:>9.2f}" for p in measurement.decode]
    return "\n".join(lines)
