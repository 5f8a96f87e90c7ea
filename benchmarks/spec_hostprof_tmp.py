"""cProfile of the engine loop at batch 1 with n-gram speculation on the real SmolLM2 (GPU)."""
import cProfile, pstats, io, time
from common.engine import LLM, SamplingParams
from benchmarks.spec_decode import repetitive_messages
from common.engine.llm import render_chat
llm = LLM("smollm2", dtype="bfloat16", gpu_memory_utilization=0.3,
          speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
llm.engine.speculator.adaptive = False
tok = llm.engine.tokenizer
prompts = [render_chat(tok, m, True, None) for m in repetitive_messages(8)]
p = SamplingParams(temperature=0.0, max_tokens=256)
llm.generate(prompts[:2], p)
for label, spec in (("plain", None), ("spec", llm.engine.speculator)):
    eng = llm.engine
    eng.speculator = eng.scheduler.speculator = eng.sampled_tokens.speculator = spec
    prof = cProfile.Profile()
    t = time.perf_counter(); steps = 0; toks = 0
    prof.enable()
    for pr in prompts:
        out = llm.generate([pr], p)
        toks += len(out[0].outputs[0].token_ids)
    prof.disable()
    el = time.perf_counter() - t
    print(f"== {label}: {el:.2f}s for {toks} tokens = {el/toks*1e3:.3f} ms/token (profiled)")
    s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:6000])
    s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(40); print(s.getvalue()[:7000])
print(llm.engine.stats())
