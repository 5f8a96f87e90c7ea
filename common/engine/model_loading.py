"""Everything an engine builds once at startup: device, weights, tokenizer, KV cache, decode CUDA graphs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from common.config import EngineConfig, ModelConfig
from common.distributed.group import TensorParallelGroup
from common.engine.cuda_graphs import DecodeGraphs
from common.engine.kv_cache_sizing import allocate_kv_cache, resolve_max_model_len
from common.engine.spec.draft_model import DraftModel, load_draft_model
from common.lora.adapter import LoRABaseShapes
from common.lora.registry import LoRAAdapters
from common.models.loader import load_model, resolve_dtype, resolve_model_path
from common.models.quantization import resolve_quantization
from kernels.paged_attention import kernels_support, warm_up_attention_kernels

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the current CUDA device when there is one, else CPU; CUDA always gets an explicit index."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


@dataclass(frozen=True)
class MemoryReport:
    """Device memory the engine holds, as reported at startup."""

    weight_bytes: int
    kv_cache_bytes: int
    num_kv_blocks: int
    kv_cache_tokens: int


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve. Invariant: ``max_model_len`` tokens fit in ``kv_cache``'s ``memory.num_kv_blocks``
    blocks, and ``decode_graphs`` (None on CPU or when eager) were captured over that same ``kv_cache``."""

    device: torch.device
    model_path: Path
    hf_config: PretrainedConfig
    tokenizer: object | None
    dtype: torch.dtype
    model: torch.nn.Module
    kv_cache: torch.Tensor
    max_model_len: int
    eos_token_ids: frozenset[int]
    decode_graphs: DecodeGraphs | None
    memory: MemoryReport
    draft: DraftModel | None = None  # speculative decoding's draft model (its cache is the engine's to make)
    verify_graphs: DecodeGraphs | None = None  # speculative verification steps on CUDA
    lora: LoRAAdapters | None = None  # --enable-lora: the adapters and their GPU slot pool (the graphs read it)


def load_model_and_kv_cache(config: EngineConfig, tp: TensorParallelGroup | None = None) -> LoadedModel:
    """Load weights and tokenizer, size and allocate the KV cache, and capture decode graphs on CUDA.

    With ``tp`` this loads one rank's shard; every rank of the group calls it at once (its collectives: the KV block
    count, the CUDA profile run and graph captures run in the same order everywhere)."""
    device = resolve_device(config.model.device)
    model_path = resolve_model_path(config.model.model, config.model.download_dir)
    hf_config: PretrainedConfig = AutoConfig.from_pretrained(model_path)
    tokenizer = load_tokenizer(config.model, model_path)
    dtype = resolve_dtype(config.model.dtype, hf_config, device)
    quantization = resolve_quantization(config.model.quantization, hf_config)
    model = load_model(model_path, hf_config, dtype, device, config.model.load_format, tp=tp,
                       quantization=quantization)
    draft = load_speculative_draft(config, hf_config, dtype, device)
    lora = load_lora_adapters(config, hf_config, dtype, device, tp)  # before KV sizing: its slots take memory too
    extra = draft.kv_bytes_per_block(config.cache.block_size) if draft is not None else 0
    kv_cache, num_blocks = allocate_kv_cache(
        model, config.cache, config.scheduler, dtype, device, extra_bytes_per_block=extra, tp=tp
    )
    max_model_len = resolve_max_model_len(config, hf_config, num_blocks)
    memory = MemoryReport(
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        kv_cache_bytes=kv_cache.numel() * kv_cache.element_size(),
        num_kv_blocks=num_blocks,
        kv_cache_tokens=num_blocks * config.cache.block_size,
    )
    graphs = capture_decode_graphs(config, model, kv_cache, device, max_model_len, lora)
    verify_graphs = capture_verify_graphs(config, model, kv_cache, device, max_model_len, lora)
    warm_up_kernels(model, kv_cache, dtype)
    eos_ids = eos_token_ids(hf_config, tokenizer)
    return LoadedModel(
        device,
        model_path,
        hf_config,
        tokenizer,
        dtype,
        model,
        kv_cache,
        max_model_len,
        eos_ids,
        graphs,
        memory,
        draft,
        verify_graphs,
        lora,
    )


def load_lora_adapters(
    config: EngineConfig,
    hf_config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    tp: TensorParallelGroup | None = None,
) -> LoRAAdapters | None:
    """``--enable-lora``: the slot pool (unsharded widths: tensor parallelism is refused with LoRA) and the
    ``--lora-modules`` adapters, each read and checked now so a bad folder fails at startup."""
    if not config.lora.enable_lora:
        return None
    if tp is not None:
        raise ValueError("enable_lora: multi-LoRA is not tensor-parallel yet; use tensor_parallel_size=1")
    return LoRAAdapters(config.lora, LoRABaseShapes.from_hf_config(hf_config), device, dtype)


def load_speculative_draft(
    config: EngineConfig, hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device
) -> DraftModel | None:
    """The draft model of ``--speculative-config`` method draft_model (loaded before the KV cache is sized, which
    then budgets the draft's own cache per block too), else None."""
    spec = config.scheduler.speculative_config
    if spec is None or spec.method != "draft_model":
        return None
    return load_draft_model(spec, hf_config, dtype, device, config.model.load_format, config.model.download_dir)


def load_tokenizer(model_config: ModelConfig, model_path: Path):
    """The tokenizer, or None when skipped or when the model folder has none (token-id prompts only)."""
    if model_config.skip_tokenizer_init:
        return None
    source = model_config.tokenizer or model_path
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if model_config.tokenizer:
            raise ValueError(f"tokenizer: cannot load {source!r}: {error}") from error
        logger.warning("no tokenizer in %s; only token-id prompts will work", source)
        return None


def eos_token_ids(hf_config: PretrainedConfig, tokenizer) -> frozenset[int]:
    """The union of the model config's and the tokenizer's end-of-sequence ids."""
    ids: set[int] = set()
    for source in (hf_config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(t) for t in source)
    return frozenset(ids)


def capture_decode_graphs(
    config: EngineConfig,
    model: torch.nn.Module,
    kv_cache: torch.Tensor,
    device: torch.device,
    max_model_len: int,
    lora: LoRAAdapters | None = None,
) -> DecodeGraphs | None:
    """CUDA graphs for decode steps up to min(max_num_seqs, 512) sequences; None on CPU or when eager."""
    if device.type != "cuda" or config.model.enforce_eager:
        return None
    block_size = config.cache.block_size
    graphs = DecodeGraphs(
        model,
        kv_cache,
        block_size,
        max_batch=min(config.scheduler.max_num_seqs, 512),
        max_blocks_per_seq=-(-max_model_len // block_size),
        device=device,
        lora_pool=lora.pool if lora is not None else None,
    )
    graphs.capture()
    return graphs


VERIFY_GRAPH_MAX_BATCH = 64
"""Largest batch captured for verification steps: past it speculation rarely pays (decode turns compute-bound)."""


def capture_verify_graphs(
    config: EngineConfig,
    model: torch.nn.Module,
    kv_cache: torch.Tensor,
    device: torch.device,
    max_model_len: int,
    lora: LoRAAdapters | None = None,
) -> DecodeGraphs | None:
    """CUDA graphs of speculative verification steps (each sequence its last token + k drafts), batch up to
    ``VERIFY_GRAPH_MAX_BATCH`` (or disable_by_batch_size); None on CPU, when eager, or without speculation."""
    spec = config.scheduler.speculative_config
    if device.type != "cuda" or config.model.enforce_eager or spec is None:
        return None
    k, block_size = spec.num_speculative_tokens, config.cache.block_size
    max_batch = min(config.scheduler.max_num_seqs, spec.disable_by_batch_size or VERIFY_GRAPH_MAX_BATCH)
    graphs = DecodeGraphs(
        model,
        kv_cache,
        block_size,
        max_batch=min(max_batch, VERIFY_GRAPH_MAX_BATCH),
        max_blocks_per_seq=-(-(max_model_len + k) // block_size),  # padding rows may sit k past the last position
        device=device,
        tokens_per_seq=k + 1,
        lora_pool=lora.pool if lora is not None else None,
    )
    graphs.capture()
    return graphs


def warm_up_kernels(model: torch.nn.Module, kv_cache: torch.Tensor, dtype: torch.dtype) -> None:
    """Compile the attention kernels' variants now rather than on the first requests (CUDA only); ``dtype`` is
    the model's (the queries'), which an FP8 cache does not share."""
    query = torch.empty(1, 1, kv_cache.shape[-1], dtype=dtype, device=kv_cache.device)
    if not kv_cache.is_cuda or not kernels_support(query, kv_cache[0, 0], kv_cache[0, 1]):
        return
    started = time.perf_counter()
    launches = warm_up_attention_kernels(model.num_heads, kv_cache[0, 0], kv_cache[0, 1], dtype)
    torch.cuda.synchronize(kv_cache.device)
    logger.info("warmed up %d attention kernel variants in %.1fs", launches, time.perf_counter() - started)


def log_engine_ready(loaded: LoadedModel, block_size: int, load_seconds: float) -> None:
    memory = loaded.memory
    logger.info(
        "engine ready in %.2fs: %s on %s (%s); weights %.2f GiB, KV cache %.2f GiB = %d blocks of %d tokens "
        "(%d tokens); max_model_len %d; decode CUDA graphs %s",
        load_seconds,
        loaded.model_path.name,
        loaded.device,
        loaded.dtype,
        memory.weight_bytes / 2**30,
        memory.kv_cache_bytes / 2**30,
        memory.num_kv_blocks,
        block_size,
        memory.kv_cache_tokens,
        loaded.max_model_len,
        f"up to batch {loaded.decode_graphs.max_batch}" if loaded.decode_graphs else "off",
    )
