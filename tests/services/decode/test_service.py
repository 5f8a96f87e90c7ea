"""The decode service receiving an FP8 KV cache over gRPC: a prefill worker's e4m3 blocks land byte for byte in
an FP8 decode cache; shipped to a decode worker whose cache is bf16 they are refused with a clear error. A
tensor-parallel decode worker hands verified KV to its engine (which scatters it to the ranks), never in place."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from common.config import TransferConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.transfer import GrpcKVSender
from common.transfer.base import KVReceiver, KVTransferHeader
from kernels.fp8 import FP8_DTYPE
from kernels.kv_cache import write_kv
from proto import worker_pb2
from services.decode.service import DecodeService, Reservation, _prompt_logprobs_here
from services.wire import sampling_to_proto
from tests.common.transfer.conftest import hosting, run

CONFIG = TransferConfig(transport="grpc", grpc_chunk_bytes=4096, timeout_s=8.0)
CACHE_SHAPE = (2, 2, 12, 4, 2, 8)  # [layers, 2, blocks, block_size, heads, dim]
K_SCALE, V_SCALE = 0.05, 0.02


def decode_service(cache_dtype: torch.dtype) -> DecodeService:
    """A DecodeService on a stand-in runtime (no engine) whose cache is filled with a sentinel byte pattern."""
    cache = torch.full(CACHE_SHAPE, -7.0).to(cache_dtype)
    runtime = SimpleNamespace(
        engine=SimpleNamespace(kv_cache=cache), settings=SimpleNamespace(transfer=CONFIG), device="cpu", metrics=None,
        kv_cache_sharded=False,
    )
    return DecodeService(runtime)


def prefill_fp8_kv(block_ids: list[int]) -> torch.Tensor:
    """What an FP8 prefill worker exports: K/V written by write_kv (quantized with the scales) into its cache,
    then its request's blocks gathered in block-table order (as KVTransfer.gather_kv does)."""
    cache = torch.zeros(CACHE_SHAPE, dtype=FP8_DTYPE)
    gen = torch.Generator().manual_seed(5)
    slots = torch.tensor([b * CACHE_SHAPE[3] + o for b in block_ids for o in range(CACHE_SHAPE[3])])
    for layer in range(CACHE_SHAPE[0]):
        k, v = (torch.randn(len(slots), *CACHE_SHAPE[4:], generator=gen) for _ in range(2))
        write_kv(k, v, cache[layer, 0], cache[layer, 1], slots, K_SCALE, V_SCALE)
    return cache.index_select(2, torch.tensor(block_ids))


async def push(cache_dtype: torch.dtype, kv: torch.Tensor, block_ids: list[int]):
    """Send ``kv`` over gRPC into reservation ``block_ids`` of a fresh decode service; returns (result, service,
    its cache before the transfer)."""
    service = decode_service(cache_dtype)
    before = service.block_writer.cache.clone()
    service.reservations["resv"] = Reservation("resv", tuple(block_ids), time.monotonic() + 60)
    try:
        async with hosting(KVReceiver(service.on_kv)) as address:
            sender = GrpcKVSender(CONFIG)
            try:
                return await sender.send(address, "req", "resv", block_ids, kv), service, before
            finally:
                await sender.close()
    finally:
        await service.close()


def test_fp8_blocks_arrive_byte_for_byte_at_half_the_bytes() -> None:
    kv = prefill_fp8_kv([3, 4, 9])
    result, service, _ = run(push(FP8_DTYPE, kv, [6, 1, 7]))
    assert result.ok, result.error
    assert result.bytes == kv.numel()  # one byte an element: half of the same blocks in bf16
    cache = service.block_writer.cache
    assert torch.equal(cache[:, :, [6, 1, 7]].view(torch.uint8), kv.view(torch.uint8))
    assert service.reservations["resv"].filled


def test_fp8_blocks_into_a_bf16_decode_cache_are_refused_clearly() -> None:
    result, service, before = run(push(torch.bfloat16, prefill_fp8_kv([3, 4]), [6, 1]))
    assert not result.ok
    assert "--kv-cache-dtype" in result.error and "float8_e4m3fn" in result.error, result.error
    assert torch.equal(service.block_writer.cache, before)
    assert not service.reservations["resv"].filled


class RecordingEngine:
    """A stand-in engine handle whose cache holds one of the model's two KV heads (rank 0's), recording calls."""

    def __init__(self) -> None:
        self.kv_cache = torch.zeros(CACHE_SHAPE[:4] + (1,) + CACHE_SHAPE[5:])
        self.calls: list[tuple] = []

    async def call(self, fn, *args):  # noqa: ANN001, ANN201 - AsyncEngine.call's signature
        self.calls.append((fn, *args))


def test_a_tensor_parallel_decode_worker_imports_through_its_engine_and_never_places_in_its_cache() -> None:
    async def scenario() -> None:
        engine = RecordingEngine()
        runtime = SimpleNamespace(engine=engine, settings=SimpleNamespace(transfer=CONFIG), device="cpu",
                                  metrics=None, kv_cache_sharded=True)
        service = DecodeService(runtime)
        try:
            service.reservations["resv"] = Reservation("resv", (6, 1, 7), time.monotonic() + 60)
            kv = torch.randn(CACHE_SHAPE[:2] + (2,) + CACHE_SHAPE[3:])  # whole-model KV: both heads
            header = KVTransferHeader.for_tensor("req", "resv", [6, 1], kv, "nccl")
            assert service.place_kv(header) is None  # lands in a buffer, not in rank 0's partial cache
            await service.on_kv(header, kv)
            ((fn, reservation_id, imported),) = engine.calls
            assert fn is LLMEngine.import_kv and reservation_id == "resv" and imported is kv
            assert service.reservations["resv"].filled
            assert not engine.kv_cache.any()
        finally:
            await service.close()

    run(scenario())


def test_prompt_logprobs_are_computed_only_by_a_stream_that_prefills_the_prompt_alone():
    params = SamplingParams(prompt_logprobs=1)
    sampling = sampling_to_proto(params)
    own = worker_pb2.GenerateRequest(prompt_token_ids=[1, 2], sampling=sampling)
    assert _prompt_logprobs_here(own, params) == (params, True)
    for other in (worker_pb2.GenerateRequest(prompt_token_ids=[1, 2], reservation_id="r@1", sampling=sampling),
                  worker_pb2.GenerateRequest(prompt_token_ids=[1, 2], output_token_ids=[5], sampling=sampling)):
        assert _prompt_logprobs_here(other, params) == (params.replace(prompt_logprobs=None), False)
    assert _prompt_logprobs_here(own, SamplingParams()) == (SamplingParams(), False)
