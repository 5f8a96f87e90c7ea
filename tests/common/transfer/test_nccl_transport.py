"""The NCCL transport between two processes, one per GPU (needs >= 2 CUDA devices)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import traceback
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from common.config import TransferConfig
from common.transfer.base import KVReceiver, KVTransferHeader, grpc_message_options
from tests.common.transfer.conftest import random_kv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]
CONFIG = TransferConfig(transport="nccl", timeout_s=20.0)
SHAPES = [(2, 2, 3, 16, 2, 8), (4, 2, 8, 16, 8, 128)]
MAX_BYTES = 4 * 2**20
TOO_BIG = (4, 2, 32, 16, 8, 128)  # 8 MiB of bf16: the receiver refuses it before any data moves


def _digest(kv: torch.Tensor) -> str:
    return hashlib.sha256(kv.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _receiver(port_queue: Any, result_queue: Any, stop: Any) -> None:
    try:
        asyncio.run(_receive_until_stopped(port_queue, result_queue, stop))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        result_queue.put(("error", traceback.format_exc()))


async def _receive_until_stopped(port_queue: Any, result_queue: Any, stop: Any) -> None:
    import grpc

    from common.transfer.nccl_transport import NcclReceiver

    torch.cuda.set_device(1)

    async def on_kv(header: KVTransferHeader, kv: torch.Tensor) -> None:
        if header.reservation_id == "unknown":
            raise ValueError("unknown reservation")
        # A digest, not the bytes: large queue items would block the child's exit until the parent reads them.
        result_queue.put(("kv", header.request_id, kv.device.index, _digest(kv)))

    server = grpc.aio.server(options=grpc_message_options(CONFIG.grpc_chunk_bytes))
    nccl = NcclReceiver("cuda:1", CONFIG.timeout_s)
    receiver = KVReceiver(on_kv, device="cuda:1", nccl=nccl, max_bytes=MAX_BYTES)
    receiver.add_to_server(server)
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await receiver.close()
    await server.stop(grace=None)


def _corruptible_sender() -> Any:
    """An NcclKVSender whose in-band checksum sums are off by one while ``corrupt`` is set."""
    from common.transfer.nccl_transport import NcclKVSender

    class CorruptibleSender(NcclKVSender):
        corrupt = False

        def _checksum_sums(self, kv: torch.Tensor) -> torch.Tensor:
            sums = super()._checksum_sums(kv)
            return sums + 1 if self.corrupt else sums

    return CorruptibleSender(CONFIG, "prefill-test", "cuda:0")


async def _send_all(address: str) -> list[Any]:
    torch.cuda.set_device(0)
    sender = _corruptible_sender()
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
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    ctx = mp.get_context("spawn")
    port_queue, result_queue, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    process = ctx.Process(target=_receiver, args=(port_queue, result_queue, stop))
    process.start()
    try:
        port = port_queue.get(timeout=60)
        results = asyncio.run(asyncio.wait_for(_send_all(f"127.0.0.1:{port}"), 120))
    finally:
        stop.set()
        process.join(30)
    received = {}
    while not result_queue.empty():
        item = result_queue.get()
        assert item[0] == "kv", item[1]
        received[item[1]] = item
    assert [r.ok for r in results] == [True, True, False, True, False, True, False, True] + [True] * 4, results
    assert "unknown reservation" in results[2].error and "exceeds" in results[4].error
    assert "checksum mismatch" in results[6].error
    for index, shape in enumerate(SHAPES):
        _, _, device_index, got = received[f"r{index}"]
        assert device_index == 1
        expected = random_kv(shape, torch.bfloat16, seed=index)
        assert got == _digest(expected)
    for i in range(4):
        expected = random_kv(SHAPES[1], torch.bfloat16, seed=50 + i)
        assert received[f"many{i}"][3] == _digest(expected)
    assert set(received) == {"r0", "r1", "after", "recovered", "fixed"} | {f"many{i}" for i in range(4)}


def test_checksum_identical_on_cpu_and_cuda() -> None:
    from common.transfer.checksum import kv_checksum

    kv = random_kv((4, 2, 8, 16, 8, 128), torch.bfloat16)
    assert kv_checksum(kv) == kv_checksum(kv.cuda(0)) == kv_checksum(kv.cuda(1))
