"""Decode worker: reservations under a lease, verified KV import, continuous batching, token streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.transfer import TransferOutcome, make_receiver
from common.transfer.base import KVTransferHeader
from common.transfer.block_writer import BlockWriter
from common.transfer.placement import DirectPlacement, fits_cache
from proto import worker_pb2
from services.wire import logprobs_to_proto, prompt_logprobs_to_proto, sampling_from_proto
from services.worker_runtime import WorkerRuntime
from services.worker_service import BaseWorkerService

logger = logging.getLogger(__name__)


@dataclass
class Reservation:
    """Blocks pinned for one request's incoming KV; freed when the lease ends unless a Generate took them."""

    reservation_id: str
    block_ids: tuple[int, ...]
    deadline: float
    filled: bool = False
    writing: asyncio.Future | None = None  # the KV write into its blocks, while it runs (on_kv or place_kv)


class DecodeService(BaseWorkerService):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime)
        self.reservations: dict[str, Reservation] = {}
        self.block_writer = BlockWriter(runtime.engine.kv_cache)
        self.receiver = make_receiver(
            self.on_kv, runtime.settings.transfer, runtime.device, on_outcome=self._on_transfer, place=self.place_kv
        )
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever())

    def add_extra_services(self, server: grpc.aio.Server) -> None:
        self.receiver.add_to_server(server)

    async def close(self) -> None:
        self._expiry_task.cancel()
        await self.receiver.close()

    # ----------------------------------------------------------------- reservations
    async def Reserve(self, request: worker_pb2.ReserveRequest, context) -> worker_pb2.ReserveReply:  # noqa: N802
        if self.runtime.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        reservation_id = f"{request.request_id}@{time.monotonic_ns()}"
        num_tokens = request.num_tokens
        try:
            block_ids = await self.runtime.engine.call(LLMEngine.reserve_blocks, reservation_id, num_tokens)
        except ValueError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        lease = request.lease_s or self.runtime.settings.transfer.reservation_lease_s
        self.reservations[reservation_id] = Reservation(reservation_id, tuple(block_ids), time.monotonic() + lease)
        self.runtime.reservations = len(self.reservations)
        runtime = self.runtime
        return worker_pb2.ReserveReply(
            reservation_id=reservation_id,
            block_ids=block_ids,
            device=runtime.device,
            host_id=runtime.host_id,
            worker_id=runtime.worker_id,
            gpu_uuid=runtime.gpu_uuid,
        )

    async def Release(self, request: worker_pb2.ReleaseRequest, context) -> worker_pb2.ReleaseReply:  # noqa: N802
        return worker_pb2.ReleaseReply(released=await self._release(request.reservation_id))

    async def Renew(self, request: worker_pb2.RenewRequest, context) -> worker_pb2.RenewReply:  # noqa: N802
        """Push a live reservation's deadline to ``lease_s`` from now (never earlier than it was)."""
        reservation = self.reservations.get(request.reservation_id)
        if reservation is None:
            return worker_pb2.RenewReply(renewed=False)
        lease = request.lease_s or self.runtime.settings.transfer.reservation_lease_s
        reservation.deadline = max(reservation.deadline, time.monotonic() + lease)
        return worker_pb2.RenewReply(renewed=True)

    async def on_kv(self, header: KVTransferHeader, kv: torch.Tensor) -> None:
        """Called by the receiver only for a verified transfer; rejects what does not match a live reservation.

        The bytes go straight into the reserved blocks on a side stream, not through the engine thread: the
        reservation owns its blocks until Generate adopts them (``BlockWriter``), and it is marked filled only
        once they hold the KV, so a Generate can never start on half-written blocks. A tensor-parallel engine's
        cache here holds rank 0's heads only: the engine imports the KV then (between steps), scattering each
        rank its heads.
        """
        reservation = self.reservations.get(header.reservation_id)
        if reservation is None:
            raise ValueError(f"reservation {header.reservation_id!r} is unknown or expired")
        if tuple(header.block_ids) != reservation.block_ids[: len(header.block_ids)]:
            raise ValueError(f"block ids {header.block_ids} do not match reservation {header.reservation_id!r}")
        if reservation.filled:
            raise ValueError(f"reservation {header.reservation_id!r} is already filled")
        if reservation.writing is not None and not reservation.writing.done():
            raise ValueError(f"reservation {header.reservation_id!r} is being written by another transfer")
        if self.runtime.kv_cache_sharded:
            write = self.runtime.engine.call(LLMEngine.import_kv, header.reservation_id, kv)
        else:
            self.block_writer.check(kv, len(reservation.block_ids))
            write = asyncio.to_thread(self.block_writer.write, reservation.block_ids, kv)
        reservation.writing = asyncio.ensure_future(write)
        await asyncio.shield(reservation.writing)  # cancelling on_kv must not cut the write short
        if self.reservations.get(header.reservation_id) is not reservation:  # released or expired meanwhile
            raise ValueError(f"reservation {header.reservation_id!r} expired during the transfer")
        reservation.filled = True

    def place_kv(self, header: KVTransferHeader) -> DirectPlacement | None:
        """The cache blocks of a live, unfilled, idle reservation matching ``header``, claimed for a transfer
        that lands in them directly (None: the receiver buffers it and ``on_kv`` decides).

        The claim is ``reservation.writing`` (release waits for it, on_kv refuses meanwhile); the placement's
        commit marks the reservation filled only after the receiver verified the bytes in the blocks.
        Never under tensor parallelism: the cache here holds rank 0's heads only, so the whole-model KV lands in a
        buffer and ``on_kv`` has the engine scatter it to the ranks.
        """
        if self.runtime.kv_cache_sharded:
            return None
        reservation = self.reservations.get(header.reservation_id)
        if reservation is None or reservation.filled:
            return None
        if tuple(header.block_ids) != reservation.block_ids[: len(header.block_ids)]:
            return None
        if reservation.writing is not None and not reservation.writing.done():
            return None
        cache = self.block_writer.cache
        if not fits_cache(cache, header.shape, header.torch_dtype, header.block_ids):
            return None
        claim = reservation.writing = asyncio.get_running_loop().create_future()

        def commit() -> None:
            claim.set_result(None)
            if self.reservations.get(header.reservation_id) is not reservation:
                raise ValueError(f"reservation {header.reservation_id!r} expired during the transfer")
            reservation.filled = True

        return DirectPlacement(cache, commit, lambda: claim.done() or claim.set_result(None))

    def _on_transfer(self, outcome: TransferOutcome) -> None:
        self.runtime.metrics.observe_transfer(outcome.transport, outcome, outcome.checksum_mismatch)

    async def _release(self, reservation_id: str) -> bool:
        reservation = self.reservations.pop(reservation_id, None)
        self.runtime.reservations = len(self.reservations)
        if reservation is None:
            return False
        if reservation.writing is not None:  # its blocks go back to the pool only once nothing writes them
            with contextlib.suppress(Exception):
                await asyncio.shield(reservation.writing)
        await self.runtime.engine.call(LLMEngine.release_reservation, reservation_id)
        return True

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for reservation in [r for r in self.reservations.values() if r.deadline < now]:
                logger.warning(
                    "reservation %s expired unused; freeing %d blocks",
                    reservation.reservation_id,
                    len(reservation.block_ids),
                )
                await self._release(reservation.reservation_id)

    # ----------------------------------------------------------------- generation
    async def Generate(self, request: worker_pb2.GenerateRequest, context):  # noqa: N802
        try:
            params, prompt_logprobs_pending = _prompt_logprobs_here(request, sampling_from_proto(request.sampling))
            start, args, kwargs = self._starter(request, params)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        sent = len(request.output_token_ids)
        stream = self.runtime.engine.stream(request.request_id, start, *args, **kwargs)
        try:
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    chunk, sent = _chunk(output, sent)
                    if chunk is not None:
                        if prompt_logprobs_pending:  # the first chunk: the prompt is computed by now
                            prompt_logprobs_pending = False
                            prompt = request.prompt_token_ids
                            chunk.prompt_logprobs.extend(prompt_logprobs_to_proto(prompt, output.prompt_logprobs or ()))
                        yield chunk
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def _starter(self, request: worker_pb2.GenerateRequest, params) -> tuple[Callable[..., str], tuple, dict]:
        """The engine call that starts the request (picklable: it may run in the engine's own process)."""
        prompt, outputs = list(request.prompt_token_ids), list(request.output_token_ids)
        request_id, reservation_id = request.request_id, request.reservation_id
        if not reservation_id:
            kwargs = dict(prompt_token_ids=prompt, sampling_params=params, request_id=request_id,
                          output_token_ids=outputs)
            return LLMEngine.add_request, (), kwargs
        reservation = self.reservations.get(reservation_id)
        if reservation is None or not reservation.filled:
            raise ValueError(f"reservation_id {reservation_id!r} is unknown, expired or not filled")
        del self.reservations[reservation_id]  # from here on the engine request owns the blocks
        self.runtime.reservations = len(self.reservations)
        return LLMEngine.add_prefilled_request, (reservation_id, prompt, outputs, params), {"request_id": request_id}


def _prompt_logprobs_here(request: worker_pb2.GenerateRequest, params: SamplingParams) -> tuple[SamplingParams, bool]:
    """Whether this stream computes and sends the prompt's logprobs: only when it prefills the prompt alone itself.
    KV from a prefill worker (which sent them) or a migrated request (whose first token carried them) asks for none."""
    if params.prompt_logprobs is None:
        return params, False
    if request.reservation_id or request.output_token_ids:
        return params.replace(prompt_logprobs=None), False
    return params, True


def _chunk(output, sent: int) -> tuple[worker_pb2.GenerateChunk | None, int]:
    """The tokens of ``output`` past the first ``sent``, as one stream message (None if nothing new)."""
    completion = output.outputs[0]
    new_tokens = completion.token_ids[sent:]
    if not new_tokens and not output.finished:
        return None, sent
    chunk = worker_pb2.GenerateChunk(
        token_ids=new_tokens, finish_reason=completion.finish_reason or "", num_cached_tokens=output.num_cached_tokens
    )
    if completion.stop_reason is not None:
        chunk.stop_reason = str(completion.stop_reason)
    if completion.logprobs is not None:
        offset = len(completion.logprobs) - len(completion.token_ids)
        for index, token in enumerate(new_tokens, start=sent):
            chunk.logprobs.append(logprobs_to_proto(token, completion.logprobs[index + offset]))
    return chunk, len(completion.token_ids)
