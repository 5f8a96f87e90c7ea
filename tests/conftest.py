"""Test-wide setup: skip `gpu` tests without CUDA; run Triton kernels in the interpreter on CPU."""

from __future__ import annotations

import os

import pytest

_CUDA = pytest.StashKey[bool]()  # whether CUDA is usable, decided once per session


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # Runs before any test module is imported, so Triton sees this when it first loads.
    config.stash[_CUDA] = _cuda_available()
    if not config.stash[_CUDA]:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash[_CUDA]:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
