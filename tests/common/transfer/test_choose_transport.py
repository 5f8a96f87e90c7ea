"""choose_transport: auto picks nccl only where it can work; explicit nccl that cannot work raises."""

from __future__ import annotations

import pytest

from common.transfer import choose_transport

CASES = [
    # config, sender, receiver, same_host, expected
    ("auto", "cuda:0", "cuda:1", True, "nccl"),
    ("auto", "cuda:1", "cuda", True, "nccl"),
    ("auto", "cuda:0", "cuda:0", True, "grpc"),  # one GPU: NCCL cannot pair two ranks on it
    ("auto", "cuda:0", "cuda:1", False, "grpc"),
    ("auto", "cpu", "cuda:1", True, "grpc"),
    ("auto", "cuda:0", "cpu", True, "grpc"),
    ("auto", "cpu", "cpu", True, "grpc"),
    ("grpc", "cuda:0", "cuda:1", True, "grpc"),
    ("nccl", "cuda:0", "cuda:1", True, "nccl"),
]


@pytest.mark.parametrize(("config", "sender", "receiver", "same_host", "expected"), CASES)
def test_table(config: str, sender: str, receiver: str, same_host: bool, expected: str) -> None:
    assert choose_transport(config, sender, receiver, same_host) == expected


@pytest.mark.parametrize(
    ("sender", "receiver", "same_host", "reason"),
    [
        ("cpu", "cuda:0", True, "CUDA"),
        ("cuda:0", "cuda:1", False, "different hosts"),
        ("cuda:0", "cuda:0", True, "share one GPU"),
    ],
)
def test_explicit_nccl_that_cannot_work_raises(sender: str, receiver: str, same_host: bool, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        choose_transport("nccl", sender, receiver, same_host)


def test_same_gpu_override() -> None:
    # Each pod sees its own GPU as cuda:0; the caller knows they differ.
    assert choose_transport("auto", "cuda:0", "cuda:0", True, same_gpu=False) == "nccl"
    assert choose_transport("auto", "cuda:0", "cuda:1", True, same_gpu=True) == "grpc"


def test_unknown_transport_raises() -> None:
    with pytest.raises(ValueError, match="unknown transport"):
        choose_transport("rdma", "cuda:0", "cuda:1", True)
