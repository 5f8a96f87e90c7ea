"""kernels.checksum: the one-pass Triton kernel and the chunked torch reference give identical sums."""

from __future__ import annotations

import os

import pytest
import torch

from common.transfer.checksum import kv_checksum, kv_checksum_sums
from kernels import checksum as kernel
from tests.common.transfer.conftest import random_kv

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Sizes that hit: an empty input, a partial tile, a partial program, several programs, and a position past
# the modulus (weights wrap at 65521 words) that does not fall on a tile boundary.
SIZES = [0, 1, 1023, 1025, 16384 + 7, 65521 + 3000]


def _words(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=generator, dtype=torch.int64).to(torch.int32)


def _expected(words: torch.Tensor) -> list[int]:
    """The sums in Python integers, wrapped to signed 64 bits: the definition, independent of torch."""
    values = words.tolist()
    s1 = sum(values)
    s2 = sum(x * (i % kernel.MODULUS + 1) for i, x in enumerate(values))
    return [(s + 2**63) % 2**64 - 2**63 for s in (s1, s2)]


@pytest.mark.parametrize("n", SIZES)
def test_reference_matches_the_definition(n: int) -> None:
    words = _words(n, seed=n)
    assert kernel.checksum_sums_reference(words).tolist() == _expected(words)


def test_reference_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    words = _words(3 * (65521 * 2 + 5), seed=3)
    whole = kernel.checksum_sums_reference(words).tolist()
    monkeypatch.setattr(kernel, "_CHUNK_WORDS", kernel.MODULUS)  # many small chunks
    assert kernel.checksum_sums_reference(words).tolist() == whole


@pytest.mark.skipif(not INTERPRETED, reason="runs Triton on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("n", SIZES)
def test_triton_interpreted_matches_reference(n: int) -> None:
    words = _words(n, seed=10 + n)
    assert kernel.checksum_sums_triton(words).tolist() == kernel.checksum_sums_reference(words).tolist()


@pytest.mark.skipif(not INTERPRETED, reason="runs Triton on CPU tensors only under TRITON_INTERPRET=1")
def test_triton_extreme_words_wrap_like_the_reference() -> None:
    words = torch.full((20000,), -(2**31), dtype=torch.int32)
    words[::3] = 2**31 - 1
    assert kernel.checksum_sums_triton(words).tolist() == kernel.checksum_sums_reference(words).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("n", [*SIZES, 64 * 2**20 + 12345])  # the last is 256 MiB and a bit
def test_triton_on_cuda_matches_cpu_reference(n: int) -> None:
    words = _words(n, seed=20 + n % 1000)
    on_gpu = kernel.checksum_sums(words.cuda())
    assert on_gpu.device.type == "cuda"
    assert on_gpu.tolist() == kernel.checksum_sums_reference(words).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7,), (4, 2, 8, 16, 8, 128), (32, 2, 8, 16, 8, 128)])
def test_kv_checksum_identical_on_cpu_and_cuda(shape: tuple[int, ...]) -> None:
    kv = random_kv(shape, torch.bfloat16, seed=len(shape))
    assert kv_checksum(kv) == kv_checksum(kv.cuda())
    assert kv_checksum_sums(kv).tolist() == kv_checksum_sums(kv.cuda()).tolist()


def _pieces_of(words: torch.Tensor, rows: int, cuts: list[int]) -> list[tuple[torch.Tensor, int, int]]:
    """``words`` (rows x width) cut into column ranges: (strided rows view, logical row stride, offset) each."""
    grid = words.view(rows, -1)
    width = grid.shape[1]
    bounds = [0, *cuts, width]
    return [(grid[:, a:b], width, a) for a, b in zip(bounds, bounds[1:], strict=False)]


# (rows, width, cuts): odd widths, a piece past the modulus, an empty piece, a single row.
PIECES = [(1, 1025, [3]), (3, 7777, [1, 5000]), (4, 33000, [16385, 16385, 30001]), (2, 70001, [65521 + 17])]


@pytest.mark.parametrize(("rows", "width", "cuts"), PIECES)
def test_reference_sums_of_pieces_add_up_to_the_whole(rows: int, width: int, cuts: list[int]) -> None:
    words = _words(rows * width, seed=rows + width)
    total = torch.zeros(2, dtype=torch.int64)
    for piece, stride, offset in _pieces_of(words, rows, cuts):
        total += kernel.checksum_rows_reference(piece, stride, offset)
    assert total.tolist() == _expected(words)


@pytest.mark.skipif(not INTERPRETED, reason="runs Triton on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize(("rows", "width", "cuts"), PIECES[:2])
def test_triton_interpreted_rows_match_reference(rows: int, width: int, cuts: list[int]) -> None:
    words = _words(rows * width, seed=7 * rows + width)
    for piece, stride, offset in _pieces_of(words, rows, cuts):
        got = kernel.checksum_rows_triton(piece, stride, offset).tolist()
        assert got == kernel.checksum_rows_reference(piece, stride, offset).tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("rows", "width", "cuts"), PIECES)
def test_cuda_rows_kernel_matches_reference_on_fresh_inputs(rows: int, width: int, cuts: list[int]) -> None:
    words = _words(rows * width, seed=11 * rows + width)
    total = torch.zeros(2, dtype=torch.int64)
    for piece, stride, offset in _pieces_of(words, rows, cuts):
        got = kernel.checksum_rows_sums(piece.cuda(), stride, offset).cpu()
        assert got.tolist() == kernel.checksum_rows_reference(piece, stride, offset).tolist()
        total += got
    assert total.tolist() == _expected(words)


def test_rows_sums_refuse_rows_that_are_not_contiguous_words() -> None:
    with pytest.raises(ValueError, match="contiguous words"):
        kernel.checksum_rows_sums(_words(12, seed=1).view(3, 4).t(), 4)
