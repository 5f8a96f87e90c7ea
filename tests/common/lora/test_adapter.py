"""Loading PEFT LoRA folders: fused tensors equal PEFT's, PEFT's scaling rules, and clear refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from common.lora.adapter import AdapterError, LoRABaseShapes, load_adapter
from tests.common.lora.support import tiny_llama_config

SHAPES = LoRABaseShapes.from_hf_config(tiny_llama_config())


def test_shapes_from_hf_config():
    assert LoRABaseShapes(num_layers=2, hidden_size=64, q_size=64, kv_size=32, intermediate_size=96) == SHAPES
    assert SHAPES.slice_starts("qkv_proj") == (0, 64, 96, 128)
    assert SHAPES.slice_starts("gate_up_proj") == (0, 96, 192)
    assert SHAPES.in_features("down_proj") == 96


def test_fused_tensors_are_peft_tensors(make_peft_adapter):
    folder, peft_model = make_peft_adapter("a", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    adapter = load_adapter("a", folder, SHAPES, max_lora_rank=16)
    assert adapter.rank == 8 and adapter.scale == 2.0
    assert adapter.target_modules == ("q_proj", "v_proj", "up_proj")
    assert sorted(adapter.weights[1]) == ["gate_up_proj", "qkv_proj"]
    layer = peft_model.base_model.model.model.layers[1]
    qkv = adapter.weights[1]["qkv_proj"]
    assert torch.equal(qkv.a[0], layer.self_attn.q_proj.lora_A["default"].weight)
    assert torch.equal(qkv.a[2], layer.self_attn.v_proj.lora_A["default"].weight)
    assert torch.equal(qkv.b[:, 96:128], layer.self_attn.v_proj.lora_B["default"].weight.T)
    assert not qkv.a[1].any() and not qkv.b[:, 64:96].any()  # k_proj not targeted: zeros
    gate_up = adapter.weights[1]["gate_up_proj"]
    assert torch.equal(gate_up.b[:, 96:], layer.mlp.up_proj.lora_B["default"].weight.T)
    assert not gate_up.b[:, :96].any()


@pytest.mark.parametrize(("rslora", "expected"), [(False, 32 / 16), (True, 32 / math.sqrt(16))])
def test_scale_follows_peft(make_peft_adapter, rslora, expected):
    folder, peft_model = make_peft_adapter("a", r=16, lora_alpha=32, use_rslora=rslora, target_modules="all-linear")
    adapter = load_adapter("a", folder, SHAPES, max_lora_rank=64)
    assert adapter.scale == pytest.approx(expected)
    assert adapter.scale == pytest.approx(peft_model.base_model.model.model.layers[0].mlp.down_proj.scaling["default"])
    assert set(adapter.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_regex_target(make_peft_adapter):
    """A regex string for target_modules: what is in the weights file is what gets served."""
    folder, _ = make_peft_adapter("a", r=8, target_modules=r".*\.1\.self_attn\.(k_proj|o_proj)")
    adapter = load_adapter("a", folder, SHAPES, max_lora_rank=8)
    assert adapter.weights[0] == {} and sorted(adapter.weights[1]) == ["o_proj", "qkv_proj"]
    assert adapter.target_modules == ("k_proj", "o_proj")


def test_layer_subset(make_peft_adapter):
    folder, _ = make_peft_adapter("a", r=8, target_modules=["down_proj"], layers_to_transform=[0])
    adapter = load_adapter("a", folder, SHAPES, max_lora_rank=8)
    assert sorted(adapter.weights[0]) == ["down_proj"] and adapter.weights[1] == {}


def test_bin_weights_load(make_peft_adapter):
    folder, _ = make_peft_adapter("a", r=8, target_modules=["o_proj"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    adapter = load_adapter("a", folder, SHAPES, max_lora_rank=8)
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
    assert torch.equal(adapter.weights[0]["o_proj"].a[0], tensors[key])


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ["lm_head"]}, "lm_head"),
        ({"r": 32}, "exceeds --max-lora-rank 16"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ],
)
def test_unsupported_configs_are_refused(make_peft_adapter, changes, message):
    folder, _ = make_peft_adapter("a", r=8, target_modules=["q_proj"])
    edit_config(folder, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter("a", folder, SHAPES, max_lora_rank=16)


def test_missing_files(make_peft_adapter, tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter("a", tmp_path / "nowhere", SHAPES, max_lora_rank=16)
    folder, _ = make_peft_adapter("a", r=8, target_modules=["q_proj"])
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_adapter("a", folder, SHAPES, max_lora_rank=16)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (dict(hidden_size=128), r"down_proj.lora_B.weight' has shape \(64, 8\), but the base model needs \(128, 8\)"),
        (dict(q_size=128), r"o_proj.lora_A.weight' has shape \(8, 64\), but the base model needs \(8, 128\)"),
        (dict(kv_size=64), r"k_proj.lora_B.weight' has shape \(32, 8\)"),
        (dict(intermediate_size=128), r"down_proj.lora_A.weight' has shape \(8, 96\)"),
        (dict(num_layers=1), "layer 1; the base model has 1 layers"),
    ],
)
def test_shape_mismatch_with_the_base_model(make_peft_adapter, base, message):
    folder, _ = make_peft_adapter("a", r=8, target_modules="all-linear")
    shapes = LoRABaseShapes(**{**SHAPES.__dict__, **base})
    with pytest.raises(AdapterError, match=message):
        load_adapter("a", folder, shapes, max_lora_rank=16)
