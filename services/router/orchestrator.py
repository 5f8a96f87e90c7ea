"""One request's path through the cluster: pick workers, reserve, prefill, stream; retry and migrate.

A failed prefill worker: pick another and retry. A failed decode worker: re-prefill the prompt plus the
tokens already delivered on another decode worker and continue the same stream, so the caller sees no
repeated or missing token. Leaving the stream early (client gone) cancels the RPCs in flight, which
aborts the request on the workers and frees its blocks.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from common.config import RouterConfig, TransferConfig
from common.coord.prefix_index import PrefixLookup
from common.coord.watcher import RegistryWatcher
from common.coord.worker_info import WorkerInfo
from common.engine.block_pool import hash_full_blocks
from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams
from proto import worker_pb2, worker_pb2_grpc
from services.router.policy import RoutingPolicy, RoutingRequest
from services.wire import logprobs_from_proto, sampling_to_proto

logger = logging.getLogger(__name__)

class NoWorkersError(RuntimeError):
    """No worker can take the request now (none registered, all failed, or all full): a 503."""


class InvalidRequestError(ValueError):
    """A worker rejected the request's contents (INVALID_ARGUMENT): a 400, never retried."""


class _WorkerFailed(Exception):
    def __init__(self, worker: WorkerInfo, error: Exception) -> None:
        super().__init__(f"{worker.role} {worker.worker_id}: {error}")
        self.worker = worker


@dataclass(frozen=True)
class TokenEvent:
    """Tokens delivered to the client in one step, with their logprobs and the finish reason if done."""

    token_ids: tuple[int, ...]
    logprobs: tuple[dict[int, Logprob], ...] = ()
    finish_reason: str | None = None
    stop_reason: str | None = None
    worker_id: str = ""


@dataclass
class _Attempt:
    """What is known of a request across retries and migrations."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    delivered: list[int] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    prefix_hits: dict[str, int] = field(default_factory=dict)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.delivered


class Orchestrator:
    """Routes requests over the workers the registry watcher currently sees."""

    def __init__(
        self,
        model: str,
        config: RouterConfig,
        transfer: TransferConfig,
        watcher: RegistryWatcher,
        prefix_lookup: PrefixLookup | None,
        block_size: int = 16,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.transfer = transfer
        self.watcher = watcher
        self.prefix_lookup = prefix_lookup
        self.block_size = block_size
        self.policy = RoutingPolicy(config)
        self.inflight: Counter[str] = Counter()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.num_retries = 0
        self.num_migrations = 0
        # metrics hook: "migration", or what failed: "prefill_failed" | "decode_failed" | "kv_transfer_failed"
        self.on_retry = on_retry

    async def generate(
        self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; raises NoWorkersError / InvalidRequestError with a clear message."""
        attempt = _Attempt(request_id or f"req-{uuid.uuid4().hex[:12]}", list(prompt), params)
        self._check_context_length(len(attempt.prompt))
        for _ in range(self.config.max_retries + 1):
            decode = self._pick_decode(attempt)
            if decode is None:
                break
            try:
                async for event in self._on_decode(decode, attempt):
                    attempt.delivered.extend(event.token_ids)
                    yield event
                    if event.finish_reason:
                        return
                raise _WorkerFailed(decode, RuntimeError("stream ended without a finish reason"))
            except _WorkerFailed as failure:
                self._note_failure(attempt, failure)
                if attempt.delivered:
                    self.num_migrations += 1
                    self._report_retry("migration")
        raise NoWorkersError(
            f"no decode worker could serve request {attempt.request_id} "
            f"(failed: {sorted(attempt.failed) or 'none'}; alive: {len(self._alive('decode'))})"
        )

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    # ----------------------------------------------------------------- one decode worker
    async def _on_decode(self, decode: WorkerInfo, attempt: _Attempt) -> AsyncIterator[TokenEvent]:
        stub = self._stub(decode)
        self.inflight[decode.worker_id] += 1
        try:
            prepared = None
            if not self._prefill_locally(decode, attempt):
                prepared = await self._prefill_remote(decode, attempt)
            if prepared is None:  # short uncached prompt, or no prefill worker could help
                request = self._generate_request(attempt, attempt.delivered, "")
            else:
                first, request = prepared
                yield first
                if first.finish_reason:
                    return
            async for event in self._stream(stub, decode, request):
                yield event
        finally:
            self.inflight[decode.worker_id] -= 1

    async def _stream(self, stub, decode: WorkerInfo, request) -> AsyncIterator[TokenEvent]:
        call = stub.Generate(request)
        try:
            async for chunk in call:
                yield TokenEvent(
                    tuple(chunk.token_ids),
                    tuple(logprobs_from_proto(lp) for lp in chunk.logprobs),
                    chunk.finish_reason or None,
                    chunk.stop_reason or None,
                    decode.worker_id,
                )
        except grpc.aio.AioRpcError as error:
            raise self._classify(decode, error) from error
        finally:
            call.cancel()  # no-op when finished; aborts the request on the worker when we leave early

    async def _prefill_remote(self, decode: WorkerInfo, attempt: _Attempt):
        """Reserve on the decode worker and prefill elsewhere; (first token, Generate request), or None when
        no prefill worker could do it (the decode worker then prefills itself)."""
        stub = self._stub(decode)
        attempt.prefix_hits = await self._prefix_hits(attempt)
        for _ in range(self.config.max_retries + 1):
            reservation = await self._reserve(stub, decode, attempt.request_id, len(attempt.context))
            if reservation is None:
                return None
            try:
                reply = await self._prefill_with_retries(decode, reservation, attempt)
            except _TransferFailed:  # the KV arrived damaged: free the blocks, reserve again, prefill again
                self._report_retry("kv_transfer_failed")
                await self._release(stub, reservation)
                continue
            except BaseException:  # request invalid or client gone: free the blocks now
                await self._release(stub, reservation)
                raise
            if reply is None or reply.finish_reason:
                await self._release(stub, reservation)
            if reply is None:
                return None
            event = TokenEvent(
                (reply.next_token,),
                (logprobs_from_proto(reply.logprobs),) if reply.HasField("logprobs") else (),
                reply.finish_reason or None,
                reply.stop_reason or None,
                decode.worker_id,
            )
            outputs = [*attempt.delivered, reply.next_token]
            return event, self._generate_request(attempt, outputs, reservation.reservation_id)
        logger.warning("request %s: KV transfers into %s keep failing; it prefills locally", attempt.request_id,
                       decode.worker_id)
        return None

    async def _prefill_with_retries(self, decode: WorkerInfo, reservation, attempt: _Attempt):
        tried: set[str] = set()
        for _ in range(self.config.max_retries + 1):
            prefill = self._pick_prefill(attempt, tried)
            if prefill is None:
                return None
            tried.add(prefill.worker_id)
            self.inflight[prefill.worker_id] += 1
            try:
                return await self._stub(prefill).Prefill(self._prefill_request(attempt, decode, reservation))
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DATA_LOSS:
                    logger.warning("KV transfer for %s failed (%s); re-prefilling", attempt.request_id, error.details())
                    raise _TransferFailed() from error
                failure = self._classify(prefill, error)
                if not isinstance(failure, _WorkerFailed):
                    raise failure from error
                self._note_failure(attempt, failure)
            finally:
                self.inflight[prefill.worker_id] -= 1
        return None

    # ----------------------------------------------------------------- messages
    def _generate_request(self, attempt: _Attempt, outputs: list[int], reservation_id: str):
        return worker_pb2.GenerateRequest(
            request_id=attempt.request_id,
            prompt_token_ids=attempt.prompt,
            output_token_ids=outputs,
            sampling=sampling_to_proto(attempt.params),
            reservation_id=reservation_id,
        )

    def _prefill_request(self, attempt: _Attempt, decode: WorkerInfo, reservation) -> worker_pb2.PrefillRequest:
        target = worker_pb2.DecodeTarget(
            worker_id=decode.worker_id,
            address=decode.grpc_address,
            reservation_id=reservation.reservation_id,
            block_ids=reservation.block_ids,
            device=reservation.device,
            host_id=reservation.host_id,
            gpu_uuid=reservation.gpu_uuid,
        )
        return worker_pb2.PrefillRequest(
            request_id=attempt.request_id,
            context_token_ids=attempt.context,
            sampling=sampling_to_proto(attempt.params),
            target=target,
            num_generated=len(attempt.delivered),
        )

    async def _reserve(self, stub, decode: WorkerInfo, request_id: str, num_tokens: int):
        """A reservation, or None when the worker is full right now (it then prefills itself, queued)."""
        try:
            return await stub.Reserve(
                worker_pb2.ReserveRequest(
                    request_id=request_id, num_tokens=num_tokens, lease_s=self.transfer.reservation_lease_s
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None
            raise self._classify(decode, error) from error

    async def _release(self, stub, reservation) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Release(worker_pb2.ReleaseRequest(reservation_id=reservation.reservation_id), timeout=5)

    # ----------------------------------------------------------------- choosing workers
    def _alive(self, role: str) -> list[WorkerInfo]:
        workers = self.watcher.alive(role=role, model=self.model)
        return [replace(w, running=w.running + self.inflight[w.worker_id]) for w in workers]

    def _routing_request(self, attempt: _Attempt, exclude: set[str]) -> RoutingRequest:
        num_tokens = len(attempt.context)
        expected = attempt.params.max_tokens or 16
        blocks = -(-num_tokens // self.block_size)
        return RoutingRequest(
            prefix_hits=attempt.prefix_hits,
            model=self.model,
            num_prompt_tokens=num_tokens,
            num_prompt_blocks=blocks,
            num_blocks_needed=-(-(num_tokens + min(expected, 256)) // self.block_size),
            exclude=frozenset(exclude),
        )

    def _check_context_length(self, num_tokens: int) -> None:
        """A prompt no decode worker can hold is the client's error (400), not a missing worker (503)."""
        limits = [w.max_model_len for w in self._alive("decode") if w.max_model_len > 0]
        if limits and num_tokens >= max(limits):
            raise InvalidRequestError(f"prompt: {num_tokens} tokens is too long for max_model_len {max(limits)} "
                                      "(it must leave room for at least one generated token)")

    def _pick_decode(self, attempt: _Attempt) -> WorkerInfo | None:
        """The best decode worker with room; when all are full, the best one anyway (its engine queues)."""
        workers = self._alive("decode")
        request = self._routing_request(attempt, attempt.failed)
        return self.policy.pick_decode(workers, request) or self.policy.pick_decode(
            workers, replace(request, num_blocks_needed=0))

    def _pick_prefill(self, attempt: _Attempt, tried: set[str]) -> WorkerInfo | None:
        request = self._routing_request(attempt, attempt.failed | tried)
        return self.policy.pick_prefill(self._alive("prefill"), request)

    def _prefill_locally(self, decode: WorkerInfo, attempt: _Attempt) -> bool:
        prefill_available = bool(self._alive("prefill"))
        request = self._routing_request(attempt, attempt.failed)
        return self.policy.prefill_locally(request, decode, prefill_available)

    async def _prefix_hits(self, attempt: _Attempt) -> dict[str, int]:
        """Leading prompt blocks each prefill worker holds in its prefix cache (from the Redis index)."""
        prefills = self._alive("prefill")
        if self.prefix_lookup is None or not prefills:
            return {}
        hashes = hash_full_blocks(attempt.context, self.block_size)
        return await self.prefix_lookup.matched_blocks([w.worker_id for w in prefills], hashes)

    def _note_failure(self, attempt: _Attempt, failure: _WorkerFailed) -> None:
        logger.warning("request %s: %s", attempt.request_id, failure)
        attempt.failed.add(failure.worker.worker_id)
        self.watcher.mark_failed(failure.worker.worker_id)
        self.num_retries += 1
        self._report_retry(f"{failure.worker.role}_failed")

    def _report_retry(self, reason: str) -> None:
        if self.on_retry is not None:
            self.on_retry(reason)

    def _classify(self, worker: WorkerInfo, error: grpc.aio.AioRpcError) -> Exception:
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequestError(error.details())
        return _WorkerFailed(worker, RuntimeError(f"{error.code().name}: {error.details()}"))

    def _stub(self, worker: WorkerInfo) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(worker.grpc_address)
        if channel is None:
            channel = grpc.aio.insecure_channel(worker.grpc_address)
            self._channels[worker.grpc_address] = channel
        return worker_pb2_grpc.WorkerStub(channel)


class _TransferFailed(Exception):
    """The KV arrived corrupted or short: the reservation is released and the prompt prefilled again."""
