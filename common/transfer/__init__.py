"""KV transports behind one interface: ``nccl`` (GPU->GPU, one host) and ``grpc`` (bytes, any host).

Prefill side: ``make_sender(kind, config, ...)`` -> ``KVSender``. Decode side: ``make_receiver(...)`` ->
``KVReceiver`` (a gRPC servicer; ``add_to_server`` it). Pick ``kind`` with ``choose_transport``.
"""

from __future__ import annotations

from typing import Any

import torch

from common.config import CoordConfig, TransferConfig
from common.transfer.base import (
    ChecksumMismatchError,
    KVReceiver,
    KVSender,
    KVTransferHeader,
    OnKV,
    OnOutcome,
    Place,
    TransferError,
    TransferOutcome,
    TransferResult,
    choose_transport,
    grpc_message_options,
)
from common.transfer.checksum import kv_checksum
from common.transfer.grpc_transport import ChunkFilter, GrpcKVSender

__all__ = [
    "ChecksumMismatchError",
    "ChunkFilter",
    "GrpcKVSender",
    "KVReceiver",
    "KVSender",
    "KVTransferHeader",
    "OnOutcome",
    "Place",
    "TransferError",
    "TransferOutcome",
    "TransferResult",
    "choose_transport",
    "grpc_message_options",
    "kv_checksum",
    "make_receiver",
    "make_sender",
]


def make_sender(
    kind: str,
    config: TransferConfig,
    *,
    sender_id: str = "",
    device: torch.device | str = "cpu",
    store_host: str = "127.0.0.1",
    redis: Any = None,
    coord: CoordConfig | None = None,
) -> KVSender:
    """A sender for ``kind`` ("grpc" | "nccl"); nccl needs ``sender_id`` and the CUDA ``device`` of the KV."""
    if kind == "grpc":
        return GrpcKVSender(config)
    if kind == "nccl":
        from common.transfer.nccl_transport import NcclKVSender  # torch.distributed only where used

        if not sender_id:
            raise ValueError("the nccl sender needs a sender_id (the prefill worker id)")
        return NcclKVSender(config, sender_id, device, store_host=store_host, redis=redis, coord=coord)
    raise ValueError(f"unknown transport {kind!r}; expected grpc or nccl")


def make_receiver(
    on_kv: OnKV,
    config: TransferConfig,
    device: torch.device | str,
    max_bytes: int | None = None,
    on_outcome: OnOutcome | None = None,
    place: Place | None = None,
) -> KVReceiver:
    """The decode-side servicer; it also accepts nccl transfers when ``device`` is CUDA and NCCL is available.
    ``on_outcome`` hears of every transfer (metrics); ``place`` lets nccl transfers land straight in their
    reserved blocks (``placement.DirectPlacement``)."""
    device = torch.device(device)
    nccl = None
    if device.type == "cuda" and torch.distributed.is_available() and torch.distributed.is_nccl_available():
        from common.transfer.nccl_transport import NcclReceiver

        nccl = NcclReceiver(device, config.timeout_s, place=place)
    return KVReceiver(
        on_kv,
        device=device,
        nccl=nccl,
        max_bytes=max_bytes,
        on_outcome=on_outcome,
        host_pool_bytes=config.grpc_host_pool_bytes,
        part_timeout_s=config.timeout_s,
    )
