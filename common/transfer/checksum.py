"""A Fletcher-style 64-bit checksum of a tensor's bytes, computed with torch on the tensor's own device.

Invariants:
- The value depends only on the tensor's row-major bytes (its dtype and shape are not hashed), so the
  same bytes give the same value on CPU and CUDA, and before and after a transfer.
- Integer sums are taken modulo 2**64 (int64 wrap-around), which is associative and commutative, so the
  result does not depend on reduction order, chunking or device.
- Any single changed byte changes ``s1``; swapping two different words changes ``s2`` unless their
  positions differ by a multiple of 65521 words (the Fletcher blind spot).
- Temporary memory stays near ``_CHUNK_WORDS * 16`` bytes (about 32 MiB: int64 weights and products),
  whatever the tensor size.
"""

from __future__ import annotations

import hashlib
import struct

import torch

_MODULUS = 65521  # largest prime below 2**16, as in Adler-32
# A multiple of the modulus, so one weight tensor serves every chunk: (start + i) % M == i % M.
_CHUNK_WORDS = _MODULUS * 32  # about 2.1 M words = 8 MiB of data per chunk
_MASK64 = (1 << 64) - 1


def kv_checksum(t: torch.Tensor) -> int:
    """The checksum of ``t``'s row-major bytes as an unsigned 64-bit int (syncs ``t``'s device once)."""
    words = _as_int32_words(t)
    s1 = torch.zeros((), dtype=torch.int64, device=words.device)
    s2 = torch.zeros((), dtype=torch.int64, device=words.device)
    weights = _position_weights(min(words.numel(), _CHUNK_WORDS), words.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        s1 += chunk.sum(dtype=torch.int64)
        s2 += (chunk * weights[: chunk.numel()]).sum()  # int32 * int64 -> int64 products
    return _combine(int(s1.item()), int(s2.item()), t.numel() * t.element_size())


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


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    """Weights ``(i % 65521) + 1`` for word positions ``0..n-1`` (int64)."""
    return torch.arange(n, dtype=torch.int64, device=device) % _MODULUS + 1


def _combine(s1: int, s2: int, num_bytes: int) -> int:
    """Fold both sums and the byte count into one unsigned 64-bit value."""
    packed = struct.pack("<QQQ", s1 & _MASK64, s2 & _MASK64, num_bytes & _MASK64)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")
