"""FP8 weights: the quantized layers against the FP8 reference product, a whole model against its unquantized
self, FP8 checkpoints (per-channel and per-tensor, either tensor of a pair first) loading to the stored values, and
clear errors for what cannot be read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from common.models.loader import load_model
from common.models.parallel_layers import RowParallelLinear
from common.models.quantization import (
    Fp8Linear,
    checkpoint_quantization,
    dequantize_fp8_checkpoint,
    quantize_model_fp8,
    resolve_quantization,
)
from kernels.fp8 import FP8_DTYPE, fp8_linear_reference, quantize_rows

CPU = torch.device("cpu")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"], **extra)


def test_fp8_linear_is_the_fp8_product_of_the_linear_it_replaces():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=gen)
    torch.nn.init.normal_(linear.bias, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.qweight.dtype == FP8_DTYPE and fp8.weight_scale.shape == (48, 1)
    expected = fp8_linear_reference(x, *quantize_rows(linear.weight.detach()), linear.bias.detach())
    torch.testing.assert_close(fp8(x), expected, rtol=0, atol=0)


def test_a_row_parallel_projection_adds_its_bias_once_after_the_reduction():
    gen = torch.Generator().manual_seed(1)
    ranks = SimpleNamespace(all_reduce=lambda t: 2 * t)  # two ranks holding the same partial product
    linear = RowParallelLinear(32, 16, bias=True, tp=ranks)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=gen)
    torch.nn.init.normal_(linear.bias, generator=gen)
    x = torch.randn(3, 32, generator=gen)
    partial = fp8_linear_reference(x, *quantize_rows(linear.weight.detach()), None)
    torch.testing.assert_close(Fp8Linear.from_linear(linear)(x), 2 * partial + linear.bias, rtol=1e-6, atol=1e-6)


def test_a_quantized_model_stays_within_fp8_error_of_itself(tmp_path):
    config = tiny_config()
    model = load_model(tmp_path, config, torch.float32, CPU, "dummy", seed=3)
    hidden = torch.randn(7, config.hidden_size, generator=torch.Generator().manual_seed(2))
    layer = model.model.layers[0]
    before = layer.mlp(hidden)
    assert quantize_model_fp8(model) == 4 * config.num_hidden_layers
    assert all(isinstance(m, Fp8Linear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                  layer.mlp.gate_up_proj, layer.mlp.down_proj))
    assert not isinstance(model.lm_head, Fp8Linear)  # the LM head keeps the model dtype, as in vLLM
    after = layer.mlp(hidden)
    assert 0 < (after - before).norm() / before.norm() < 0.1


def write_checkpoint(folder: Path, config: LlamaConfig, per_channel: bool) -> dict:
    """A tiny HF Llama saved as an FP8 checkpoint; returns the stored (fp8 weight, scale) per projection name."""
    torch.manual_seed(5)
    hf = LlamaForCausalLM(config)
    tensors, stored = {}, {}
    for name, tensor in hf.state_dict().items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if module not in PROJECTIONS:
            tensors[name] = tensor.contiguous()
            continue
        if per_channel:
            qweight, scale = quantize_rows(tensor)
        else:
            scale = (tensor.abs().max().float() / 448).reshape(())
            qweight = (tensor.float() / scale).to(FP8_DTYPE)
        prefix = name.removesuffix(".weight")
        stored[prefix] = (qweight, scale)
        tensors[f"{prefix}.weight"] = qweight
        tensors[f"{prefix}.weight_scale"] = scale
        tensors[f"{prefix}.input_scale"] = torch.tensor(1.0)
    save_file(tensors, str(folder / "model.safetensors"))
    method = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel" if per_channel else "tensor"}}}}
    if not per_channel:
        method = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    config_dict = config.to_dict() | {"quantization_config": method}
    (folder / "config.json").write_text(json.dumps(config_dict))
    return stored


@pytest.mark.parametrize("per_channel", [True, False], ids=["compressed-tensors-channel", "fp8-per-tensor"])
def test_an_fp8_checkpoint_loads_to_its_stored_values(tmp_path, per_channel):
    config = tiny_config()
    stored = write_checkpoint(tmp_path, config, per_channel)
    hf_config = LlamaConfig.from_pretrained(tmp_path)
    assert resolve_quantization(None, hf_config) == "fp8"  # an FP8 checkpoint runs FP8 unasked
    model = load_model(tmp_path, hf_config, torch.float32, CPU, "auto", quantization="fp8")
    attn = model.model.layers[1].self_attn
    qweight, scale = stored["model.layers.1.self_attn.o_proj"]
    exact = qweight.float() * scale.float().reshape(-1, 1) if per_channel else qweight.float() * scale
    loaded = attn.o_proj.qweight.float() * attn.o_proj.weight_scale
    if per_channel:  # re-quantized per channel with the same scales: the very same bytes
        assert torch.equal(attn.o_proj.qweight.view(torch.uint8), qweight.view(torch.uint8))
    torch.testing.assert_close(loaded, exact, rtol=2**-4, atol=1e-12)


def test_the_pairs_of_an_fp8_checkpoint_may_come_in_either_order():
    qweight, scale = quantize_rows(torch.randn(8, 16))
    forward = dict(dequantize_fp8_checkpoint([("a.weight", qweight), ("a.weight_scale", scale), ("b", scale)]))
    backward = dict(dequantize_fp8_checkpoint([("a.weight_scale", scale), ("a.weight", qweight)]))
    torch.testing.assert_close(forward["a.weight"], backward["a.weight"], rtol=0, atol=0)
    assert set(forward) == {"a.weight", "b"}


def test_what_an_fp8_checkpoint_cannot_hold_is_a_clear_error():
    qweight, _ = quantize_rows(torch.randn(8, 16))
    with pytest.raises(ValueError, match="weight without weight_scale"):
        list(dequantize_fp8_checkpoint([("a.weight", qweight)]))
    with pytest.raises(ValueError, match="block-wise"):
        list(dequantize_fp8_checkpoint([("a.weight", qweight), ("a.weight_scale", torch.ones(2, 2))]))
    with pytest.raises(ValueError, match="'awq' is not supported"):
        checkpoint_quantization(SimpleNamespace(quantization_config={"quant_method": "awq"}))
    int8 = {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}}
    with pytest.raises(ValueError, match="compressed-tensors"):
        checkpoint_quantization(SimpleNamespace(quantization_config=int8))
    with pytest.raises(ValueError, match="quantization='int4'"):
        resolve_quantization("int4", SimpleNamespace())
