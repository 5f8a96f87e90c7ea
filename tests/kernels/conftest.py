"""Fixtures of the kernel tests: generators and the paged-batch builder (see ``tests.kernels.support``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def paged_batch():
    """The ``make_paged_batch`` builder (a fixture, so test modules need not import conftest)."""
    # Imported here, not at the top: conftest files load before tests/conftest.py turns on Triton's
    # interpreter, and importing the kernels (through the model package) that early would miss it.
    from tests.kernels.support import make_paged_batch

    return make_paged_batch
