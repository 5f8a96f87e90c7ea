"""The NCCL transport between two processes, one per GPU (needs >= 2 CUDA devices)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from common.config import TransferConfig
from common.transfer.base import KVReceiver, KVTransferHeader
from tests.common.transfer.conftest import corruptible_nccl_sender, kv_digest, random_kv, run_with_receiver_child

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]
CONFIG = TransferConfig(transport="nccl", timeout_s=20.0)
SHAPES = [(2, 2, 3, 16, 2, 8), (4, 2, 8, 16, 8, 128)]
MAX_BYTES = 4 * 2**20
TOO_BIG = (4, 2, 32, 16, 8, 128)  # 8 MiB of bf16: the receiver refuses it before any data moves


def _build_receiver(result_queue: Any) -> KVReceiver:
    """The receiver child's endpoint on GPU 1 (run_with_receiver_child): it queues a digest of each KV it gets."""
    from common.transfer.nccl_transport import NcclReceiver

    torch.cuda.set_device(1)

    async def on_kv(header: KVTransferHeader, kv: torch.Tensor) -> None:
        if header.reservation_id == "unknown":
            raise ValueError("unknown reservation")
        result_queue.put(("kv", header.request_id, kv.device.index, kv_digest(kv)))

    return KVReceiver(on_kv, device="cuda:1", nccl=NcclReceiver("cuda:1", CONFIG.timeout_s), max_bytes=MAX_BYTES)


async def _send_all(address: str) -> list[Any]:
    torch.cuda.set_device(0)
    sender = corruptible_nccl_sender(CONFIG, "prefill-test", "cuda:0")
    results = []
    try:
        for index, shape in enumerate(SHAPES):
            kv = random_kv(shape, torch.bfloat16, seed=index).cuda(0)
            results.append(await sender.send(address, f"r{index}", "ok", list(range(shape[2])), kv))
        kv = random_kv(SHAPES[0], torch.bfloat16).cuda(0)
        results.append(await sender.send(address, "refused", "unknown", list(range(SHAPES[0][2])), kv))
        results.append(await sender.send(address, "after", "ok", list(range(SHAPES[0][2])), kv))
        big = random_kv(TOO_BIG, torch.bfloat16).cuda(0)
        results.append(await sender.send(address, "big", "ok", list(range(TOO_BIG[2])), big))
        results.append(await sender.send(address, "recovered", "ok", list(range(SHAPES[0][2])), kv))
        sender.corrupt = True
        results.append(await sender.send(address, "corrupt", "ok", list(range(SHAPES[0][2])), kv))
        sender.corrupt = False
        results.append(await sender.send(address, "fixed", "ok", list(range(SHAPES[0][2])), kv))
        many = [random_kv(SHAPES[1], torch.bfloat16, seed=50 + i).cuda(0) for i in range(4)]
        results += await asyncio.gather(
            *(sender.send(address, f"many{i}", "ok", list(range(SHAPES[1][2])), t) for i, t in enumerate(many))
        )
    finally:
        await sender.close()
    return results


def test_nccl_round_trip_and_errors() -> None:
    results, items = run_with_receiver_child(_build_receiver, _send_all)
    received = {}
    for item in items:
        assert item[0] == "kv", item[1]
        received[item[1]] = item
    assert [r.ok for r in results] == [True, True, False, True, False, True, False, True] + [True] * 4, results
    assert "unknown reservation" in results[2].error and "exceeds" in results[4].error
    assert "checksum mismatch" in results[6].error
    for index, shape in enumerate(SHAPES):
        _, _, device_index, got = received[f"r{index}"]
        assert device_index == 1
        expected = random_kv(shape, torch.bfloat16, seed=index)
        assert got == kv_digest(expected)
    for i in range(4):
        expected = random_kv(SHAPES[1], torch.bfloat16, seed=50 + i)
        assert received[f"many{i}"][3] == kv_digest(expected)
    assert set(received) == {"r0", "r1", "after", "recovered", "fixed"} | {f"many{i}" for i in range(4)}


def test_checksum_identical_on_cpu_and_cuda() -> None:
    from common.transfer.checksum import kv_checksum

    kv = random_kv((4, 2, 8, 16, 8, 128), torch.bfloat16)
    assert kv_checksum(kv) == kv_checksum(kv.cuda(0)) == kv_checksum(kv.cuda(1))
