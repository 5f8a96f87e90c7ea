"""How many KV blocks fit (a byte budget on CPU, a fraction of GPU memory after a profile run on CUDA) and the
max_model_len they leave room for."""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig

from common.config import CacheConfig, EngineConfig, SchedulerConfig
from common.distributed.group import TensorParallelGroup
from kernels.attention_metadata import AttentionMetadata
from kernels.fp8 import FP8_DTYPE

logger = logging.getLogger(__name__)


KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8": FP8_DTYPE, "fp8_e4m3": FP8_DTYPE}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """``--kv-cache-dtype`` -> the cache tensor's dtype: auto = the model's, fp8 / fp8_e4m3 = e4m3."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


def bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return model.num_layers * 2 * block_size * model.num_kv_heads * model.head_dim * element


def allocate_kv_cache(
    model: torch.nn.Module,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    dtype: torch.dtype,
    device: torch.device,
    extra_bytes_per_block: int = 0,
    tp: TensorParallelGroup | None = None,
) -> tuple[torch.Tensor, int]:
    """The zero-filled cache tensor [layers, 2, blocks, block_size, kv_heads, head_dim] and its block count.

    ``dtype`` is the model's; the cache holds ``cache.kv_cache_dtype`` (FP8: one byte an element, so a byte
    budget holds twice the blocks of a 16-bit cache). ``extra_bytes_per_block``: what each block also costs
    elsewhere (a draft model's cache indexed by the same block ids), so that the memory budget holds both caches.
    ``tp``: the block count is the smallest any rank can hold (rank 0 schedules block ids that every rank's cache
    must have).
    """
    cache_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, dtype)
    per_block = bytes_per_block(model, cache.block_size, cache_dtype)
    num_blocks = count_blocks(model, cache, scheduler, dtype, device, per_block + extra_bytes_per_block)
    if tp is not None:
        num_blocks = tp.all_reduce_min(num_blocks)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory: no room for a single KV block of {per_block} bytes")
    shape = (model.num_layers, 2, num_blocks, cache.block_size, model.num_kv_heads, model.head_dim)
    kv_cache = torch.zeros(shape, dtype=cache_dtype, device=device)
    logger.info(
        "KV cache: %d blocks x %d tokens of %s (%.1f MiB, %d bytes per block)",
        num_blocks,
        cache.block_size,
        cache_dtype,
        num_blocks * per_block / 2**20,
        per_block,
    )
    return kv_cache, num_blocks


def count_blocks(
    model: torch.nn.Module,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    dtype: torch.dtype,
    device: torch.device,
    per_block: int,
) -> int:
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory // per_block
    if device.type != "cuda":
        return cache.cpu_kv_cache_memory_default // per_block
    if not 0.0 < cache.gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {cache.gpu_memory_utilization}")
    cache_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, dtype)
    peak_activation = profile_activation_bytes(
        model, cache.block_size, scheduler.max_num_batched_tokens, dtype, device, cache_dtype
    )
    free, total = torch.cuda.mem_get_info(device)
    budget = total * cache.gpu_memory_utilization - (total - free) - peak_activation
    return int(budget // per_block)


@torch.inference_mode()
def profile_activation_bytes(
    model: torch.nn.Module,
    block_size: int,
    num_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    cache_dtype: torch.dtype | None = None,
) -> int:
    """Peak extra memory of one forward over a full token budget (one long prefill), with logits."""
    num_blocks = -(-num_tokens // block_size)
    shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    scratch = torch.zeros(shape, dtype=cache_dtype or dtype, device=device)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        query_lens_cpu=(num_tokens,),
        seq_lens_cpu=(num_tokens,),
        block_size=block_size,
    )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    tokens = torch.zeros(num_tokens, dtype=torch.long, device=device)
    hidden = model(tokens, torch.arange(num_tokens, device=device), scratch, metadata)
    model.compute_logits(hidden[-min(num_tokens, 256) :])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del scratch, hidden
    torch.cuda.empty_cache()
    return int(peak)


def resolve_max_model_len(config: EngineConfig, hf_config: PretrainedConfig, num_blocks: int) -> int:
    """The configured length (default: the model's limit), lowered to what the KV cache can hold."""
    model_limit = int(getattr(hf_config, "max_position_embeddings", 2048))
    wanted = config.model.max_model_len or model_limit
    if wanted > model_limit:
        raise ValueError(f"max_model_len {wanted} exceeds the model's max_position_embeddings {model_limit}")
    capacity = num_blocks * config.cache.block_size
    if wanted > capacity:
        logger.warning("max_model_len %d lowered to the KV cache capacity of %d tokens", wanted, capacity)
        wanted = capacity
    sched = config.scheduler
    if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < wanted:
        raise ValueError(
            f"max_num_batched_tokens {sched.max_num_batched_tokens} must be at least "
            f"max_model_len {wanted} when chunked prefill is disabled"
        )
    return wanted
