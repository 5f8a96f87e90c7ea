"""The LoRA slot pool: PEFT-equal outputs through the kernels' references, LRU eviction, host cache, pins."""

from __future__ import annotations

import os

import pytest
import torch

from common.lora.adapter import FUSED_PROJECTIONS, LoRABaseShapes
from common.lora.slots import LoRASlotPool, LoRASlotsExhausted, UnknownAdapter, loader_from_paths
from kernels.lora import add_lora, lora_expand_triton, lora_shrink_triton, make_lora_batch
from tests.common.lora.support import tiny_llama_config

SHAPES = LoRABaseShapes.from_hf_config(tiny_llama_config())
# Three adapters of different ranks, targets and scaling rules, all below max_lora_rank 16 except one at it.
ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], seed=1),
    "mlp": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "k_proj"], seed=2),
    "all": dict(r=4, lora_alpha=12, use_rslora=True, target_modules="all-linear", seed=3),
}


def module_of(peft_model, layer: int, hf_name: str) -> torch.nn.Module:
    block = peft_model.base_model.model.model.layers[layer]
    return getattr(block.self_attn if hf_name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, hf_name)


def fused_output(peft_model, layer: int, projection: str, x: torch.Tensor, base: bool) -> torch.Tensor:
    """The HF parts' outputs side by side: with the PEFT LoRA applied, or of the base layers only."""
    outs = []
    for part in FUSED_PROJECTIONS[projection]:
        module = module_of(peft_model, layer, part)
        outs.append(module.base_layer(x) if base and hasattr(module, "base_layer") else module(x))
    return torch.cat(outs, dim=-1)


def add_lora_triton(out, x, lora_a, lora_b, batch, scales, slice_starts):
    return lora_expand_triton(lora_shrink_triton(x, lora_a, batch), lora_b, batch, out, scales, slice_starts)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_mixed_batch_equals_peft(make_peft_adapter, kernel):
    """Rows of three adapters and the base model in one batch: base output + our delta == each PEFT model's
    (through the CPU dispatch, i.e. the references, and through the Triton kernels in the interpreter)."""
    if kernel == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1; CUDA runs them in tests/kernels")
    apply = add_lora if kernel == "reference" else add_lora_triton
    models = {name: make_peft_adapter(name, **cfg) for name, cfg in ADAPTERS.items()}
    paths = {name: folder for name, (folder, _) in models.items()}
    pool = LoRASlotPool(SHAPES, max_loras=3, max_lora_rank=16, max_cpu_loras=3,
                        loader=loader_from_paths(paths, SHAPES, 16))
    slot = {name: pool.acquire(name) for name in ADAPTERS}
    names = ["mlp", None, "attn", "all", "attn", None, "mlp", "all", "all", "attn"]
    batch = make_lora_batch(torch.tensor([-1 if n is None else slot[n] for n in names]), pool.max_loras)
    gen = torch.Generator().manual_seed(7)
    any_model = models["attn"][1]
    with torch.no_grad():
        for layer in range(SHAPES.num_layers):
            for projection in FUSED_PROJECTIONS:
                x = torch.randn(len(names), SHAPES.in_features(projection), generator=gen)
                out = fused_output(any_model, layer, projection, x, base=True)
                lora_a, lora_b = pool.layer_weights(layer, projection)
                apply(out, x, lora_a, lora_b, batch, pool.scales, pool.slice_starts(projection))
                for row, name in enumerate(names):
                    model = any_model if name is None else models[name][1]
                    expected = fused_output(model, layer, projection, x[row : row + 1], base=name is None)
                    torch.testing.assert_close(out[row : row + 1], expected, rtol=1e-5, atol=1e-5)
        # The test can fail: the adapters do change the outputs.
        ones = torch.ones(1, SHAPES.hidden_size)
        assert not torch.allclose(fused_output(models["all"][1], 0, "qkv_proj", ones, base=False),
                                  fused_output(models["all"][1], 0, "qkv_proj", ones, base=True))


class CountingLoader:
    """Fake adapters (one random A/B per targeted layer) and a count of disk reads per name."""

    def __init__(self, make_peft_adapter, names, max_lora_rank=16):
        cfgs = {name: dict(r=8, lora_alpha=8, target_modules=["q_proj"], seed=i) for i, name in enumerate(names)}
        cfgs.get("wide", {}).update(target_modules="all-linear")
        paths = {name: make_peft_adapter(name, **cfg)[0] for name, cfg in cfgs.items()}
        self.load = loader_from_paths(paths, SHAPES, max_lora_rank)
        self.reads: dict[str, int] = {}

    def __call__(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.load(name)


def make_pool(loader, max_loras=2, max_cpu_loras=3):
    return LoRASlotPool(SHAPES, max_loras=max_loras, max_lora_rank=16, max_cpu_loras=max_cpu_loras, loader=loader)


def test_lru_eviction_and_pins(make_peft_adapter):
    loader = CountingLoader(make_peft_adapter, ["a", "b", "c"])
    pool = make_pool(loader)
    assert (pool.acquire("a"), pool.acquire("b")) == (0, 1)
    pool.release("a")
    pool.release("b")
    pool.acquire("a")  # a is now the most recently used: b goes first
    pool.release("a")
    assert pool.acquire("c") == 1 and pool.slot_of("b") is None and pool.resident() == {"a": 0, "c": 1}
    # a and c pinned: no slot for b.
    pool.acquire("a")
    with pytest.raises(LoRASlotsExhausted, match="all 2 LoRA slots"):
        pool.acquire("b")
    pool.release("c")  # a stays pinned: c, unpinned, gives its slot
    assert pool.acquire("b") == 1 and pool.slot_of("c") is None and pool.slot_of("a") == 0
    pool.release("a")
    with pytest.raises(ValueError, match="not acquired"):
        pool.release("a")


def test_host_cache_and_reload_from_disk(make_peft_adapter):
    loader = CountingLoader(make_peft_adapter, ["a", "b", "c", "d"])
    pool = make_pool(loader, max_loras=1, max_cpu_loras=2)
    for name in ["a", "b", "a"]:  # a's second load comes from its host image
        pool.acquire(name)
        pool.release(name)
    assert loader.reads == {"a": 1, "b": 1} and pool.host_cached() == ["b", "a"]
    expected = pool.layer_weights(0, "qkv_proj")[0][0].clone()
    for name in ["c", "d", "a"]:  # host holds 2: b, then a, drop out; a comes back from disk
        pool.acquire(name)
        pool.release(name)
    assert loader.reads == {"a": 2, "b": 1, "c": 1, "d": 1} and pool.host_cached() == ["d", "a"]
    assert torch.equal(pool.layer_weights(0, "qkv_proj")[0][0], expected)


def test_reused_slot_holds_only_the_new_adapter(make_peft_adapter):
    """An adapter targeting q only, loaded where one targeting everything was: the rest of the slot is zero."""
    loader = CountingLoader(make_peft_adapter, ["wide", "q"])
    pool = make_pool(loader, max_loras=1)
    pool.acquire("wide")
    pool.release("wide")
    assert pool.layer_weights(1, "down_proj")[1][0].any()
    pool.acquire("q")
    for layer in range(SHAPES.num_layers):
        for projection in ("o_proj", "gate_up_proj", "down_proj"):
            a, b = pool.layer_weights(layer, projection)
            assert not a[0].any() and not b[0].any()
        a, b = pool.layer_weights(layer, "qkv_proj")
        assert a[0, :8].any() and not a[0, 8:].any()  # q's rank 8 of max 16, then padding; k and v zero
        assert b[0, :8, :64].any() and not b[0, 8:].any() and not b[0, :, 64:].any()
    assert pool.scales[0].item() == 1.0


def test_unknown_adapter_and_bad_sizes(make_peft_adapter):
    pool = make_pool(CountingLoader(make_peft_adapter, ["a"]))
    with pytest.raises(UnknownAdapter, match="no LoRA adapter named 'zz'; known: a"):
        pool.acquire("zz")
    assert pool.resident() == {}
    with pytest.raises(ValueError, match="max_cpu_loras >= max_loras"):
        make_pool(pool.loader, max_loras=3, max_cpu_loras=2)
