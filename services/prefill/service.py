"""Prefill worker: run the context, sample the next token, ship the KV to the decode worker's reservation.

Concurrent Prefill RPCs batch together in the engine (continuous batching with a token budget) and
reuse its prefix cache. The request's blocks go back to the pool as soon as its KV is gathered; the
gathered copy lives only until the transfer finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import grpc

from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.transfer import GrpcKVSender, choose_transport, make_sender
from proto import worker_pb2
from services.wire import logprobs_to_proto, prompt_logprobs_to_proto, sampling_from_proto
from services.worker_runtime import WorkerRuntime
from services.worker_service import BaseWorkerService

logger = logging.getLogger(__name__)


FAULT_ENV = "TANDEM_FAULT_CORRUPT_KV_TRANSFERS"  # test-only: corrupt the first N grpc KV transfers


class CorruptFirstTransfers:
    """Test-only chunk filter: flips one byte in the first chunk of each of the first ``count`` transfers."""

    def __init__(self, count: int) -> None:
        self.remaining = count

    def __call__(self, index: int, data: bytes) -> bytes:
        if index != 0 or self.remaining <= 0 or not data:
            return data
        self.remaining -= 1
        return bytes([data[0] ^ 0xFF]) + data[1:]


class PrefillService(BaseWorkerService):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime)
        self.senders: dict[str, object] = {}
        faults = int(os.environ.get(FAULT_ENV, "0") or 0)
        if faults:
            logger.warning("%s=%d: corrupting KV transfers on purpose (tests only)", FAULT_ENV, faults)
            self.senders["grpc"] = GrpcKVSender(runtime.settings.transfer, chunk_filter=CorruptFirstTransfers(faults))

    async def Prefill(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillReply:  # noqa: N802
        started = time.perf_counter()
        try:
            params = sampling_from_proto(request.sampling)
            prompt, generated, local = first_token_request(params, list(request.context_token_ids),
                                                           request.num_generated)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        output = await self._run(request, prompt, generated, local, context)
        completion = output.outputs[0]
        token = completion.token_ids[-1]
        reply = worker_pb2.PrefillReply(
            next_token=token,
            num_cached_tokens=output.num_cached_tokens,
            prefill_seconds=time.perf_counter() - started,
            finish_reason=final_reason(
                completion.finish_reason,
                params,
                request.num_generated + 1,
                len(request.context_token_ids) + 1 >= self.runtime.engine.max_model_len,
            ),
            stop_reason="" if completion.stop_reason is None else str(completion.stop_reason),
        )
        if completion.logprobs:
            reply.logprobs.CopyFrom(logprobs_to_proto(token, completion.logprobs[-1]))
        if local.prompt_logprobs is not None:
            reply.prompt_logprobs.extend(prompt_logprobs_to_proto(prompt, output.prompt_logprobs or ()))
        if not reply.finish_reason and request.HasField("target"):
            reply.transfer.CopyFrom(await self._ship(request, output.exported_kv, context))
        return reply

    async def _run(
        self, request: worker_pb2.PrefillRequest, prompt: list[int], generated: list[int], params: SamplingParams,
        context,
    ):
        request_id = request.request_id
        stream = self.runtime.engine.stream(request_id, LLMEngine.add_request,
                                            prompt_token_ids=prompt, output_token_ids=generated,
                                            sampling_params=params, request_id=request_id, export_kv=True)
        last = None
        try:
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    last = output
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return last

    async def _ship(self, request: worker_pb2.PrefillRequest, kv, context) -> worker_pb2.TransferStats:
        target = request.target
        sender = self._sender(target)
        block_ids = list(target.block_ids)[: kv.shape[2]]
        result = await sender.send(target.address, request.request_id, target.reservation_id, block_ids, kv)
        self.runtime.metrics.observe_transfer(sender.transport, result)
        if result.ok:
            logger.debug(
                "shipped KV of %s to %s: %d bytes via %s in %.2f ms",
                request.request_id,
                target.worker_id,
                result.bytes,
                sender.transport,
                result.seconds * 1e3,
            )
        else:
            logger.warning("KV transfer of %s to %s failed: %s", request.request_id, target.worker_id, result.error)
            await context.abort(grpc.StatusCode.DATA_LOSS, f"kv transfer failed: {result.error}")
        return worker_pb2.TransferStats(transport=sender.transport, bytes=result.bytes, seconds=result.seconds)

    def _sender(self, target: worker_pb2.DecodeTarget):
        settings = self.runtime.settings
        known = bool(target.gpu_uuid and self.runtime.gpu_uuid)
        kind = choose_transport(
            settings.transfer.transport,
            self.runtime.device,
            target.device,
            same_host=target.host_id == self.runtime.host_id,
            same_gpu=target.gpu_uuid == self.runtime.gpu_uuid if known else None,
        )
        if kind not in self.senders:
            self.senders[kind] = make_sender(
                kind,
                settings.transfer,
                sender_id=self.runtime.worker_id,
                device=self.runtime.device,
                store_host=settings.worker.host,
                coord=settings.coord,
            )
        return self.senders[kind]

    async def close(self) -> None:
        for sender in self.senders.values():
            await sender.close()


def first_token_request(
    params: SamplingParams, context: list[int], num_generated: int
) -> tuple[list[int], list[int], SamplingParams]:
    """The engine request that samples the next token of ``context``: (prompt, generated, params).

    A request resumed after ``num_generated`` tokens (a migration) takes them as its output tokens, as the
    uninterrupted request had them: its grammar advances over them, penalties count them as output, and a seeded
    generator skips their draws. Its prompt logprobs went out with the first token already: not computed again.
    """
    if num_generated <= 0:
        return context, [], params.replace(max_tokens=1, min_tokens=min(1, params.min_tokens), n=1)
    split = len(context) - num_generated
    local = params.replace(max_tokens=num_generated + 1, min_tokens=min(params.min_tokens, num_generated + 1), n=1,
                           prompt_logprobs=None)
    return context[:split], context[split:], local


def final_reason(local_reason: str | None, params: SamplingParams, num_output_tokens: int, at_limit: bool) -> str:
    """'' when decoding should continue; 'stop' / 'length' when this token already ends the request."""
    if local_reason == "stop":
        return "stop"
    if at_limit or (params.max_tokens is not None and num_output_tokens >= params.max_tokens):
        return "length"
    return ""
