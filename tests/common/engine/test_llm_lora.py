"""Multi-LoRA in the engine on the real SmolLM2 (float32, CPU) against HF transformers + PEFT, token for token.

Three random PEFT adapters with different targets, ranks and scalings; one ``LLM.generate`` mixes them with the
base model. With ``max_loras=2`` the third adapter's requests wait for a slot, and with ``max_cpu_loras=2`` an
adapter is evicted from the host too and read from its folder again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.engine import LLM, LoRARequest, SamplingParams
from common.lora import AdapterError
from tests.hf_reference import hf_greedy, load_hf_model

NUM_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
# name -> PEFT LoraConfig: q/v only; every projection at the maximum rank; o/gate/down with rank-stabilized scaling.
ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=16, lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]),
}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors:",
    "Question: What is 12 times 7?\nAnswer:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]
# (prompt, adapter or None for the base): three adapters and the base in one batch
MIXED = [(PROMPTS[0], "qv"), (PROMPTS[1], "all"), (PROMPTS[2], "mlp"), (PROMPTS[3], None), (PROMPTS[4], "qv"),
         (PROMPTS[5], "mlp")]
LORA_ARGS = dict(enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16)


def _save_adapter(base_path: Path, folder: Path, seed: int, **lora_config):
    """A PEFT LoRA over SmolLM2 with random A and B (PEFT starts B at zero), saved as users get it; and the model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_hf_model(base_path), LoraConfig(lora_dropout=0.0, **lora_config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # a delta of a few percent of the projection's output
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 / param.shape[1] ** 0.5)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def base_path() -> Path:
    pytest.importorskip("peft")
    from common.models.loader import resolve_model_path

    return resolve_model_path("smollm2", None)


class _References(dict):
    """``refs[name or "base"]`` -> (folder, {prompt: HF greedy tokens}); the tokens computed on first use."""

    def __init__(self, tokenizer, models: dict, folders: dict) -> None:
        super().__init__()
        for name, model in models.items():
            self[name] = (folders.get(name), _LazyTokens(tokenizer, model))


class _LazyTokens(dict):
    def __init__(self, tokenizer, model) -> None:
        super().__init__()
        self.tokenizer, self.model = tokenizer, model

    def __missing__(self, prompt: str) -> list[int]:
        self[prompt] = hf_greedy(self.model, self.tokenizer.encode(prompt), NUM_TOKENS)[0]
        return self[prompt]

    def __ne__(self, other) -> bool:  # compared on a prompt both have
        return self[PROMPTS[0]] != other[PROMPTS[0]]


@pytest.fixture(scope="module")
def adapters(base_path, tmp_path_factory):
    """name -> (folder, HF + PEFT greedy tokens per prompt under that adapter); "base" -> HF's base-model tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    root = tmp_path_factory.mktemp("adapters")
    models = {name: _save_adapter(base_path, root / name, seed, **config)
              for seed, (name, config) in enumerate(ADAPTERS.items(), start=1)}
    models["base"] = load_hf_model(base_path)
    return _References(tokenizer, models, {name: root / name for name in ADAPTERS})


def _modules(adapters) -> dict[str, str]:
    return {name: str(adapters[name][0]) for name in ADAPTERS}


def _expected(adapters, pairs) -> list[list[int]]:
    return [adapters[name or "base"][1][prompt] for prompt, name in pairs]


def _generate(llm: LLM, pairs) -> list[list[int]]:
    requests = [LoRARequest(name, i + 1, "") if name else None for i, (_, name) in enumerate(pairs)]
    outputs = llm.generate([prompt for prompt, _ in pairs], GREEDY, lora_request=requests)
    return [output.outputs[0].token_ids for output in outputs]


def test_adapters_change_the_output(adapters):
    """Otherwise the comparisons below would not test the adapters at all."""
    for name in ADAPTERS:
        assert adapters[name][1] != adapters["base"][1], name


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(kv_cache_memory=64 * 2**20),
        dict(max_num_batched_tokens=8, num_gpu_blocks_override=5, max_model_len=64),  # chunks, few blocks
    ],
    ids=["mixed", "chunked-preempted"],
)
def test_mixed_batch_of_three_adapters_and_base_equals_hf_peft(adapters, engine_args):
    llm = LLM("smollm2", dtype="float32", device="cpu", lora_modules=_modules(adapters), **LORA_ARGS, **engine_args)
    assert _generate(llm, MIXED) == _expected(adapters, MIXED)
    if "num_gpu_blocks_override" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    pool = llm.engine.lora.pool
    assert len(pool.resident()) == 2 and not any(pool.is_pinned(n) for n in ADAPTERS)  # all slots released
    assert len(pool.host_cached()) <= 2
    assert not llm.engine.kv_cache_manager.tables  # every block returned


def test_prefix_cache_never_shares_blocks_between_adapters(adapters):
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20, block_size=8,
              lora_modules=_modules(adapters), **LORA_ARGS)
    prompt = PROMPTS[5]  # 15 tokens: one full block of 8
    engine = llm.engine
    runs = [(prompt, "qv"), (prompt, "all"), (prompt, None), (prompt, "qv")]
    cached, hashes = [], []
    for prompt_text, name in runs:
        request_id = engine.add_request(prompt_text, sampling_params=GREEDY, lora_name=name)
        request = engine.groups[request_id].samples[0]
        hashes.append(request.block_hashes[0])
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
        cached.append(request.num_cached_tokens)
        assert outputs[-1].outputs[0].token_ids == adapters[name or "base"][1][prompt_text], name
    assert cached == [0, 0, 0, 8]  # only the same adapter's second run hits its own block
    assert len({hashes[0], hashes[1], hashes[2]}) == 3 and hashes[3] == hashes[0]
    from common.engine.block_pool import hash_full_blocks

    base_request_hash = hash_full_blocks(engine.tokenizer.encode(prompt), 8)[0]
    assert hashes[2] == base_request_hash  # the base model's hashes are unchanged (routers agree)


def test_adapter_loaded_at_run_time_then_used(adapters):
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20, **LORA_ARGS)
    assert llm.list_loras() == []
    pairs = [(PROMPTS[0], "all"), (PROMPTS[1], None)]
    requests = [LoRARequest("all", 7, str(adapters["all"][0])), None]  # unknown name with a path: loaded first
    outputs = llm.generate([p for p, _ in pairs], GREEDY, lora_request=requests)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(adapters, pairs)
    llm.engine.add_lora("mlp", str(adapters["mlp"][0]))
    assert llm.list_loras() == ["all", "mlp"]
    assert _generate(llm, [(PROMPTS[2], "mlp")]) == _expected(adapters, [(PROMPTS[2], "mlp")])


def test_remove_while_a_request_runs_finishes_it_first(adapters):
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20,
              lora_modules=_modules(adapters), **LORA_ARGS)
    engine = llm.engine
    request_id = engine.add_request(PROMPTS[0], sampling_params=GREEDY, lora_name="qv")
    for _ in range(3):
        engine.step()
    assert engine.remove_lora("qv") is False  # in use: refused for new requests, kept for this one
    assert "qv" not in engine.list_loras()
    with pytest.raises(ValueError, match="being unloaded"):
        engine.add_request(PROMPTS[1], sampling_params=GREEDY, lora_name="qv")
    with pytest.raises(ValueError, match="already loaded|being unloaded"):
        engine.add_lora("qv", str(adapters["qv"][0]))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [request_id]
    assert finished[0].outputs[0].token_ids == adapters["qv"][1][PROMPTS[0]]
    assert "qv" not in engine.lora.pool.resident() and "qv" not in engine.lora.pool.host_cached()
    with pytest.raises(ValueError, match="no LoRA adapter named 'qv'"):
        engine.add_request(PROMPTS[0], sampling_params=GREEDY, lora_name="qv")
    assert engine.remove_lora("mlp") is True  # idle: gone at once
    engine.add_lora("qv", str(adapters["qv"][0]))  # and a name can be loaded again
    assert _generate(llm, [(PROMPTS[0], "qv")]) == _expected(adapters, [(PROMPTS[0], "qv")])


def test_bad_adapters_and_names_are_clear_errors(adapters, tmp_path):
    from tests.common.lora.support import save_peft_adapter

    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20, lora_modules=_modules(adapters),
              **LORA_ARGS)
    engine = llm.engine
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.add_lora("missing", str(tmp_path / "nowhere"))
    tiny, _ = save_peft_adapter(tmp_path / "tiny", r=4, target_modules=["q_proj"])  # another model's shapes
    with pytest.raises(AdapterError, match="another model"):
        engine.add_lora("tiny", str(tiny))
    with pytest.raises(ValueError, match="already loaded"):
        engine.add_lora("qv", str(adapters["qv"][0]))
    assert engine.list_loras() == list(ADAPTERS)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY, lora_request=[None, LoRARequest("nope", 1)])
    assert not engine.groups  # nothing was queued
    with pytest.raises(ValueError, match="got 1 for 2 prompts"):
        llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY, lora_request=[None])
    with pytest.raises(ValueError, match="remove_lora|no LoRA adapter"):
        engine.remove_lora("nope")
    base = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=64 * 2**20)
    with pytest.raises(ValueError, match="enable_lora"):
        base.engine.add_request(PROMPTS[0], sampling_params=GREEDY, lora_name="qv")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_modules={"a": "/nowhere"}), "needs enable_lora"),
        (dict(enable_lora=True, tensor_parallel_size=2), "not tensor-parallel yet"),
    ],
)
def test_refused_configurations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM("smollm2", dtype="float32", device="cpu", **kwargs)


@pytest.mark.gpu
def test_cuda_graphs_with_lora_equal_hf_peft(adapters):
    """Decode steps replay graphs that read each row's slot from a static buffer (float32: IEEE products)."""
    llm = LLM("smollm2", dtype="float32", device="cuda", lora_modules=_modules(adapters), **LORA_ARGS)
    assert _generate(llm, MIXED) == _expected(adapters, MIXED)
    assert llm.engine.runner.decode_graphs.replays > 0
    assert _generate(llm, [(PROMPTS[3], None)]) == _expected(adapters, [(PROMPTS[3], None)])
