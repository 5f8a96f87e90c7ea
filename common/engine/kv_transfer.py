"""KV in and out of the cache for the disaggregated pools: reservations, import, export, prefilled requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from common.engine.kv_cache_manager import KVCacheManager, cdiv
from common.engine.request import Request
from common.engine.request_lifecycle import RequestLifecycle
from common.engine.request_validation import RequestValidator
from common.engine.sampling_params import SamplingParams
from kernels.kv_cache import check_kv_dtype, index_copy_blocks


class KVBlocks(Protocol):
    """The engine's KV blocks in the whole-model layout ``[layers, 2, blocks, block_size, kv_heads, head_dim]``,
    whatever holds them (one cache here, or each tensor-parallel rank its heads: ``ShardedKVBlocks``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def read(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A contiguous whole-model copy of ``block_ids``, in that order."""

    def write(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """``kv`` (the cache's dtype, ``len(block_ids)`` blocks) into ``block_ids``."""


class LocalKVBlocks:
    """The blocks of one cache tensor that holds every KV head (an engine without tensor parallelism)."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache = cache

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.cache.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    def read(self, block_ids: Sequence[int]) -> torch.Tensor:
        return self.cache.index_select(2, torch.tensor(list(block_ids), device=self.cache.device))

    def write(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        index = torch.tensor(list(block_ids), device=self.cache.device)
        index_copy_blocks(self.cache, index, kv.to(device=self.cache.device, dtype=self.cache.dtype))


class KVTransfer:
    """The decode pool reserves blocks, imports a prefill worker's KV into them and adopts them as a request;
    the prefill pool gathers a finished request's KV before its blocks are freed.

    KV tensors are [layers, 2, blocks, block_size, kv_heads, head_dim], blocks in block-table order, every KV head
    of the model even when tensor-parallel ranks each hold some of them (``blocks`` gathers and scatters then).
    A reservation id is never also a live request id until ``add_prefilled_request`` turns it into one.
    """

    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        kv_cache: torch.Tensor,
        requests: RequestLifecycle,
        validator: RequestValidator,
        blocks: KVBlocks | None = None,
    ) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.kv_cache = kv_cache
        self.blocks: KVBlocks = blocks if blocks is not None else LocalKVBlocks(kv_cache)
        self.requests = requests
        self.validator = validator

    def reserve_blocks(self, reservation_id: str, num_tokens: int) -> list[int]:
        """Pin enough free blocks for ``num_tokens`` tokens of KV arriving from a prefill worker.

        Raises ValueError when the pool cannot supply them now (the router picks another worker).
        """
        max_model_len = self.validator.max_model_len
        if num_tokens < 1 or num_tokens >= max_model_len:
            raise ValueError(f"num_tokens: {num_tokens} is outside [1, max_model_len {max_model_len})")
        if reservation_id in self.kv_cache_manager.tables or reservation_id in self.requests:
            raise ValueError(f"reservation_id {reservation_id!r} is already in use")
        return self.kv_cache_manager.reserve(reservation_id, num_tokens)

    def release_reservation(self, reservation_id: str) -> None:
        """Return an unused reservation's blocks (lease expired, transfer failed, request aborted)."""
        self.kv_cache_manager.release(reservation_id)

    def import_kv(self, reservation_id: str, kv: torch.Tensor) -> None:
        """Write verified KV into the first ``kv.shape[2]`` blocks of a reservation."""
        block_ids = self.kv_cache_manager.block_ids(reservation_id)
        if not block_ids:
            raise ValueError(f"reservation_id {reservation_id!r} is unknown or expired")
        blocks = self.blocks
        check_kv_dtype(kv.dtype, blocks.dtype)
        shape, full = tuple(kv.shape), blocks.shape
        if len(shape) != 6 or shape[0:2] != full[0:2] or shape[3:] != full[3:] or shape[2] > len(block_ids):
            raise ValueError(
                f"kv shape {shape} does not fit reservation of {len(block_ids)} blocks in cache {blocks.shape}"
            )
        if shape[2]:
            self.blocks.write(block_ids[: shape[2]], kv)

    def gather_kv(self, request: Request) -> torch.Tensor:
        """A contiguous copy of the KV of every computed token's block (the last one may be partial)."""
        block_ids = self.kv_cache_manager.block_ids(request.request_id)
        num_blocks = cdiv(request.num_computed_tokens, self.kv_cache_manager.block_size)
        return self.blocks.read(block_ids[:num_blocks])

    def add_prefilled_request(
        self,
        reservation_id: str,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        """Start decoding a request whose KV for every token but the last already sits in a reservation.

        ``output_token_ids`` holds at least the first token sampled by the prefill worker. The reservation's
        blocks become the request's block table; on ValueError the reservation is left as it was.
        """
        request_id = request_id or reservation_id
        token_ids = self.validator.validate_prompt(None, prompt_token_ids, sampling_params)
        if not output_token_ids:
            raise ValueError("output_token_ids: a prefilled request needs its first sampled token")
        self.validator.validate_resume(token_ids, output_token_ids[:-1], sampling_params, False)
        head = self.requests.new_request(request_id, token_ids, sampling_params, output_token_ids)
        self.kv_cache_manager.adopt(reservation_id, head)
        self.requests.add_running(head)
        return request_id
