"""Resolving, converting (GGUF, once) and loading models; the default model answers "Paris"."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from common.models.loader import load_model, resolve_dtype, resolve_model_path
from common.models.registry import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def download_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tandem-cache"))


@pytest.fixture(scope="session")
def smollm2(download_dir):
    """The default model converted once per session (the slow part: ~20 s of GGUF dequantization)."""
    return resolve_model_path("smollm2", download_dir)


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    return load_model(smollm2, AutoConfig.from_pretrained(smollm2), torch.float32, CPU, "auto")


@pytest.fixture(scope="session")
def chat_prompt(smollm2) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def greedy(runner, prompt: list[int], steps: int) -> list[int]:
    """Prefill, then one-token decodes through the paged cache."""
    out: list[int] = []
    (logits,) = runner.step([("s", prompt)])
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        (logits,) = runner.step([("s", out[-1:])])
    return out


def test_default_model_converts_once_and_is_cached(smollm2, download_dir):
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    assert "quantization_config" not in (smollm2 / "config.json").read_text()
    start = time.perf_counter()
    assert resolve_model_path("smollm2", download_dir) == smollm2
    assert time.perf_counter() - start < 0.5
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"


def test_converted_config_shape(smollm2):
    config = AutoConfig.from_pretrained(smollm2)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)


def test_cached_load_is_fast(smollm2, download_dir):
    start = time.perf_counter()
    path = resolve_model_path("smollm2", download_dir)
    model = load_model(path, AutoConfig.from_pretrained(path), torch.float32, CPU, "auto")
    assert time.perf_counter() - start < 5.0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: no lm_head in the file


def test_greedy_answers_paris_and_matches_hf(smollm2, smollm2_model, chat_prompt, paged_runner):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ours = greedy(paged_runner(smollm2_model, num_blocks=16, block_size=16), chat_prompt, 12)
    assert "Paris" in tokenizer.decode(ours), tokenizer.decode(ours)
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([chat_prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ours == ref[0, len(chat_prompt) :].tolist()


def test_unknown_path_raises(tmp_path):
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(ValueError, match="model") as info:
        resolve_model_path(missing, str(tmp_path))
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="model"):
        resolve_model_path(str(tmp_path / "missing.gguf"), None)


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path), None)


def test_failed_hub_download_raises(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="model='no-org/no-model'"):
        resolve_model_path("no-org/no-model", str(tmp_path))


def tiny_config(arch: str = "LlamaForCausalLM") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=[arch],
    )


def test_dummy_weights_are_seeded_and_sane(tmp_path):
    config = tiny_config()
    a = load_model(tmp_path / "nothing-here", config, torch.float32, CPU, "dummy")
    b = load_model(tmp_path / "nothing-here", config, torch.float32, CPU, "dummy")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.all(pa == 1)
        else:
            assert 0.01 < pa.std() < 0.03, name


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        build_model(tiny_config("GPT2LMHeadModel"), torch.float32, CPU)


def test_build_leaves_default_dtype_alone():
    model = build_model(tiny_config(), torch.bfloat16, CPU)
    assert torch.get_default_dtype() == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize(
    ("dtype", "stored", "device", "expected"),
    [
        ("auto", "bfloat16", "cpu", torch.float32),
        ("auto", "float16", "cuda", torch.float16),
        ("auto", "float32", "cuda", torch.bfloat16),
        ("auto", None, "cuda", torch.bfloat16),
        ("bfloat16", "float32", "cpu", torch.bfloat16),
        ("float32", None, "cuda", torch.float32),
    ],
)
def test_resolve_dtype(dtype, stored, device, expected):
    config = tiny_config()
    config.dtype = stored
    assert resolve_dtype(dtype, config, torch.device(device)) == expected


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", tiny_config(), CPU)
