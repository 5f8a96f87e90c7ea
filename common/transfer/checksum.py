"""A Fletcher-style 64-bit checksum of a tensor's bytes, computed on the tensor's own device.

Invariants:
- The value depends only on the tensor's row-major bytes (its dtype and shape are not hashed), so the
  same bytes give the same value on CPU and CUDA, and before and after a transfer.
- Integer sums are taken modulo 2**64 (int64 wrap-around), which is associative and commutative, so the
  result does not depend on reduction order, chunking or device: CUDA runs a one-pass Triton kernel, CPU the
  plain-torch reference (``kernels.checksum``), and both give identical bits for the same bytes.
- Any single changed byte changes ``s1``; swapping two different words changes ``s2`` unless their
  positions differ by a multiple of 65521 words (the Fletcher blind spot).
"""

from __future__ import annotations

import hashlib
import struct

import torch

from kernels.checksum import checksum_sums

_MASK64 = (1 << 64) - 1


def kv_checksum(t: torch.Tensor) -> int:
    """The checksum of ``t``'s row-major bytes as an unsigned 64-bit int (syncs ``t``'s device once)."""
    s1, s2 = kv_checksum_sums(t).tolist()
    return fold_checksum(s1, s2, t.numel() * t.element_size())


def kv_checksum_sums(t: torch.Tensor) -> torch.Tensor:
    """The two running sums ``[s1, s2]`` (int64, on ``t``'s device), enqueued on the current stream; no sync.

    ``fold_checksum(s1, s2, num_bytes)`` turns them into ``kv_checksum(t)``.
    """
    return checksum_sums(_as_int32_words(t))


def fold_checksum(s1: int, s2: int, num_bytes: int) -> int:
    """Fold both sums and the byte count into one unsigned 64-bit value."""
    packed = struct.pack("<QQQ", s1 & _MASK64, s2 & _MASK64, num_bytes & _MASK64)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


def _as_int32_words(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as int32 words; a 1-3 byte tail is zero-padded into one last word."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = data.numel() // 4 * 4
    words = data[:whole].view(torch.int32)
    if whole == data.numel():
        return words
    tail = torch.zeros(4, dtype=torch.uint8, device=data.device)
    tail[: data.numel() - whole] = data[whole:]
    return torch.cat([words, tail.view(torch.int32)])
