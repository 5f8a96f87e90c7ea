"""One request's path through the cluster: pick workers, reserve, prefill, stream; retry and migrate.

A failed prefill worker: pick another and retry. A failed KV transfer (transport error or checksum mismatch):
release the reservation, reserve again and prefill again. A failed decode worker: re-prefill the prompt plus
the tokens already delivered on another decode worker and continue the same stream, so the caller sees no
repeated or missing token. All of these draw on one retry budget per request (see ``Orchestrator``). Leaving
the stream early (client gone) cancels the RPCs in flight, which aborts the request on the workers and frees
its blocks, and releases a reservation no Generate has taken over yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from common.config import RouterConfig, TransferConfig
from common.coord.prefix_index import MAX_LOOKUP_BLOCKS, PrefixLookup
from common.coord.watcher import RegistryWatcher
from common.coord.worker_info import WorkerInfo
from common.engine.block_pool import hash_full_blocks
from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams
from proto import worker_pb2, worker_pb2_grpc
from services.router.liveness import cancel_when_gone, cancelled_by, renew_lease_forever
from services.router.policy import DecodeLoad, Placement, PlacementSignals, RoutingPolicy, RoutingRequest
from services.router.prefill_load import PrefillLoad
from services.wire import logprobs_from_proto, prompt_logprobs_from_proto, sampling_to_proto

logger = logging.getLogger(__name__)

StubFactory = Callable[[str], worker_pb2_grpc.WorkerStub]  # grpc address -> stub (the Worker service's RPCs)
_UNDECIDED = Placement(False, "prefill_pool")  # a request's placement before its first decision


class NoWorkersError(RuntimeError):
    """No worker can take the request now (none registered, all failed, all full, or retries spent): a 503."""


class InvalidRequestError(ValueError):
    """A worker rejected the request's contents (INVALID_ARGUMENT): a 400, never retried."""


class _WorkerFailed(Exception):
    """A worker's RPC failed (anything but INVALID_ARGUMENT, DATA_LOSS, or a full decode worker)."""

    def __init__(self, worker: WorkerInfo, error: Exception) -> None:
        super().__init__(f"{worker.role} {worker.worker_id}: {error}")
        self.worker = worker


class _TransferFailed(Exception):
    """The KV arrived corrupted or short (DATA_LOSS): the reservation is released and the prompt prefilled again."""


PromptLogprobs = tuple[dict[int, Logprob] | None, ...]
"""One entry per prompt token, vLLM's layout: None for the first (nothing precedes it), then {token: Logprob} holding
the prompt token and its top alternatives."""


@dataclass(frozen=True)
class TokenEvent:
    """Tokens delivered to the client in one step, with their logprobs and the finish reason if done.

    ``prompt_logprobs`` is set only on a request's first event, when its params ask for them, whichever worker
    computed them (a prefill worker or the decode worker prefilling itself); a migration never repeats them.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[dict[int, Logprob], ...] = ()
    finish_reason: str | None = None
    stop_reason: str | None = None
    worker_id: str = ""
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class _RequestState:
    """What is known of a request across retries and migrations.

    Invariant: ``retries_left`` only goes down, by one per failure, and never below 0.
    """

    request_id: str
    prompt: list[int]
    params: SamplingParams
    retries_left: int
    delivered: list[int] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)  # workers that failed this request: never picked again
    prefix_hits: dict[str, int] = field(default_factory=dict)
    remote_prefill_failed: bool = False  # a prefill worker or a KV transfer has failed this request
    placement: Placement = _UNDECIDED  # where this attempt's prompt is prefilled, and why

    @property
    def context(self) -> list[int]:
        return self.prompt + self.delivered

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The next try computes the prompt's logprobs: asked for, and no token (which carries them) delivered yet."""
        return self.params.prompt_logprobs is not None and not self.delivered

    def wire_params(self, prompt_logprobs: bool) -> worker_pb2.SamplingOptions:
        """The request's params for one RPC; ``prompt_logprobs`` False drops them (that RPC must not compute them)."""
        if prompt_logprobs or self.params.prompt_logprobs is None:
            return sampling_to_proto(self.params)
        return sampling_to_proto(self.params.replace(prompt_logprobs=None))


@dataclass(frozen=True)
class _Handoff:
    """A finished remote prefill: its sampled token and the Generate request that continues from it.

    ``reservation`` holds the context's KV on the decode worker until that Generate takes it over; None when
    already released (the first token finished the request).
    """

    first: TokenEvent
    request: worker_pb2.GenerateRequest
    reservation: worker_pb2.ReserveReply | None


class GrpcStubs:
    """The default stub factory: one insecure channel per worker address, kept until ``close``."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def __call__(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return worker_pb2_grpc.WorkerStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


class Orchestrator:
    """Routes requests over the workers the registry watcher currently sees.

    Retry budget: each request gets ``config.max_retries`` retries, i.e. at most ``max_retries + 1`` tries,
    shared by every kind of failure. Each of these spends one retry: a prefill worker failing (the next try
    picks another prefill worker, same reservation), a KV transfer failing or arriving with a bad checksum
    (the reservation is released; the next try reserves and prefills again), a decode worker failing on
    Reserve or on Generate before or mid-stream (the next try re-prefills prompt + delivered tokens on another
    decode worker: a migration). A failure with no retry left ends the request with NoWorkersError. So one
    request makes at most ``max_retries + 1`` Prefill RPCs and ``max_retries + 1`` Generate streams.

    Each try first looks up the context's prefix-cache hits on every worker of both pools (one Redis round trip),
    so the decode pick scores them; then the policy places the prefill (``policy.place_prefill``: local for short
    or decode-cached prompts and, under --auto-prefill-ttft-ms, for a saturated prefill pool within the decode
    worker's TPOT budget; remote otherwise). Falling back to a prefill on the decode worker itself spends
    nothing: it happens when no prefill worker is alive or untried, when the decode worker is full (its engine
    queues the request), and on the request's last try once a remote prefill has failed (repeated transfer
    failures thus end on the decode worker, which needs no transfer). Each try's final placement and its reason
    go to ``on_placement``. No decode worker to pick: NoWorkersError at once.
    """

    def __init__(
        self,
        model: str,
        config: RouterConfig,
        transfer: TransferConfig,
        watcher: RegistryWatcher,
        prefix_lookup: PrefixLookup | None,
        block_size: int = 16,
        on_retry: Callable[[str], None] | None = None,
        stubs: StubFactory | None = None,
        on_placement: Callable[[str, str], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.transfer = transfer
        self.watcher = watcher
        self.prefix_lookup = prefix_lookup
        self.block_size = block_size
        self.policy = RoutingPolicy(config)
        self.inflight: Counter[str] = Counter()
        self.prefill_load = PrefillLoad()  # remote prefills this router has in flight, per prefill worker
        self.local_prefill_load = PrefillLoad()  # prefills decode workers run for this router's requests
        self._own_stubs = GrpcStubs() if stubs is None else None
        self._stubs: StubFactory = stubs or self._own_stubs
        self.num_retries = 0  # worker failures
        self.num_migrations = 0
        # metrics hook: "migration", or what failed: "prefill_failed" | "decode_failed" | "kv_transfer_failed"
        self.on_retry = on_retry
        self.on_placement = on_placement  # metrics hook: (placement, reason) of each try's prefill
        # a worker missing from the registry this long (two missed heartbeats past its TTL) is treated as dead
        self._gone_grace_s = 2 * watcher.heartbeat_s

    async def generate(
        self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Stream the request's tokens; raises NoWorkersError / InvalidRequestError with a clear message."""
        state = _RequestState(
            request_id or f"req-{uuid.uuid4().hex[:12]}", list(prompt), params, retries_left=self.config.max_retries
        )
        self._check_context_length(len(state.prompt))
        while True:
            state.prefix_hits = await self._prefix_hits(state)
            decode = self._pick_decode(state)
            if decode is None:
                raise self._no_decode_error(state)
            try:
                async with contextlib.aclosing(self._serve_on(decode, state)) as events:
                    async for event in events:
                        state.delivered.extend(event.token_ids)
                        yield event
                        if event.finish_reason:
                            return
                raise _WorkerFailed(decode, RuntimeError("stream ended without a finish reason"))
            except _WorkerFailed as failure:
                self._spend_retry(state, failure)
                if state.delivered:
                    self.num_migrations += 1
                    self._report_retry("migration")

    async def close(self) -> None:
        if self._own_stubs is not None:
            await self._own_stubs.close()

    # ----------------------------------------------------------------- one decode worker
    async def _serve_on(self, decode: WorkerInfo, state: _RequestState) -> AsyncIterator[TokenEvent]:
        """The request's next tokens from one decode worker: a prefill (remote or its own), then its stream."""
        self.inflight[decode.worker_id] += 1
        try:
            handoff = await self._prefill_for(decode, state)
            if handoff is None:
                request = self._generate_request(state, state.delivered, "", state.wants_prompt_logprobs)
                events = self._stream_local(decode, request, state)
            else:
                try:
                    yield handoff.first
                except GeneratorExit:  # the client left before Generate took the reservation over
                    await self._release(decode, handoff.reservation)
                    raise
                if handoff.first.finish_reason:
                    return
                events = self._stream(decode, handoff.request, state)
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    yield event
        finally:
            self.inflight[decode.worker_id] -= 1

    async def _stream_local(
        self, decode: WorkerInfo, request: worker_pb2.GenerateRequest, state: _RequestState
    ) -> AsyncIterator[TokenEvent]:
        """The decode worker prefills the context itself: its prompt tokens count as its prefill load until the
        first token arrives."""
        tokens = self._routing_request(state).uncached_on(decode)
        self.local_prefill_load.start(decode.worker_id, tokens)
        pending = True
        try:
            async with contextlib.aclosing(self._stream(decode, request, state)) as events:
                async for event in events:
                    if pending:
                        pending = False
                        self.local_prefill_load.finish(decode.worker_id, tokens, completed=True)
                    yield event
        finally:
            if pending:
                self.local_prefill_load.finish(decode.worker_id, tokens, completed=False)

    async def _stream(
        self, decode: WorkerInfo, request: worker_pb2.GenerateRequest, state: _RequestState
    ) -> AsyncIterator[TokenEvent]:
        """The Generate stream's tokens; a decode worker that drops out of the registry meanwhile (frozen: its
        stream just stops) is cancelled and fails like a dead one, so the stream migrates. The first chunk carries
        the prompt's logprobs when ``request`` asked for them."""
        call = self._stubs(decode.grpc_address).Generate(request)
        wants_prompt_logprobs = request.sampling.HasField("prompt_logprobs")
        try:
            async with cancel_when_gone(self.watcher, decode.worker_id, call.cancel, self._gone_grace_s) as watch:
                try:
                    async for chunk in call:
                        prompt_logprobs = None
                        if wants_prompt_logprobs:
                            wants_prompt_logprobs = False
                            _check_prompt_logprobs(decode, state, len(chunk.prompt_logprobs))
                            prompt_logprobs = prompt_logprobs_from_proto(chunk.prompt_logprobs)
                        yield TokenEvent(
                            tuple(chunk.token_ids),
                            tuple(logprobs_from_proto(lp) for lp in chunk.logprobs),
                            chunk.finish_reason or None,
                            chunk.stop_reason or None,
                            decode.worker_id,
                            prompt_logprobs,
                        )
                except asyncio.CancelledError:
                    if cancelled_by(watch):
                        raise _WorkerFailed(decode, RuntimeError("left the registry mid-stream")) from None
                    raise
        except grpc.aio.AioRpcError as error:
            raise self._classify(decode, error) from error
        finally:
            call.cancel()  # no-op when finished; aborts the request on the worker when we leave early

    # ----------------------------------------------------------------- remote prefill
    async def _prefill_for(self, decode: WorkerInfo, state: _RequestState) -> _Handoff | None:
        """Place the prefill, then run it remotely if so placed; None when ``decode`` prefills itself. Reports the
        try's final placement (a fallback to the decode worker replaces the decision)."""
        state.placement = self._place(decode, state)
        handoff = await self._prefill_remote(decode, state)
        if handoff is None and not state.placement.local:
            state.placement = self._fallback(state)
        self._report_placement(decode, state)
        return handoff

    async def _prefill_remote(self, decode: WorkerInfo, state: _RequestState) -> _Handoff | None:
        """Reserve on ``decode`` and prefill on a prefill worker; None when ``decode`` should prefill itself.

        A failed KV transfer releases the reservation, spends a retry and starts over with a new reservation.
        """
        while self._prefill_remotely(state):
            reservation = await self._reserve(decode, state)
            if reservation is None:
                state.placement = Placement(True, "decode_full")  # its engine queues the request and prefills it
                return None
            try:
                return await self._prefill_reserved(decode, reservation, state)
            except _TransferFailed as failure:
                self._spend_retry(state, failure)
        return None

    async def _prefill_reserved(
        self, decode: WorkerInfo, reservation: worker_pb2.ReserveReply, state: _RequestState
    ) -> _Handoff | None:
        """Prefill into ``reservation``, which is released unless a Generate is to take it over."""
        try:
            reply = await self._prefill_into(decode, reservation, state)
        except BaseException:  # transfer failed, request invalid, retries spent, or client gone
            await self._release(decode, reservation)
            raise
        if reply is None or reply.finish_reason:
            await self._release(decode, reservation)
        if reply is None:
            return None
        first = TokenEvent(
            (reply.next_token,),
            (logprobs_from_proto(reply.logprobs),) if reply.HasField("logprobs") else (),
            reply.finish_reason or None,
            reply.stop_reason or None,
            decode.worker_id,
            prompt_logprobs_from_proto(reply.prompt_logprobs) if state.wants_prompt_logprobs else None,
        )
        outputs = [*state.delivered, reply.next_token]
        request = self._generate_request(state, outputs, reservation.reservation_id, prompt_logprobs=False)
        return _Handoff(first, request, None if reply.finish_reason else reservation)

    async def _prefill_into(
        self, decode: WorkerInfo, reservation: worker_pb2.ReserveReply, state: _RequestState
    ) -> worker_pb2.PrefillReply | None:
        """Prefill on the best prefill worker, on another after each failure; None when none is left to try."""
        while self._prefill_remotely(state):
            prefill = self._pick_prefill(state)
            if prefill is None:
                return None
            try:
                return await self._prefill_once(prefill, decode, reservation, state)
            except _WorkerFailed as failure:
                self._spend_retry(state, failure)
        return None

    async def _prefill_once(
        self, prefill: WorkerInfo, decode: WorkerInfo, reservation: worker_pb2.ReserveReply, state: _RequestState
    ) -> worker_pb2.PrefillReply:
        """One Prefill RPC; _TransferFailed (DATA_LOSS), _WorkerFailed or InvalidRequestError when it fails."""
        self.inflight[prefill.worker_id] += 1
        tokens = self._routing_request(state).uncached_on(prefill)
        self.prefill_load.start(prefill.worker_id, tokens)
        completed = False
        try:
            reply = await self._watched_prefill(prefill, decode, reservation, state)
            completed = True
            if state.wants_prompt_logprobs:
                _check_prompt_logprobs(prefill, state, len(reply.prompt_logprobs))
            return reply
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DATA_LOSS:
                raise _TransferFailed(f"KV transfer into {decode.worker_id}: {error.details()}") from error
            raise self._classify(prefill, error) from error
        finally:
            self.inflight[prefill.worker_id] -= 1
            self.prefill_load.finish(prefill.worker_id, tokens, completed)

    async def _watched_prefill(
        self, prefill: WorkerInfo, decode: WorkerInfo, reservation: worker_pb2.ReserveReply, state: _RequestState
    ) -> worker_pb2.PrefillReply:
        """The Prefill RPC, renewing the reservation's lease while it runs; cancelled (and failed like a dead
        worker) when the prefill worker drops out of the registry."""
        rpc = asyncio.ensure_future(self._call_prefill(prefill, decode, reservation, state))
        lease_s = self.transfer.reservation_lease_s
        renewals = asyncio.create_task(
            renew_lease_forever(self._stubs(decode.grpc_address), reservation.reservation_id, lease_s, decode.worker_id)
        )
        try:
            async with cancel_when_gone(self.watcher, prefill.worker_id, rpc.cancel, self._gone_grace_s) as watch:
                try:
                    return await rpc
                except asyncio.CancelledError:
                    if cancelled_by(watch):
                        raise _WorkerFailed(prefill, RuntimeError("left the registry mid-prefill")) from None
                    raise
        finally:
            renewals.cancel()

    async def _call_prefill(
        self, prefill: WorkerInfo, decode: WorkerInfo, reservation: worker_pb2.ReserveReply, state: _RequestState
    ) -> worker_pb2.PrefillReply:
        return await self._stubs(prefill.grpc_address).Prefill(self._prefill_request(state, decode, reservation))

    # ----------------------------------------------------------------- messages
    def _generate_request(
        self, state: _RequestState, outputs: list[int], reservation_id: str, prompt_logprobs: bool
    ) -> worker_pb2.GenerateRequest:
        """``prompt_logprobs``: the decode worker computes the prompt's logprobs (it prefills it, none delivered)."""
        return worker_pb2.GenerateRequest(
            request_id=state.request_id,
            prompt_token_ids=state.prompt,
            output_token_ids=outputs,
            sampling=state.wire_params(prompt_logprobs),
            reservation_id=reservation_id,
        )

    def _prefill_request(
        self, state: _RequestState, decode: WorkerInfo, reservation: worker_pb2.ReserveReply
    ) -> worker_pb2.PrefillRequest:
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
            request_id=state.request_id,
            context_token_ids=state.context,
            sampling=state.wire_params(state.wants_prompt_logprobs),
            target=target,
            num_generated=len(state.delivered),
        )

    async def _reserve(self, decode: WorkerInfo, state: _RequestState) -> worker_pb2.ReserveReply | None:
        """A reservation for the request's context, or None when the worker is full right now."""
        request = worker_pb2.ReserveRequest(
            request_id=state.request_id, num_tokens=len(state.context), lease_s=self.transfer.reservation_lease_s
        )
        try:
            return await self._stubs(decode.grpc_address).Reserve(request)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None
            raise self._classify(decode, error) from error

    async def _release(self, decode: WorkerInfo, reservation: worker_pb2.ReserveReply | None) -> None:
        """Free the reservation's blocks; harmless when a Generate already took it over or it expired.

        Shielded: a client gone cancels every await of its request (anyio scopes cancel again at each one),
        and the Release must still reach the worker rather than leave the blocks pinned until the lease ends.
        """
        if reservation is None:
            return
        await asyncio.shield(self._send_release(decode, reservation.reservation_id))

    async def _send_release(self, decode: WorkerInfo, reservation_id: str) -> None:
        request = worker_pb2.ReleaseRequest(reservation_id=reservation_id)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stubs(decode.grpc_address).Release(request, timeout=5)

    # ----------------------------------------------------------------- choosing workers
    def _alive(self, role: str) -> list[WorkerInfo]:
        workers = self.watcher.alive(role=role, model=self.model)
        return [replace(w, running=w.running + self.inflight[w.worker_id]) for w in workers]

    def _routing_request(self, state: _RequestState) -> RoutingRequest:
        num_tokens = len(state.context)
        expected = state.params.max_tokens or 16
        blocks = -(-num_tokens // self.block_size)
        return RoutingRequest(
            prefix_hits=state.prefix_hits,
            model=self.model,
            num_prompt_tokens=num_tokens,
            num_prompt_blocks=blocks,
            num_blocks_needed=-(-(num_tokens + min(expected, 256)) // self.block_size),
            exclude=frozenset(state.failed),
        )

    def max_model_len(self) -> int | None:
        """The longest context an alive decode worker holds (None: no decode worker, or none says)."""
        return max((w.max_model_len for w in self._alive("decode") if w.max_model_len > 0), default=None)

    def _check_context_length(self, num_tokens: int) -> None:
        """A prompt no decode worker can hold is the client's error (400), not a missing worker (503)."""
        limit = self.max_model_len()
        if limit is not None and num_tokens >= limit:
            raise InvalidRequestError(
                f"prompt: {num_tokens} tokens is too long for max_model_len {limit} "
                "(it must leave room for at least one generated token)"
            )

    def _pick_decode(self, state: _RequestState) -> WorkerInfo | None:
        """The best decode worker with room; when all are full, the best one anyway (its engine queues)."""
        workers = self._alive("decode")
        request = self._routing_request(state)
        return self.policy.pick_decode(workers, request) or self.policy.pick_decode(
            workers, replace(request, num_blocks_needed=0)
        )

    def _pick_prefill(self, state: _RequestState) -> WorkerInfo | None:
        return self.policy.pick_prefill(self._alive("prefill"), self._routing_request(state))

    def _prefill_remotely(self, state: _RequestState) -> bool:
        """The placement chose a prefill worker and one is alive, unless this is the last try and a remote prefill
        already failed."""
        if state.placement.local or (state.remote_prefill_failed and state.retries_left == 0):
            return False
        return bool(self._alive("prefill"))

    def _place(self, decode: WorkerInfo, state: _RequestState) -> Placement:
        """This try's placement: the policy's, or the decode worker once remote prefills failed up to the last try."""
        if state.remote_prefill_failed and state.retries_left == 0:
            return Placement(True, "remote_failed")
        return self.policy.place(self._placement_signals(decode, state))

    def _fallback(self, state: _RequestState) -> Placement:
        """Why a remote placement ended on the decode worker: the last try after failures, or no prefill worker."""
        if state.remote_prefill_failed and state.retries_left == 0:
            return Placement(True, "remote_failed")
        return Placement(True, "prefill_unavailable")

    def _placement_signals(self, decode: WorkerInfo, state: _RequestState) -> PlacementSignals:
        """The live signals of both pools for placing this try's prompt (see policy.PlacementSignals)."""
        request = self._routing_request(state)
        prefills = [w for w in self._alive("prefill") if w.worker_id not in state.failed]
        rates = [r for w in prefills if (r := self.prefill_load.tokens_per_s(w.worker_id)) is not None]
        return PlacementSignals(
            prompt_tokens=request.num_prompt_tokens,
            uncached_local=request.uncached_on(decode),
            blocks_needed=request.num_blocks_needed,
            prefill_available=bool(self._alive("prefill")),
            prefill_waits_s=tuple(self.prefill_load.predicted_wait_s(w.worker_id, request.uncached_on(w))
                                  for w in prefills),
            prefill_idle=any(w.load == 0 and self.prefill_load.tokens_in_flight(w.worker_id) == 0 for w in prefills),
            prefill_rate=max(rates, default=None),
            decode=self._decode_load(decode),
        )

    def _decode_load(self, decode: WorkerInfo) -> DecodeLoad:
        """``decode`` as picked (its running count holds this router's requests in flight before this one)."""
        return DecodeLoad(
            running=decode.running,
            free_blocks=decode.free_blocks,
            tpot_ms=decode.tpot_ms,
            local_tokens_in_flight=self.local_prefill_load.tokens_in_flight(decode.worker_id),
            local_rate=self.local_prefill_load.tokens_per_s(decode.worker_id),
        )

    def _report_placement(self, decode: WorkerInfo, state: _RequestState) -> None:
        placement = state.placement
        logger.debug("request %s: prefill %s on %s (%s)", state.request_id, placement.placement,
                     decode.worker_id if placement.local else "a prefill worker", placement.reason)
        if self.on_placement is not None:
            self.on_placement(placement.placement, placement.reason)

    async def _prefix_hits(self, state: _RequestState) -> dict[str, int]:
        """Leading context blocks each worker of both pools holds in its prefix cache (one Redis round trip). None
        count for a try that computes the prompt's logprobs: that prefill skips the prefix cache."""
        workers = self._alive("prefill") + self._alive("decode")
        if self.prefix_lookup is None or not workers or state.wants_prompt_logprobs:
            return {}
        hashes = hash_full_blocks(state.context[: MAX_LOOKUP_BLOCKS * self.block_size], self.block_size)
        return await self.prefix_lookup.matched_blocks([w.worker_id for w in workers], hashes)

    # ----------------------------------------------------------------- failures
    def _spend_retry(self, state: _RequestState, failure: _WorkerFailed | _TransferFailed) -> None:
        """Record ``failure`` and charge it to the request's budget; NoWorkersError when no retry is left."""
        logger.warning("request %s: %s", state.request_id, failure)
        self._record_failure(state, failure)
        if state.retries_left <= 0:
            raise NoWorkersError(
                f"request {state.request_id} failed {self.config.max_retries + 1} times "
                f"(max_retries={self.config.max_retries}); last: {failure}"
            ) from failure
        state.retries_left -= 1
        if state.retries_left == 0 and state.remote_prefill_failed:
            logger.warning(
                "request %s: remote prefill keeps failing; its last try prefills on the decode worker", state.request_id
            )

    def _record_failure(self, state: _RequestState, failure: _WorkerFailed | _TransferFailed) -> None:
        if isinstance(failure, _TransferFailed):
            state.remote_prefill_failed = True
            self._report_retry("kv_transfer_failed")
            return
        worker = failure.worker
        state.failed.add(worker.worker_id)
        state.remote_prefill_failed |= worker.role == "prefill"
        self.watcher.mark_failed(worker.worker_id)
        self.num_retries += 1
        self._report_retry(f"{worker.role}_failed")

    def _no_decode_error(self, state: _RequestState) -> NoWorkersError:
        return NoWorkersError(
            f"no decode worker could serve request {state.request_id} "
            f"(failed: {sorted(state.failed) or 'none'}; alive: {len(self._alive('decode'))})"
        )

    def _report_retry(self, reason: str) -> None:
        if self.on_retry is not None:
            self.on_retry(reason)

    def _classify(self, worker: WorkerInfo, error: grpc.aio.AioRpcError) -> Exception:
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequestError(error.details())
        return _WorkerFailed(worker, RuntimeError(f"{error.code().name}: {error.details()}"))


def _check_prompt_logprobs(worker: WorkerInfo, state: _RequestState, count: int) -> None:
    """A worker asked for the prompt's logprobs sends one per prompt token after the first; else it failed."""
    if count != len(state.prompt) - 1:
        message = f"sent {count} prompt logprobs for a {len(state.prompt)}-token prompt"
        raise _WorkerFailed(worker, RuntimeError(message))
