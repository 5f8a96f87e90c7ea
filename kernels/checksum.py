"""The two running sums of the KV checksum over int32 words, in one pass (Triton) or chunked (torch reference).

For words ``x[0..n-1]`` (int32, sign-extended) the sums are, modulo 2**64 (int64 wrap-around):
    s1 = sum(x[i])        s2 = sum(x[i] * ((i % 65521) + 1))
Both implementations return them as an int64 tensor ``[s1, s2]`` on the words' device without syncing it.
Pieces: ``checksum_rows_sums`` takes the sums of strided rows of words that sit at known positions of a larger
logical word sequence (row ``r`` starts at ``offset + r * logical_row_stride``); the weights use those logical
positions, so the sums of disjoint pieces covering a sequence add up (mod 2**64) to the sums of the whole.
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


def checksum_sums_reference(words: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Plain-torch reference: ``[s1, s2]`` of 1-d int32 ``words`` whose first word sits at logical position
    ``offset``; temporary memory about 32 MiB at most."""
    sums = torch.zeros(2, dtype=torch.int64, device=words.device)
    weights = torch.arange(min(words.numel(), _CHUNK_WORDS), dtype=torch.int64, device=words.device)
    weights = (weights + offset) % MODULUS + 1
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        sums[0] += chunk.sum(dtype=torch.int64)
        sums[1] += (chunk * weights[: chunk.numel()]).sum()  # int32 * int64 -> int64 products
    return sums


def checksum_rows_reference(rows: torch.Tensor, logical_row_stride: int, offset: int = 0) -> torch.Tensor:
    """Plain-torch reference of ``checksum_rows_sums`` (one reference pass per row)."""
    sums = torch.zeros(2, dtype=torch.int64, device=rows.device)
    for index in range(rows.shape[0]):
        sums += checksum_sums_reference(rows[index], offset + index * logical_row_stride)
    return sums


def checksum_sums_triton(words: torch.Tensor) -> torch.Tensor:
    """``[s1, s2]`` of 1-d contiguous int32 ``words`` with one read of the data (CUDA, or TRITON_INTERPRET=1)."""
    return checksum_rows_triton(words.view(1, -1), 0, 0)


def checksum_rows_triton(rows: torch.Tensor, logical_row_stride: int, offset: int = 0) -> torch.Tensor:
    """``checksum_rows_sums`` in one launch over every row (CUDA, or TRITON_INTERPRET=1)."""
    num_rows, width = rows.shape
    programs = triton_cdiv(width, _BLOCK * _TILES)
    if programs == 0 or num_rows == 0:
        return torch.zeros(2, dtype=torch.int64, device=rows.device)
    partials = torch.empty(num_rows * programs, 2, dtype=torch.int64, device=rows.device)
    row_stride = rows.stride(0) if num_rows > 1 else width
    _checksum_kernel()[(programs, num_rows)](
        rows, partials, width, row_stride, logical_row_stride, offset, MODULUS=MODULUS, BLOCK=_BLOCK, TILES=_TILES
    )
    return partials.sum(dim=0)  # int64 wrap-around, like the per-program sums


def checksum_rows_sums(rows: torch.Tensor, logical_row_stride: int, offset: int = 0) -> torch.Tensor:
    """``[s1, s2]`` of 2-d int32 ``rows`` (``rows.stride(1) == 1``; rows may be strided), row ``r`` taken at
    logical position ``offset + r * logical_row_stride``: the Triton kernel on CUDA, the reference elsewhere."""
    if rows.dim() != 2 or (rows.numel() and rows.stride(1) != 1):
        raise ValueError(f"need 2-d rows of contiguous words, got shape {tuple(rows.shape)} {rows.stride()}")
    if rows.is_cuda:
        with torch.cuda.device(rows.device):
            return checksum_rows_triton(rows, logical_row_stride, offset)
    return checksum_rows_reference(rows, logical_row_stride, offset)


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
    def checksum_kernel(
        words_ptr,
        partials_ptr,
        n,
        row_stride,
        logical_row_stride,
        offset,
        MODULUS: tl.constexpr,
        BLOCK: tl.constexpr,
        TILES: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        acc1 = tl.zeros([BLOCK], dtype=tl.int64)
        acc2 = tl.zeros([BLOCK], dtype=tl.int64)
        row_ptr = words_ptr + row * row_stride
        # The tile's first logical position modulo MODULUS, advanced per tile without a division (int32).
        first = row * logical_row_stride + pid * (BLOCK * TILES) + offset  # int64: row and pid are
        start = (first % MODULUS).to(tl.int32)
        for tile in tl.static_range(TILES):
            index = pid * (BLOCK * TILES) + tile * BLOCK + lanes
            x = tl.load(row_ptr + index, mask=index < n, other=0).to(tl.int64)
            weight = start + lanes  # < 2 * MODULUS because BLOCK <= MODULUS
            weight = tl.where(weight >= MODULUS, weight - MODULUS, weight) + 1
            acc1 += x
            acc2 += x * weight.to(tl.int64)
            start = start + BLOCK
            start = tl.where(start >= MODULUS, start - MODULUS, start)
        slot = row * tl.num_programs(0) + pid
        tl.store(partials_ptr + slot * 2, tl.sum(acc1, axis=0))
        tl.store(partials_ptr + slot * 2 + 1, tl.sum(acc2, axis=0))

    return checksum_kernel
