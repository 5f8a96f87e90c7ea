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
