"""Writes received, verified KV into a decode worker's reserved cache blocks, off the engine thread.

Invariant (engine thread safety): the target blocks belong to a reservation that no request has adopted yet,
so no engine step reads or writes them while ``write`` runs; the engine only ever touches them after
``add_prefilled_request`` adopts the reservation, which the decode service allows only once ``write``
returned (the reservation is marked filled after it). Other blocks of the same cache tensor are written by the
engine concurrently, which is safe because the regions are disjoint. On CUDA the copy runs on a private side
stream, so it never queues behind (or delays) the engine's step kernels on its stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.kv_cache import check_kv_dtype, index_copy_blocks


class BlockWriter:
    """Copies ``kv`` ([layers, 2, n, block_size, heads, dim]) into blocks ``block_ids`` of ``cache``."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache = cache
        self._stream = torch.cuda.Stream(cache.device) if cache.is_cuda else None

    def check(self, kv: torch.Tensor, num_blocks: int) -> None:
        """Raise ``ValueError`` unless ``kv`` fits ``num_blocks`` reserved blocks of the cache (and its dtype
        casts into the cache's: never across an FP8 / non-FP8 boundary)."""
        cache = self.cache
        check_kv_dtype(kv.dtype, cache.dtype)
        if kv.dim() != cache.dim() or kv.shape[0:2] != cache.shape[0:2] or kv.shape[3:] != cache.shape[3:]:
            raise ValueError(f"kv shape {tuple(kv.shape)} does not fit the cache {tuple(cache.shape)}")
        if kv.shape[2] > num_blocks:
            raise ValueError(f"kv has {kv.shape[2]} blocks but the reservation holds {num_blocks}")

    def write(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Blocking (run it in a thread): the blocks hold ``kv`` when this returns.

        ``kv`` must be ready for any stream (the receiver host-synchronizes on its verification first).
        """
        self.check(kv, len(block_ids))
        ids = list(block_ids[: kv.shape[2]])
        if not ids:
            return
        if self._stream is None:
            self._copy(ids, kv)
            return
        with torch.cuda.device(self.cache.device), torch.cuda.stream(self._stream):
            self._copy(ids, kv)
            done = torch.cuda.Event()
            done.record()
        done.synchronize()

    def _copy(self, ids: list[int], kv: torch.Tensor) -> None:
        cache = self.cache
        source = kv.to(device=cache.device, dtype=cache.dtype, non_blocking=True)
        first = ids[0]
        if ids == list(range(first, first + len(ids))):  # a contiguous run: a strided slice copy, no index
            cache[:, :, first : first + len(ids)].copy_(source)
        else:
            index_copy_blocks(cache, torch.tensor(ids, device=cache.device), source)
