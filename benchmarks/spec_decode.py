"""Speculative decoding (n-gram prompt lookup): its TPOT gain, the cost of one verification step, and its cost
when nothing is accepted. Three parts, each ending in a markdown table:

``tpot``: the real default model (SmolLM2-135M-Instruct from its GGUF, bf16 on CUDA) on a repetitive chat workload
(code editing, repeat-then-summarize, continue-a-list; greedy, the chat template applied), run closed-loop at each
``--batches`` concurrency, plain and with ngram speculation (k=4, lookup 4..2; ``--extra-ks`` also at batch 1).
TPOT per request = (finish - first token) / (tokens after the first), from the wall clock after each
``engine.step()``. Greedy outputs with and without speculation must be identical (the mismatch count is printed).

``verify``: ``--verify-shape`` (default llama8b, random weights) at ~``--context`` tokens of context: the median
wall time of one decode step in which every sequence verifies k drafts, against the plain decode step at the same
batch. The drafts are forced: the engine's speculator is replaced by ``ForcedDrafts``, which proposes k random
tokens every step (no n-gram search, no back-off; they are all but always rejected, so context grows one token a
step). The plain step is reported twice: as users get it (CUDA graph, async scheduling) and synchronous (CUDA
graph, each step waits for its tokens, as a speculating step does). Verify steps run synchronously, replaying the
verification CUDA graphs captured for k (label "graph"; "eager" where they did not apply).
Break-even: the mean accepted drafts per verification a* with 1 + a* = verify_ms / plain_ms, and the per-token
acceptance rate alpha giving it under the geometric model E[emitted] = (1 - alpha^(k+1)) / (1 - alpha).

``idle``: the same real model (the fast choice), EOS ignored, seeded, plain and with speculation (k=4): random-token
prompts at temperature 0 and 1.0 (n-gram rarely finds a match: the speculator backs off) and the chat prompts at
temperature 1.0 (common n-grams recur and get proposed, a sampled continuation rarely follows them): what
speculation costs where it gains (almost) nothing. The speculator backs off after MISSES_BEFORE_BACKOFF misses;
the target is <= 3% slower.

Greedy (and seeded) outputs with speculation must equal the plain run's at the same batch; the tpot table also
counts plain-vs-plain differences between batch sizes, the bf16 floor (batch shape changes near-tied argmaxes).
Tables print as each part ends (and --json is rewritten then), so a run cut short keeps its finished parts.

One loaded engine serves every configuration of a part: ``use_speculator`` swaps the speculator it holds
(benchmark only; a served engine gets it from ``speculative_config`` at start).

    python -m benchmarks.spec_decode [--part tpot,verify,idle] [--json out.json]
    python -m benchmarks.spec_decode --device cpu --batches 1,2 --num-prompts 4 --batch1-prompts 2 \\
        --max-tokens 16 --extra-ks 2 --verify-shape tiny --verify-batches 1,2 --verify-ks 1,2 --context 32 \\
        --steps 3 --idle-prompts 2 --idle-prompt-len 32          # a CPU smoke run (float32)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.workloads import SHAPES, random_prompts, write_shape_config
from common.engine import LLM, SamplingParams
from common.engine.engine import LLMEngine
from common.engine.llm import render_chat
from common.engine.model_loading import capture_verify_graphs
from common.engine.request import Request
from common.engine.spec.speculator import Speculator
from common.engine.spec.state import MISSES_BEFORE_BACKOFF
from common.engine.stats import EngineStats
from common.speculative_config import SpeculativeConfig

LOOKUP_MAX, LOOKUP_MIN = 4, 2
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)

# ------------------------------------------------------------------------------------------- the repetitive workload

CODE = [
    "def moving_average(values, window):\n    result = []\n    for i in range(len(values) - window + 1):\n"
    "        chunk = values[i:i + window]\n        result.append(sum(chunk) / window)\n    return result\n",
    "def count_words(text):\n    counts = {}\n    for word in text.lower().split():\n"
    "        word = word.strip('.,;:!?')\n        if word:\n            counts[word] = counts.get(word, 0) + 1\n"
    "    return counts\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        if not self.items:\n"
    "            raise IndexError('pop from empty stack')\n        return self.items.pop()\n\n"
    "    def peek(self):\n        return self.items[-1]\n",
    "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n    while low <= high:\n"
    "        middle = (low + high) // 2\n        if items[middle] == target:\n            return middle\n"
    "        if items[middle] < target:\n            low = middle + 1\n        else:\n            high = middle - 1\n"
    "    return -1\n",
]
CODE_CHANGES = [
    "every variable renamed to a longer, more descriptive name",
    "type hints added to every function signature",
    "a docstring added to every function, keeping the code otherwise the same",
]
PARAGRAPHS = [
    "The river town woke slowly. Fishermen pushed their boats into the grey water while the bakery on the corner "
    "opened its shutters and the smell of bread drifted down to the docks. By seven the market square was full of "
    "carts, and the old clock above the town hall, which had been five minutes slow for as long as anyone could "
    "remember, struck the hour to nobody's surprise.",
    "Solar panels convert sunlight into electricity using semiconductor cells. When light strikes a cell, it frees "
    "electrons that flow as a current through the circuit. The panels produce direct current, so an inverter "
    "converts it into the alternating current used by homes. Output depends on the angle of the panels, the "
    "weather, and the temperature, since hot cells are less efficient than cool ones.",
    "The library opened in 1902 with three hundred books donated by local families. Over the following decades it "
    "grew into the largest collection in the region, adding a reading room, a children's wing and, in 1978, a "
    "small museum of maps. Today it lends more than forty thousand books a year and hosts a weekly chess club.",
    "To make a simple tomato sauce, warm olive oil in a pan, add chopped garlic and cook it gently until it is "
    "fragrant. Pour in crushed tomatoes, season with salt and a pinch of sugar, and let the sauce simmer for twenty "
    "minutes, stirring now and then. Finish it with torn basil leaves and a little more olive oil before serving.",
]
TEXT_TASKS = [
    "Repeat the following paragraph word for word, then summarize it in two sentences:\n\n{}",
    "Quote the following text exactly, then list its three main points:\n\n{}",
    "Copy this paragraph, then rewrite it in simpler words:\n\n{}",
]
LISTS = [
    "item 1, item 2, item 3, item 4, item 5",
    "step 1: open the box, step 2: remove the packing, step 3: check the parts, step 4:",
    "Monday: gym, Tuesday: swim, Wednesday: gym, Thursday: swim, Friday:",
    "1. apples\n2. bananas\n3. cherries\n4. dates\n5.",
    "room 101, room 102, room 103, room 104, room 105",
    "Chapter 1: The Beginning\nChapter 2: The Journey\nChapter 3: The Storm\nChapter 4:",
    "user_1@example.com, user_2@example.com, user_3@example.com, user_4@example.com",
    "January 1st: New Year, February 14th: Valentine's Day, March 17th: St. Patrick's Day,",
    "- Task A: done\n- Task B: done\n- Task C: in progress\n- Task D:",
    "level 1 (easy), level 2 (easy), level 3 (medium), level 4 (medium), level 5",
]


def repetitive_messages(count: int) -> list[list[dict]]:
    """``count`` one-turn chats cycling through the three families (code, text, list), so any prefix of the list
    is balanced across them. Deterministic."""
    code = [
        f"Here is a function:\n\n```python\n{c}```\n\nRewrite it with {change}."
        for change in CODE_CHANGES
        for c in CODE
    ]
    text = [task.format(p) for task in TEXT_TASKS for p in PARAGRAPHS]
    lists = [f"Continue the list for twenty more entries: {start}" for start in LISTS]
    families = [code, text, lists]
    prompts = [families[i % 3][(i // 3) % len(families[i % 3])] for i in range(count)]
    return [[{"role": "user", "content": prompt}] for prompt in prompts]


# ------------------------------------------------------------------------------------------------ engine plumbing


def ngram_speculator(engine: LLMEngine, k: int) -> Speculator:
    config = SpeculativeConfig.parse(
        {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": LOOKUP_MAX,
            "prompt_lookup_min": LOOKUP_MIN,
        }
    )
    return Speculator(config, engine.max_model_len)


def use_speculator(engine: LLMEngine, speculator: Speculator | None, k: int | None = None) -> None:
    """Swap the speculator of a loaded engine (None: plain decoding). The engine hands its speculator to the
    scheduler (which asks for drafts) and to the token applier (which reports verifications): all three change.
    On CUDA the verification CUDA graphs for ``k`` drafts (default: the speculator's) are captured as a served
    engine started with that ``speculative_config`` would have them."""
    engine.speculator = engine.scheduler.speculator = engine.sampled_tokens.speculator = speculator
    k = k if k is not None else (speculator.config.num_speculative_tokens if speculator is not None else 0)
    install_verify_graphs(engine, k)


def install_verify_graphs(engine: LLMEngine, k: int) -> None:
    """(Re)capture the runner's verification graphs for ``k`` drafts per sequence (CUDA, graphs on, k >= 1)."""
    runner = engine.runner
    if k < 1 or runner.decode_graphs is None:
        return
    if runner.verify_graphs is not None and runner.verify_graphs.tokens_per_seq == k + 1:
        return
    runner.verify_graphs = None
    gc.collect()
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k)
    config = dataclasses.replace(
        engine.config, scheduler=dataclasses.replace(engine.config.scheduler, speculative_config=spec)
    )
    runner.verify_graphs = capture_verify_graphs(
        config, engine.model, runner.kv_cache, engine.device, engine.max_model_len
    )


class ForcedDrafts(Speculator):
    """Proposes ``k`` random draft tokens for every decode step it may (``k`` = 0: none, but the step still runs
    synchronously like a speculating one); never backs off. Random drafts are all but always rejected."""

    def __init__(self, k: int, vocab_size: int, max_model_len: int) -> None:
        super().__init__(SpeculativeConfig(method="ngram", num_speculative_tokens=max(k, 1)), max_model_len)
        self.k, self.vocab_size = k, vocab_size
        self.rng = np.random.default_rng(k)

    def drafts_for(self, request: Request, num_running: int, max_drafts: int) -> tuple[int, ...]:
        request.speculating = True
        count = min(self.k, max_drafts, self._room(request))
        if request.num_pending_tokens or count <= 0:
            return ()
        return tuple(int(t) for t in self.rng.integers(100, self.vocab_size - 100, size=count))

    def on_verified(self, request: Request, num_accepted: int) -> None:
        pass


def synchronize(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def engine_settings(args: argparse.Namespace, memory_fraction: float) -> dict:
    cuda = args.device != "cpu" and torch.cuda.is_available()
    settings = {"device": args.device, "dtype": args.dtype or ("bfloat16" if cuda else "float32")}
    if cuda:
        settings["gpu_memory_utilization"] = memory_fraction
    return settings


@dataclass
class Trace:
    """One request's stream: when its first tokens arrived, when it finished, what it produced."""

    first_at: float | None = None
    first_count: int = 0
    finished_at: float | None = None
    token_ids: list[int] = field(default_factory=list)

    def tpot_ms(self) -> float | None:
        later = len(self.token_ids) - self.first_count
        return (self.finished_at - self.first_at) / later * 1e3 if later > 0 else None


def run_closed_loop(engine: LLMEngine, prompts: list[dict], params: list[SamplingParams], concurrency: int):
    """Runs ``prompts`` keeping ``concurrency`` in flight (a new one starts as one finishes), streaming every
    step's outputs. Returns one Trace per prompt, in order, and the wall seconds."""
    queue, traces, active = list(range(len(prompts))), [Trace() for _ in prompts], {}
    started = time.perf_counter()
    while queue or active:
        while queue and len(active) < concurrency:
            index = queue.pop(0)
            active[engine.add_request(sampling_params=params[index], **prompts[index])] = index
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.request_id in active:
                record(traces[active[output.request_id]], output, now)
                if output.finished:
                    del active[output.request_id]
    if not engine.groups:
        engine.finish_in_flight()
    return traces, time.perf_counter() - started


def record(trace: Trace, output, now: float) -> None:
    tokens = output.outputs[0].token_ids
    if tokens and trace.first_at is None:
        trace.first_at, trace.first_count = now, len(tokens)
    if output.finished:
        trace.finished_at, trace.token_ids = now, list(tokens)


def spec_delta(before: EngineStats, after: EngineStats) -> dict:
    drafts = after.spec_drafts - before.spec_drafts
    draft_tokens = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    emitted = after.spec_emitted_tokens - before.spec_emitted_tokens
    return {
        "verifications": drafts,
        "draft_tokens": draft_tokens,
        "acceptance": round(accepted / draft_tokens, 3) if draft_tokens else None,
        "emitted_per_verification": round(emitted / drafts, 2) if drafts else None,
    }


def measure_run(engine, prompts, params, concurrency, speculator, label: str) -> tuple[dict, list[Trace]]:
    """One configuration over the prompts: TPOT mean/p50 (ms), mean output length, speculation counts."""
    use_speculator(engine, speculator)
    before = engine.stats()
    traces, seconds = run_closed_loop(engine, prompts, params, concurrency)
    tpots = [t for t in (trace.tpot_ms() for trace in traces) if t is not None]
    row = {
        "config": label,
        "batch": concurrency,
        "requests": len(prompts),
        "seconds": round(seconds, 2),
        "tpot_ms_mean": round(statistics.fmean(tpots), 3) if tpots else None,
        "tpot_ms_p50": round(statistics.median(tpots), 3) if tpots else None,
        "mean_output_len": round(statistics.fmean(len(t.token_ids) for t in traces), 1),
        **spec_delta(before, engine.stats()),
    }
    print(json.dumps(row), flush=True)
    return row, traces


def mismatches(reference: list[Trace], traces: list[Trace]) -> tuple[int, list[int]]:
    """(requests whose tokens differ, the first differing position of each)."""
    firsts = []
    for ref, got in zip(reference, traces, strict=True):
        if ref.token_ids != got.token_ids:
            pairs = zip(ref.token_ids, got.token_ids, strict=False)
            firsts.append(
                next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref.token_ids), len(got.token_ids)))
            )
    return len(firsts), firsts


def compare_configs(engine, prompts, params, batch: int, ks: list[int], label: str) -> tuple[list[dict], list]:
    """Plain, then ngram speculation with each k, on the same prompts; rows carry speedup and mismatches.
    Returns the rows and the plain run's traces."""
    plain, reference = measure_run(engine, prompts, params, batch, None, f"{label} plain")
    plain.update(k=0, speedup=1.0, mismatches=0)
    rows = [plain]
    for k in ks:
        row, traces = measure_run(engine, prompts, params, batch, ngram_speculator(engine, k), f"{label} ngram k={k}")
        count, firsts = mismatches(reference, traces)
        speedup = plain["tpot_ms_mean"] / row["tpot_ms_mean"] if row["tpot_ms_mean"] else None
        row.update(k=k, speedup=round(speedup, 3) if speedup else None, mismatches=count, first_diffs=firsts)
        if count:
            print(
                f"WARNING: {label} batch {batch} k={k}: {count} outputs differ from plain (first positions {firsts})",
                flush=True,
            )
        rows.append(row)
    return rows, reference


def note_batch_noise(plain_row: dict, first_plain: list[Trace], plain: list[Trace]) -> None:
    """Plain at this batch against plain at the first batch on their common prompts: in bf16 a different batch
    (or query length) can change a near-tied argmax, so this is the floor under the speculation mismatches."""
    count, firsts = mismatches(first_plain, plain[: len(first_plain)])
    plain_row.update(plain_vs_first_batch_mismatches=count, plain_vs_first_batch_first_diffs=firsts)


def warm_up(engine, prompts: list[dict], k: int) -> None:
    """Kernels, graphs and the eager verify path, on two short requests each way."""
    params = [SamplingParams(temperature=0.0, max_tokens=32)] * 2
    for speculator in (None, ngram_speculator(engine, k)):
        use_speculator(engine, speculator)
        run_closed_loop(engine, prompts[:2], params, 2)


# ------------------------------------------------------------------------------------------------------ the parts


def load_real_model(args: argparse.Namespace) -> LLM:
    started = time.perf_counter()
    llm = LLM(args.model, **engine_settings(args, args.gpu_memory_utilization))
    engine = llm.engine
    print(
        f"{args.model}: loaded in {time.perf_counter() - started:.1f}s on {engine.device}, dtype {engine.dtype}, "
        f"graphs {'on' if engine.runner.decode_graphs is not None else 'off'}",
        flush=True,
    )
    return llm


def chat_prompts(engine: LLMEngine, count: int) -> list[dict]:
    """The repetitive workload's chats rendered with the model's chat template (what LLM.chat sends)."""
    return [{"prompt": render_chat(engine.tokenizer, chat, True, None)} for chat in repetitive_messages(count)]


def part_tpot(llm: LLM, args: argparse.Namespace) -> list[dict]:
    engine = llm.engine
    prompts = chat_prompts(engine, args.num_prompts)
    warm_up(engine, prompts, args.k)
    rows, first_plain = [], None
    for batch in args.batches:
        chosen = prompts[: args.batch1_prompts] if batch == 1 else prompts
        params = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens)] * len(chosen)
        ks = [args.k] + (args.extra_ks if batch == 1 else [])
        batch_rows, plain = compare_configs(engine, chosen, params, batch, ks, f"tpot b={batch}")
        if first_plain is None:
            first_plain = plain
        else:
            note_batch_noise(batch_rows[0], first_plain, plain)
        rows += batch_rows
    return rows


def idle_cases(args: argparse.Namespace, vocab: int, chat_prompts: list[dict]) -> list[tuple[str, list[dict], float]]:
    """(name, prompts, temperature): random-token prompts greedy and sampled, where n-gram finds (almost) no match
    and the speculator backs off; and the chat prompts sampled at temperature 1, where common n-grams of the text
    recur and get proposed, but a sampled continuation rarely follows them (proposed, then rejected)."""
    random_ids = random_prompts([args.idle_prompt_len] * args.idle_prompts, vocab, seed=11)
    random_token_prompts = [{"prompt_token_ids": p} for p in random_ids]
    return [
        ("random", random_token_prompts, 0.0),
        ("random", random_token_prompts, 1.0),
        ("chat", chat_prompts[: args.idle_prompts], 1.0),
    ]


def part_idle(llm: LLM, args: argparse.Namespace) -> list[dict]:
    engine = llm.engine
    cases = idle_cases(args, engine.hf_config.vocab_size, chat_prompts(engine, args.idle_prompts))
    warm_up(engine, cases[0][1], args.k)
    rows = []
    for name, prompts, temperature in cases:
        for batch in args.batches:
            chosen = prompts[: max(1, args.idle_prompts // 2)] if batch == 1 else prompts
            params = [
                SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=i)
                for i in range(len(chosen))
            ]
            label = f"idle {name} T={temperature:g} b={batch}"
            batch_rows, _ = compare_configs(engine, chosen, params, batch, [args.k], label)
            rows += [{**row, "temperature": temperature} for row in batch_rows]
    return rows


def verify_model_folder(shape: str) -> str:
    folder = write_shape_config("smollm2" if shape == "tiny" else shape)
    if shape == "tiny":
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config.update(TINY_SHAPE)
        config_path.write_text(json.dumps(config, indent=1))
    return str(folder)


def part_verify(args: argparse.Namespace) -> list[dict]:
    started = time.perf_counter()
    settings = engine_settings(args, args.verify_gpu_memory_utilization)
    llm = LLM(
        verify_model_folder(args.verify_shape),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_num_batched_tokens=8192,
        **settings,
    )
    engine = llm.engine
    print(
        f"{args.verify_shape} (random weights): loaded in {time.perf_counter() - started:.1f}s on {engine.device}, "
        f"dtype {engine.dtype}, graphs {'on' if engine.runner.decode_graphs is not None else 'off'}",
        flush=True,
    )
    vocab, rows = engine.hf_config.vocab_size, []
    for batch in args.verify_batches:
        prompts = random_prompts([args.context] * batch, vocab, seed=batch)
        plain = step_ms(engine, prompts, None, args)
        plain_sync = step_ms(engine, prompts, ForcedDrafts(0, vocab, engine.max_model_len), args)
        rows.append(verify_row("plain (graph, async)", batch, 0, plain, plain))
        rows.append(verify_row("plain sync (graph)", batch, 0, plain_sync, plain))
        for k in args.verify_ks:
            timed = step_ms(engine, prompts, ForcedDrafts(k, vocab, engine.max_model_len), args)
            mode = "graph" if timed["graph_replays"] else "eager"
            rows.append(verify_row(f"verify k={k} ({mode}, sync)", batch, k, timed, plain, plain_sync))
    return rows


def step_ms(engine: LLMEngine, prompts: list[list[int]], speculator: Speculator | None, args) -> dict:
    """Median (and mean) wall ms of one engine.step() over ``args.steps`` steady decode steps of these prompts,
    after ``args.warmup`` steps; the requests are aborted afterwards."""
    use_speculator(engine, speculator)
    params = SamplingParams(temperature=0.0, max_tokens=args.context, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=p, sampling_params=params) for p in prompts]
    decoding: set[str] = set()
    while len(decoding) < len(ids):  # prefill (chunked) until every request has its first token
        decoding.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    for _ in range(args.warmup):
        engine.step(only_finished=True)
    before, times = engine.stats(), []
    graphs = engine.runner.verify_graphs
    replays_before = graphs.replays if graphs is not None else 0
    synchronize(engine)
    window = time.perf_counter()
    for _ in range(args.steps):
        started = time.perf_counter()
        engine.step(only_finished=True)
        times.append(time.perf_counter() - started)
    synchronize(engine)
    mean_ms = (time.perf_counter() - window) / args.steps * 1e3
    verifications = engine.stats().spec_drafts - before.spec_drafts
    for request_id in ids:
        engine.abort_request(request_id)
    engine.finish_in_flight()
    replays = (graphs.replays if graphs is not None else 0) - replays_before
    return {
        "ms": statistics.median(times) * 1e3,
        "mean_ms": mean_ms,
        "verifications": verifications,
        "graph_replays": replays,
    }


def verify_row(config: str, batch: int, k: int, timed: dict, plain: dict, plain_sync: dict | None = None) -> dict:
    """One point; the break-even figures compare with the plain step users get (graph, async)."""
    ratio = timed["ms"] / plain["ms"]
    row = {
        "config": config,
        "batch": batch,
        "k": k,
        "step_ms": round(timed["ms"], 3),
        "step_ms_mean": round(timed["mean_ms"], 3),
        "verifications": timed["verifications"],
        "vs_plain": round(ratio, 3),
        "vs_plain_sync": round(timed["ms"] / plain_sync["ms"], 3) if plain_sync else None,
        "break_even_accepted": round(ratio - 1.0, 3) if k else None,
        "break_even_alpha": break_even_alpha(k, ratio) if k else None,
    }
    print(json.dumps(row), flush=True)
    return row


def break_even_alpha(k: int, emitted: float) -> float | None:
    """The per-token acceptance rate alpha with (1 - alpha^(k+1)) / (1 - alpha) = ``emitted`` (the geometric
    model's expected tokens per verification of k drafts); 0 when emitted <= 1, None when above k + 1
    (unreachable: even accepting everything does not pay)."""
    if emitted <= 1.0:
        return 0.0
    if emitted > k + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):  # sum_{i<=k} alpha^i rises monotonically from 1 to k + 1 over [0, 1]
        middle = (low + high) / 2
        low, high = (middle, high) if sum(middle**i for i in range(k + 1)) < emitted else (low, middle)
    return round((low + high) / 2, 4)


# ------------------------------------------------------------------------------------------------------- reporting


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def tpot_table(rows: list[dict], title: str) -> str:
    lines = [
        f"\n### {title}\n",
        "| config | batch | k | TPOT mean (ms) | TPOT p50 (ms) | speedup | acceptance "
        "| emitted/verify | mean out len | mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['k']} | {fmt(r['tpot_ms_mean'])} | {fmt(r['tpot_ms_p50'])} | "
            f"{fmt(r['speedup'], 3)} | {fmt(r['acceptance'], 3)} | {fmt(r['emitted_per_verification'])} | "
            f"{fmt(r['mean_output_len'], 1)} | {r['mismatches']} |"
        )
    noise = [
        f"b={r['batch']}: {r['plain_vs_first_batch_mismatches']} of {rows[0]['requests']}"
        for r in rows
        if "plain_vs_first_batch_mismatches" in r
    ]
    if noise:
        lines.append(
            f"\nplain vs plain at batch {rows[0]['batch']} (batch-shape numerics, the floor under the "
            f"mismatches): {'; '.join(noise)}"
        )
    return "\n".join(lines)


def verify_table(rows: list[dict], shape: str, context: int) -> str:
    lines = [
        f"\n### verify: {shape} (random weights), ~{context} tokens of context per sequence; every sequence verifies "
        "k random drafts (ForcedDrafts); step ms = median wall time of engine.step(); break-even vs plain (graph, "
        "async)\n",
        "| batch | step | ms (p50) | vs plain | vs plain sync | break-even accepted/verify | break-even alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alpha = r["break_even_alpha"]
        alpha_text = "-" if not r["k"] else (fmt(alpha, 3) if alpha is not None else "never (> k)")
        lines.append(
            f"| {r['batch']} | {r['config']} | {fmt(r['step_ms'], 3)} | {fmt(r['vs_plain'], 3)} | "
            f"{fmt(r['vs_plain_sync'], 3)} | {fmt(r['break_even_accepted'], 2)} | {alpha_text} |"
        )
    return "\n".join(lines)


def idle_table(rows: list[dict]) -> str:
    table = tpot_table(
        rows,
        f"idle: EOS ignored, seeded (target: speculation <= 3% slower; back-off after {MISSES_BEFORE_BACKOFF} misses)",
    )
    slowdowns = [f"{r['config']}: {1 / r['speedup'] - 1:+.1%}" for r in rows if r["k"] and r["speedup"]]
    return table + "\n\nslowdown with speculation (TPOT ratio - 1): " + "; ".join(slowdowns)


# ------------------------------------------------------------------------------------------------------------ main


def predicted_seconds(args: argparse.Namespace) -> dict:
    """A rough H200 estimate to size a run before starting it, from guessed constants: SmolLM2 ~4 ms per plain
    step and ~10 ms per eager verify step (n-gram runs emit ~2 tokens per verify), the 8B shape ~60 s to load
    and ~30 ms per step."""
    smol_step, verify_step, parts = 0.004, 0.010, {}
    if "tpot" in args.part:
        per_config = {
            b: (args.batch1_prompts if b == 1 else args.num_prompts / b) * args.max_tokens for b in args.batches
        }  # steps per configuration at each batch
        spec_runs = {b: 1 + (len(args.extra_ks) if b == 1 else 0) for b in args.batches}
        parts["tpot"] = 20 + sum(n * (smol_step + spec_runs[b] * verify_step / 2) for b, n in per_config.items())
    if "idle" in args.part:
        steps = sum(
            (args.idle_prompts // 2 if b == 1 else args.idle_prompts / b) * args.max_tokens for b in args.batches
        )
        parts["idle"] = 3 * steps * (smol_step + smol_step * 1.03)
    if "verify" in args.part:
        points = len(args.verify_batches) * (len(args.verify_ks) + 2)
        parts["verify"] = 60 + points * (2.0 + (args.warmup + args.steps) * 0.03)
    return {name: round(seconds) for name, seconds in parts.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--part", default="tpot,verify,idle", help="comma-separated: tpot, verify, idle")
    parser.add_argument("--json", help="also write every row here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (cpu: a float32 smoke run)")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="tpot and idle's engine")
    parser.add_argument("--verify-gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--model", default="smollm2", help="tpot and idle: the real model (default: %(default)s)")
    parser.add_argument("--batches", type=ints, default=[1, 16], help="tpot and idle: concurrencies")
    parser.add_argument("--num-prompts", type=int, default=32, help="tpot: chat prompts (batch > 1 runs them all)")
    parser.add_argument("--batch1-prompts", type=int, default=12, help="tpot: the first N of them at batch 1")
    parser.add_argument("--max-tokens", type=int, default=256, help="tpot and idle: max output tokens")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens of the main comparison")
    parser.add_argument("--extra-ks", type=ints, default=[2, 8], help="tpot: also these k at batch 1")
    parser.add_argument("--verify-shape", default="llama8b", choices=[*sorted(SHAPES), "tiny"])
    parser.add_argument("--verify-batches", type=ints, default=[1, 16, 64])
    parser.add_argument("--verify-ks", type=ints, default=list(range(1, 9)))
    parser.add_argument("--context", type=int, default=512, help="verify: prompt tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="verify: untimed steps per point")
    parser.add_argument("--steps", type=int, default=20, help="verify: timed steps per point")
    parser.add_argument("--idle-prompts", type=int, default=16, help="idle: prompts per case (batch 1 runs half)")
    parser.add_argument("--idle-prompt-len", type=int, default=256, help="idle: random prompts' tokens")
    args = parser.parse_args()
    args.part = [p for p in args.part.split(",") if p]
    unknown = set(args.part) - {"tpot", "verify", "idle"}
    if unknown:
        parser.error(f"--part: unknown {sorted(unknown)}")
    return args


def main() -> None:
    args = parse_args()
    estimate = predicted_seconds(args)
    print(f"predicted runtime on an H200: ~{sum(estimate.values())} s ({estimate}); parts {args.part}", flush=True)
    report, tables = {"args": dict(vars(args)), "seconds": {}}, []

    def finish_part(name: str, rows: list[dict], table: str, started: float) -> None:
        """Print the part's table now and save what there is: a run cut short keeps the finished parts."""
        report[name], report["seconds"][name] = rows, round(time.perf_counter() - started, 1)
        tables.append(table)
        print(table + f"\n\n({name}: {report['seconds'][name]} s)", flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)

    if "tpot" in args.part or "idle" in args.part:
        started = time.perf_counter()
        llm = load_real_model(args)
        if "tpot" in args.part:
            rows = part_tpot(llm, args)
            title = f"tpot: {args.model}, repetitive chat workload, greedy, max_tokens {args.max_tokens}"
            finish_part("tpot", rows, tpot_table(rows, f"{title}, lookup {LOOKUP_MAX}..{LOOKUP_MIN}"), started)
        if "idle" in args.part:
            started = time.perf_counter()
            rows = part_idle(llm, args)
            finish_part("idle", rows, idle_table(rows), started)
        del llm  # its GPU memory goes back before the verify engine sizes its KV cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "verify" in args.part:
        started = time.perf_counter()
        rows = part_verify(args)
        finish_part("verify", rows, verify_table(rows, args.verify_shape, args.context), started)
    print("\n## all parts\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
