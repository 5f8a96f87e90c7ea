"""NCCL transfers straight into a receiver's cache blocks, between two processes, one per GPU (needs 2 GPUs).

The receiver (cuda:1) maps reservations named ``direct-*`` onto its cache with a ``place`` callable that
reports commits (with a digest of the blocks at commit time) and abandons; other reservations take the
buffered path into ``on_kv``. Checks: one run and two runs land directly with the exact bytes; scattered ids
fall back to ``on_kv``; a corrupt direct transfer is refused and abandoned, never committed, and the channel
carries the next one; several in flight, direct and buffered mixed, all arrive.
"""

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
CACHE_SHAPE = (4, 2, 64, 16, 8, 128)  # bf16: 16 MiB


def _kv(num_blocks: int, seed: int) -> torch.Tensor:
    return random_kv((*CACHE_SHAPE[:2], num_blocks, *CACHE_SHAPE[3:]), torch.bfloat16, seed=seed)


def _build_receiver(result_queue: Any) -> KVReceiver:
    """The receiver child's endpoint on GPU 1 (run_with_receiver_child): direct placements into its own cache,
    each commit, abandon and buffered on_kv queued with a digest of the bytes."""
    from common.transfer.nccl_transport import NcclReceiver
    from common.transfer.placement import DirectPlacement

    torch.cuda.set_device(1)
    cache = torch.zeros(CACHE_SHAPE, dtype=torch.bfloat16, device="cuda:1")

    def place(header: KVTransferHeader) -> DirectPlacement | None:
        if not header.reservation_id.startswith("direct-"):
            return None
        rid, ids = header.request_id, list(header.block_ids)

        def commit() -> None:
            result_queue.put(("commit", rid, kv_digest(cache[:, :, ids])))

        return DirectPlacement(cache, commit, lambda: result_queue.put(("abandon", rid, "")))

    async def on_kv(header: KVTransferHeader, kv: torch.Tensor) -> None:
        result_queue.put(("kv", header.request_id, kv_digest(kv)))

    return KVReceiver(on_kv, device="cuda:1", nccl=NcclReceiver("cuda:1", CONFIG.timeout_s, place=place))


PLANS: dict[str, tuple[str, list[int]]] = {
    "one-run": ("direct-a", list(range(0, 8))),
    "scattered": ("direct-b", list(range(30, 14, -1))),  # 16 runs: buffered, on_kv
    "two-runs": ("direct-c", [*range(40, 44), *range(50, 54)]),
    "corrupt": ("direct-d", list(range(56, 60))),
    "after": ("direct-d", list(range(56, 60))),
}
MANY: dict[str, tuple[str, list[int]]] = {
    "many-direct-0": ("direct-e", list(range(8, 12))),
    "many-buffered-1": ("plain", [13, 11, 9, 7, 5, 3]),
    "many-direct-2": ("direct-f", list(range(60, 64))),
    "many-buffered-3": ("plain", [1, 3, 5, 7, 9, 11]),
}


def _tensors() -> dict[str, torch.Tensor]:
    plans = PLANS | MANY
    return {name: _kv(len(ids), seed=index) for index, (name, (_, ids)) in enumerate(plans.items())}


async def _send_all(address: str) -> dict[str, Any]:
    torch.cuda.set_device(0)
    sender = corruptible_nccl_sender(CONFIG, "prefill-direct", "cuda:0")
    tensors = {name: t.cuda(0) for name, t in _tensors().items()}
    results = {}
    try:
        for name, (reservation, ids) in PLANS.items():
            sender.corrupt = name == "corrupt"
            results[name] = await sender.send(address, name, reservation, ids, tensors[name])
        sender.corrupt = False
        sends = [sender.send(address, name, rid, ids, tensors[name]) for name, (rid, ids) in MANY.items()]
        results |= dict(zip(MANY, await asyncio.gather(*sends), strict=True))
    finally:
        await sender.close()
    return results


def test_nccl_direct_receive_into_cache_blocks_fallback_and_corruption() -> None:
    results, items = run_with_receiver_child(_build_receiver, _send_all)
    events: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        assert item[0] != "error", item[1]
        kind, name, digest = item
        events.setdefault(name, []).append((kind, digest))
    assert {name: r.ok for name, r in results.items()} == {name: name != "corrupt" for name in PLANS | MANY}
    assert "checksum mismatch" in results["corrupt"].error
    expected = {name: kv_digest(t) for name, t in _tensors().items()}
    direct = ["one-run", "two-runs", "after", "many-direct-0", "many-direct-2"]
    buffered = ["scattered", "many-buffered-1", "many-buffered-3"]
    for name in direct:
        assert events[name] == [("commit", expected[name])], name
    for name in buffered:
        assert events[name] == [("kv", expected[name])], name
    assert events["corrupt"] == [("abandon", "")]
