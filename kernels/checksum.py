"""The two running sums of the KV checksum over int32 words, in one pass (Triton) or chunked (torch reference).

For words ``x[0..n-1]`` (int32, sign-extended) the sums are, modulo 2**64 (int64 wrap-around):
    s1 = sum(x[i])        s2 = sum(x[i] * ((i % 65521) + 1))
Both implementations return them as an int64 tensor ``[s1, s2]`` on the words' device without syncing it.
Because the arithmetic is modular (associative and commutative), every reduction order gives the same bits,
so the Triton kernel and the reference agree exactly on the same words.
"""

from __future__ import annotations

import functools

import torch

MODULUS = 65521  # largest prime below 2**16, as in Adler-32
# A multiple of the modulus, so one weight tensor serves every chunk: (start + i) % M == i % M.
_CHUNK_WORDS = MODULUS * 32  # about 2.1 M words = 8 MiB of data per chunk
_BLOCK = 1024  # words per tile; must not exceed MODULUS (one conditional subtraction reduces the weight)
_TILES = 16  # tiles per program: 64 KiB of data each


def checksum_sums_reference(words: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: ``[s1, s2]`` of 1-d int32 ``words``; temporary memory about 32 MiB at most."""
    sums = torch.zeros(2, dtype=torch.int64, device=words.device)
    weights = torch.arange(min(words.numel(), _CHUNK_WORDS), dtype=torch.int64, device=words.device)
    weights = weights % MODULUS + 1
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        sums[0] += chunk.sum(dtype=torch.int64)
        sums[1] += (chunk * weights[: chunk.numel()]).sum()  # int32 * int64 -> int64 products
    return sums


def checksum_sums_triton(words: torch.Tensor) -> torch.Tensor:
    """``[s1, s2]`` of 1-d contiguous int32 ``words`` with one read of the data (CUDA, or TRITON_INTERPRET=1)."""
    per_program = _BLOCK * _TILES
    programs = triton_cdiv(words.numel(), per_program)
    if programs == 0:
        return torch.zeros(2, dtype=torch.int64, device=words.device)
    partials = torch.empty(programs, 2, dtype=torch.int64, device=words.device)
    _checksum_kernel()[(programs,)](words, partials, words.numel(), MODULUS=MODULUS, BLOCK=_BLOCK, TILES=_TILES)
    return partials.sum(dim=0)  # int64 wrap-around, like the per-program sums


def checksum_sums(words: torch.Tensor) -> torch.Tensor:
    """``[s1, s2]`` of 1-d contiguous int32 ``words``: the Triton kernel on CUDA, the reference elsewhere."""
    if words.is_cuda:
        with torch.cuda.device(words.device):  # Triton launches on the current device
            return checksum_sums_triton(words)
    return checksum_sums_reference(words)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _checksum_kernel():  # noqa: ANN202 - a triton.JITFunction, built once on first use (triton imported lazily)
    import triton
    import triton.language as tl

    @triton.jit
    def checksum_kernel(words_ptr, partials_ptr, n, MODULUS: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        acc1 = tl.zeros([BLOCK], dtype=tl.int64)
        acc2 = tl.zeros([BLOCK], dtype=tl.int64)
        # The tile's first position modulo MODULUS, advanced per tile without a division (int32 throughout).
        start = (pid * (BLOCK * TILES) % MODULUS).to(tl.int32)
        for tile in tl.static_range(TILES):
            index = pid * (BLOCK * TILES) + tile * BLOCK + lanes
            x = tl.load(words_ptr + index, mask=index < n, other=0).to(tl.int64)
            weight = start + lanes  # < 2 * MODULUS because BLOCK <= MODULUS
            weight = tl.where(weight >= MODULUS, weight - MODULUS, weight) + 1
            acc1 += x
            acc2 += x * weight.to(tl.int64)
            start = start + BLOCK
            start = tl.where(start >= MODULUS, start - MODULUS, start)
        tl.store(partials_ptr + pid * 2, tl.sum(acc1, axis=0))
        tl.store(partials_ptr + pid * 2 + 1, tl.sum(acc2, axis=0))

    return checksum_kernel
