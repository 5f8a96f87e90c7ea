"""The Orchestrator against in-process fake workers: exact RPC counts for every retry path, one retry budget.

The fakes stand in for the gRPC stubs the orchestrator calls (Reserve, Release, Prefill, Generate); the
registry is a real RegistryWatcher whose snapshot is set by hand (no Redis). The fake "model" makes the
next token a function of the whole context, so a repeated, missing or misplaced token changes the output.
Every test ends by checking that no decode worker still holds a reservation or a running request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import anyio
import grpc
import pytest

from common.config import CoordConfig, RouterConfig, TransferConfig
from common.coord.watcher import RegistryWatcher
from common.coord.worker_info import WorkerInfo
from common.engine.sampling_params import SamplingParams
from proto import worker_pb2
from services.router.orchestrator import InvalidRequestError, NoWorkersError, Orchestrator, TokenEvent
from services.router.prefill_load import PrefillLoad

pytestmark = pytest.mark.timeout(20)

MODEL = "fake-model"
PROMPT = list(range(1, 21))  # 20 tokens: longer than local_prefill_max_tokens, so prefill workers are used
MAX_TOKENS = 8


def next_token(context: list[int]) -> int:
    """The fake model: depends on every token of the context and on its length."""
    return (31 * sum(context) + len(context)) % 1000


def prompt_logprob(context: list[int]) -> float:
    """The fake model's logprob of ``context[-1]`` after the tokens before it."""
    return -((7 * sum(context) + len(context)) % 97) / 10


def worker_prompt_logprobs(prompt: list[int]) -> list[worker_pb2.TokenLogprobs]:
    """What a worker asked for the prompt's logprobs sends: one entry per prompt token after the first."""
    return [worker_pb2.TokenLogprobs(token_id=prompt[i], logprob=prompt_logprob(prompt[: i + 1]), rank=1,
                                     top_token_ids=[prompt[i]], top_logprobs=[prompt_logprob(prompt[: i + 1])])
            for i in range(1, len(prompt))]


def expected_tokens(prompt: list[int], count: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(count):
        tokens.append(next_token(prompt + tokens))
    return tokens


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


# ---------------------------------------------------------------------------------------------- fakes


@dataclass
class FakeReservation:
    num_tokens: int
    deadline: float  # loop time after which the KV is refused, as a real decode worker frees it at its lease's end
    filled: bool = False


class FakeCall:
    """What ``stub.Generate(request)`` returns: an async iterator of chunks; ``cancel()`` aborts it on the worker."""

    def __init__(self, chunks: AsyncIterator[worker_pb2.GenerateChunk], on_cancel: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_cancel = on_cancel
        self.cancelled = False
        self.frozen: asyncio.Future | None = None  # a frozen worker's stream waits on it; cancel() cuts it, as grpc

    def __aiter__(self) -> AsyncIterator[worker_pb2.GenerateChunk]:
        return self._chunks

    def cancel(self) -> bool:
        self.cancelled = True
        self._on_cancel()
        if self.frozen is not None:
            self.frozen.cancel()
        return True


@dataclass
class FakeWorker:
    """One fake worker process: its registry record, its RPC counts and its faults."""

    info: WorkerInfo
    cluster: FakeCluster
    calls: Counter[str] = field(default_factory=Counter)
    dead: bool = False

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.dead:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.info.worker_id} is gone")


@dataclass
class FakeDecode(FakeWorker):
    """Reservations under ids, KV "received" into them, and token streams that continue a context."""

    reservations: dict[str, FakeReservation] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    generate_calls: list[tuple[worker_pb2.GenerateRequest, FakeCall]] = field(default_factory=list)
    reserved: list[str] = field(default_factory=list)  # every reservation id handed out, in order
    released: list[str] = field(default_factory=list)
    full: bool = False
    refuse_transfers: int = 0  # the next N transfers fail in transport
    corrupt_transfers: int = 0  # the next N transfers arrive with a bad checksum
    die_after_chunks: int | None = None  # the process dies after streaming this many chunks
    freeze_after_chunks: int | None = None  # the process stops (SIGSTOP) after streaming this many chunks
    renewed: list[str] = field(default_factory=list)  # reservation ids, one per Renew that found it alive

    async def Reserve(self, request: worker_pb2.ReserveRequest) -> worker_pb2.ReserveReply:  # noqa: N802
        self._call("Reserve")
        if self.full:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free blocks")
        reservation_id = f"{request.request_id}@{self.info.worker_id}#{len(self.reserved)}"
        deadline = asyncio.get_running_loop().time() + request.lease_s
        self.reservations[reservation_id] = FakeReservation(request.num_tokens, deadline)
        self.reserved.append(reservation_id)
        return worker_pb2.ReserveReply(
            reservation_id=reservation_id, block_ids=[1, 2], device="cpu", worker_id=self.info.worker_id
        )

    async def Release(self, request: worker_pb2.ReleaseRequest, timeout: float | None = None):  # noqa: N802
        self._call("Release")
        await asyncio.sleep(0)  # a real RPC suspends: where a pending cancellation would strike
        released = self.reservations.pop(request.reservation_id, None) is not None
        if released:
            self.released.append(request.reservation_id)
        return worker_pb2.ReleaseReply(released=released)

    async def Renew(self, request: worker_pb2.RenewRequest, timeout: float | None = None):  # noqa: N802
        self._call("Renew")
        reservation = self.reservations.get(request.reservation_id)
        if reservation is not None:
            reservation.deadline = asyncio.get_running_loop().time() + request.lease_s
            self.renewed.append(request.reservation_id)
        return worker_pb2.RenewReply(renewed=reservation is not None)

    def receive_kv(self, reservation_id: str, context: list[int]) -> str | None:
        """A transfer into ``reservation_id``: None when it arrived intact, else the sender's error."""
        reservation = self.reservations[reservation_id]  # KeyError: shipped into a released reservation
        if asyncio.get_running_loop().time() > reservation.deadline:
            return f"reservation {reservation_id} expired"
        assert reservation.num_tokens == len(context), "reservation sized for another context"
        if self.refuse_transfers:
            self.refuse_transfers -= 1
            return "connection refused"
        if self.corrupt_transfers:
            self.corrupt_transfers -= 1
            return "checksum mismatch: header 0x1, received 0x2"
        reservation.filled = True
        return None

    def Generate(self, request: worker_pb2.GenerateRequest) -> FakeCall:  # noqa: N802
        call = FakeCall(None, lambda: self.running.discard(request.request_id))  # type: ignore[arg-type]
        call._chunks = self._stream(request, call)
        self.generate_calls.append((request, call))
        return call

    async def _stream(
        self, request: worker_pb2.GenerateRequest, call: FakeCall
    ) -> AsyncIterator[worker_pb2.GenerateChunk]:
        self._call("Generate")
        self._take_reservation(request)
        prompt, outputs = list(request.prompt_token_ids), list(request.output_token_ids)
        self.running.add(request.request_id)
        try:
            for sent in range(request.sampling.max_tokens - len(outputs)):
                if sent == self.die_after_chunks:
                    self.dead = True
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset")
                if sent == self.freeze_after_chunks:
                    call.frozen = asyncio.get_running_loop().create_future()
                    await call.frozen  # never resolves: only the caller's cancel ends it
                outputs.append(next_token(prompt + outputs))
                done = len(outputs) == request.sampling.max_tokens
                chunk = worker_pb2.GenerateChunk(token_ids=[outputs[-1]], finish_reason="length" if done else "")
                if sent == 0 and request.sampling.HasField("prompt_logprobs"):  # as the real worker: first chunk
                    assert not request.reservation_id and not request.output_token_ids, "asked to compute them again"
                    chunk.prompt_logprobs.extend(worker_prompt_logprobs(prompt))
                yield chunk
                await asyncio.sleep(0)
        finally:
            self.running.discard(request.request_id)

    def _take_reservation(self, request: worker_pb2.GenerateRequest) -> None:
        if not request.reservation_id:
            return
        reservation = self.reservations.pop(request.reservation_id)
        assert reservation.filled, "Generate on a reservation whose KV never arrived"
        context = len(request.prompt_token_ids) + len(request.output_token_ids)
        assert reservation.num_tokens == context - 1, "KV must cover all tokens but the last"


@dataclass
class FakePrefill(FakeWorker):
    """Computes the context's next token and ships the KV into the target decode worker's reservation."""

    requests: list[worker_pb2.PrefillRequest] = field(default_factory=list)
    invalid: bool = False
    hold: asyncio.Event | None = None  # when set, Prefill waits for it (to cancel the caller meanwhile)
    cancelled: int = 0
    short_prompt_logprobs: int = 0  # a faulty worker: sends this many prompt logprobs too few

    async def Prefill(self, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillReply:  # noqa: N802
        self._call("Prefill")
        self.requests.append(request)
        if self.invalid:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be >= 0")
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return self._reply(request)

    def _reply(self, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillReply:
        context = list(request.context_token_ids)
        decode = self.cluster.by_address[request.target.address]
        error = decode.receive_kv(request.target.reservation_id, context)
        if error is not None:
            raise rpc_error(grpc.StatusCode.DATA_LOSS, f"kv transfer failed: {error}")
        done = request.num_generated + 1 >= request.sampling.max_tokens
        reply = worker_pb2.PrefillReply(next_token=next_token(context), finish_reason="length" if done else "")
        if request.sampling.HasField("prompt_logprobs"):
            assert request.num_generated == 0, "a migration asked for the prompt's logprobs again"
            reply.prompt_logprobs.extend(worker_prompt_logprobs(context[: len(context) - self.short_prompt_logprobs]))
        return reply


class FakeCluster:
    """Fake workers by address (the orchestrator's stub factory) and a registry snapshot of them."""

    def __init__(self, num_prefill: int, num_decode: int, heartbeat_s: float = 1.0) -> None:
        self.by_address: dict[str, FakeWorker] = {}
        self.prefills = [self._add(FakePrefill, "prefill", i) for i in range(num_prefill)]
        self.decodes = [self._add(FakeDecode, "decode", i) for i in range(num_decode)]
        coord = CoordConfig(heartbeat_s=heartbeat_s)
        self.watcher = RegistryWatcher(None, coord)  # type: ignore[arg-type]  # never touches Redis
        self.watcher.snapshot = {w.info.worker_id: w.info for w in self.by_address.values()}

    def _add(self, kind: type, role: str, index: int):
        # a higher index is busier, so the policy tries workers in index order
        info = WorkerInfo(
            worker_id=f"{role[0]}{index}",
            role=role,
            model=MODEL,
            grpc_address=f"fake:{role}{index}",
            total_blocks=1000,
            free_blocks=1000,
            running=10 * index,
        )
        worker = kind(info=info, cluster=self)
        self.by_address[info.grpc_address] = worker
        return worker

    def stub(self, address: str) -> FakeWorker:
        return self.by_address[address]

    def orchestrator(
        self, max_retries: int = 3, retries: list[str] | None = None, lease_s: float = 30.0
    ) -> Orchestrator:
        config = RouterConfig(local_prefill_max_tokens=4, max_retries=max_retries)
        on_retry = retries.append if retries is not None else None
        transfer = TransferConfig(reservation_lease_s=lease_s)
        return Orchestrator(MODEL, config, transfer, self.watcher, None, on_retry=on_retry, stubs=self.stub)

    def drop_from_registry(self, worker: FakeWorker) -> None:
        """What the registry does to a frozen worker once its key's TTL runs out."""
        self.watcher.snapshot = {k: v for k, v in self.watcher.snapshot.items() if k != worker.info.worker_id}

    def assert_nothing_held(self) -> None:
        for decode in self.decodes:
            assert decode.reservations == {}, f"{decode.info.worker_id} still holds {decode.reservations}"
            assert decode.running == set(), f"{decode.info.worker_id} still runs {decode.running}"


async def collect(
    orchestrator: Orchestrator,
    prompt: list[int] = PROMPT,
    max_tokens: int = MAX_TOKENS,
    events: list[TokenEvent] | None = None,
    prompt_logprobs: int | None = None,
) -> list[TokenEvent]:
    events = [] if events is None else events
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
    async with contextlib.aclosing(orchestrator.generate(prompt, params, "r1")) as stream:
        async for event in stream:
            events.append(event)
    return events


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [token for event in events for token in event.token_ids]


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.asyncio
async def test_remote_prefill_then_decode_stream():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    events = await collect(cluster.orchestrator())
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert events[-1].finish_reason == "length"
    assert prefill.calls == {"Prefill": 1}
    assert decode.calls == {"Reserve": 1, "Generate": 1}
    assert decode.generate_calls[0][0].reservation_id == decode.reserved[0]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_failed_prefill_worker_is_replaced_by_another():
    cluster = FakeCluster(num_prefill=2, num_decode=1)
    (p0, p1), (decode,) = cluster.prefills, cluster.decodes
    p0.dead = True
    retries: list[str] = []
    events = await collect(cluster.orchestrator(retries=retries))
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert (p0.calls["Prefill"], p1.calls["Prefill"]) == (1, 1)
    assert decode.calls == {"Reserve": 1, "Generate": 1}  # the same reservation served the second prefill
    assert retries == ["prefill_failed"]
    assert [w.worker_id for w in cluster.watcher.alive(role="prefill")] == ["p1"]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_failed_transfer_releases_the_reservation_and_prefills_again():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    decode.refuse_transfers = 1
    retries: list[str] = []
    events = await collect(cluster.orchestrator(retries=retries))
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 2}
    assert decode.calls == {"Reserve": 2, "Release": 1, "Generate": 1}
    assert decode.released == decode.reserved[:1]
    assert decode.generate_calls[0][0].reservation_id == decode.reserved[1]
    assert retries == ["kv_transfer_failed"]
    assert cluster.watcher.alive(role="prefill")  # a transfer failure does not blame the prefill worker
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_checksum_mismatch_releases_the_reservation_and_prefills_again():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    decode.corrupt_transfers = 2
    retries: list[str] = []
    events = await collect(cluster.orchestrator(retries=retries))
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 3}
    assert decode.calls == {"Reserve": 3, "Release": 2, "Generate": 1}
    assert decode.released == decode.reserved[:2]
    assert decode.generate_calls[0][0].reservation_id == decode.reserved[2]
    assert retries == ["kv_transfer_failed"] * 2
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_transfers_failing_every_time_end_with_a_prefill_on_the_decode_worker():
    """max_retries=3: three remote prefills (was up to 64), then the last try needs no transfer."""
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    decode.corrupt_transfers = 1000
    events = await collect(cluster.orchestrator(max_retries=3))
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 3}
    assert decode.calls == {"Reserve": 3, "Release": 3, "Generate": 1}
    request = decode.generate_calls[0][0]
    assert (request.reservation_id, list(request.output_token_ids)) == ("", [])
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_decode_death_mid_stream_migrates_without_a_repeated_or_missing_token():
    cluster = FakeCluster(num_prefill=1, num_decode=2)
    (prefill,), (d0, d1) = cluster.prefills, cluster.decodes
    d0.die_after_chunks = 3  # the prefill's token + 3 streamed ones reach the client from d0
    retries: list[str] = []
    orchestrator = cluster.orchestrator(retries=retries)
    events = await collect(orchestrator)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert [e.worker_id for e in events] == ["d0"] * 4 + ["d1"] * (MAX_TOKENS - 4)
    assert prefill.calls == {"Prefill": 2}
    assert (d0.calls, d1.calls) == ({"Reserve": 1, "Generate": 1}, {"Reserve": 1, "Generate": 1})
    delivered = expected_tokens(PROMPT, 4)
    second = prefill.requests[1]
    assert (list(second.context_token_ids), second.num_generated) == (PROMPT + delivered, 4)
    assert list(d1.generate_calls[0][0].output_token_ids) == expected_tokens(PROMPT, 5)
    assert retries == ["decode_failed", "migration"]
    assert orchestrator.num_migrations == 1
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_a_frozen_decode_worker_leaving_the_registry_migrates_its_stream():
    """SIGSTOP: the stream just stops, no error. Once the registry drops the worker (its heartbeats stopped), the
    orchestrator cancels the stream and migrates it like a dead worker's: no repeated or missing token."""
    cluster = FakeCluster(num_prefill=1, num_decode=2, heartbeat_s=0.05)
    d0, d1 = cluster.decodes
    d0.freeze_after_chunks = 3
    retries: list[str] = []
    events: list[TokenEvent] = []
    task = asyncio.create_task(collect(cluster.orchestrator(retries=retries), events=events))
    while not (d0.generate_calls and d0.generate_calls[0][1].frozen):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert not task.done(), "a frozen stream looked finished before the registry dropped its worker"
    cluster.drop_from_registry(d0)
    await asyncio.wait_for(task, timeout=5)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert [e.worker_id for e in events][4:] == ["d1"] * (MAX_TOKENS - 4)  # the prefill's token + 3 streamed
    assert d0.generate_calls[0][1].cancelled  # aborts the request there should it ever wake up
    assert retries == ["decode_failed", "migration"]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_a_worker_missing_only_briefly_keeps_its_stream():
    """A Redis restart empties the registry until the workers' next heartbeats: no stream moves for that."""
    cluster = FakeCluster(num_prefill=1, num_decode=2, heartbeat_s=0.5)
    d0, _ = cluster.decodes
    d0.freeze_after_chunks = 3
    events: list[TokenEvent] = []
    task = asyncio.create_task(collect(cluster.orchestrator(), events=events))
    while not (d0.generate_calls and d0.generate_calls[0][1].frozen):
        await asyncio.sleep(0.01)
    snapshot = cluster.watcher.snapshot
    cluster.watcher.snapshot = {}
    await asyncio.sleep(0.3)  # within the grace of two heartbeats
    cluster.watcher.snapshot = snapshot
    await asyncio.sleep(1.5)
    assert not task.done() and not d0.generate_calls[0][1].cancelled
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_a_frozen_prefill_worker_leaving_the_registry_is_replaced():
    cluster = FakeCluster(num_prefill=2, num_decode=1, heartbeat_s=0.05)
    (p0, p1), (decode,) = cluster.prefills, cluster.decodes
    p0.hold = asyncio.Event()  # never set: p0 is frozen
    retries: list[str] = []
    task = asyncio.create_task(collect(cluster.orchestrator(retries=retries)))
    while not p0.requests:
        await asyncio.sleep(0.01)
    cluster.drop_from_registry(p0)
    events = await asyncio.wait_for(task, timeout=5)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert (p0.cancelled, p1.calls["Prefill"]) == (1, 1)
    assert decode.calls["Reserve"] == 1  # the same reservation waited for the second prefill
    assert retries == ["prefill_failed"]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_a_reservation_is_renewed_while_its_prefill_runs_past_the_lease():
    """A slow or queued prefill on a live prefill worker outlives the lease: renewals keep the reservation, so the
    KV lands in it and the prompt is prefilled once (before: expired, rejected, prefilled again)."""
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    prefill.hold = asyncio.Event()
    retries: list[str] = []
    task = asyncio.create_task(collect(cluster.orchestrator(retries=retries, lease_s=0.3)))
    await asyncio.sleep(1.0)  # three leases
    prefill.hold.set()
    events = await asyncio.wait_for(task, timeout=5)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls["Prefill"] == 1 and retries == []
    assert len(decode.renewed) >= 3 and set(decode.renewed) == {decode.reserved[0]}
    renewals = len(decode.renewed)
    await asyncio.sleep(0.3)
    assert len(decode.renewed) == renewals  # no renewal outlives the prefill
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_no_decode_worker_is_a_503_without_any_rpc():
    cluster = FakeCluster(num_prefill=1, num_decode=0)
    with pytest.raises(NoWorkersError, match="no decode worker"):
        await collect(cluster.orchestrator())
    assert cluster.prefills[0].calls == {}


@pytest.mark.asyncio
async def test_no_prefill_worker_means_the_decode_worker_prefills_itself():
    cluster = FakeCluster(num_prefill=0, num_decode=1)
    (decode,) = cluster.decodes
    events = await collect(cluster.orchestrator())
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert decode.calls == {"Generate": 1}
    assert decode.generate_calls[0][0].reservation_id == ""
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_when_every_prefill_worker_failed_the_decode_worker_prefills_itself():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    prefill.dead = True
    events = await collect(cluster.orchestrator())
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 1}
    assert decode.calls == {"Reserve": 1, "Release": 1, "Generate": 1}
    assert decode.generate_calls[0][0].reservation_id == ""
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_full_decode_worker_prefills_itself_without_spending_a_retry():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    decode.full = True
    retries: list[str] = []
    events = await collect(cluster.orchestrator(max_retries=0, retries=retries))
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert (prefill.calls, decode.calls, retries) == ({}, {"Reserve": 1, "Generate": 1}, [])
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_client_leaving_mid_stream_cancels_generate():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    stream = cluster.orchestrator().generate(PROMPT, params, "r1")
    received = [await anext(stream) for _ in range(3)]  # the prefill's token, then two streamed ones
    assert decode.running == {"r1"}
    await stream.aclose()
    assert tokens_of(received) == expected_tokens(PROMPT, 3)
    assert decode.calls == {"Reserve": 1, "Generate": 1}
    assert decode.generate_calls[0][1].cancelled
    assert prefill.calls == {"Prefill": 1}
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_client_leaving_after_the_first_token_releases_the_reservation():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (decode,) = cluster.decodes
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    stream = cluster.orchestrator().generate(PROMPT, params, "r1")
    first = await anext(stream)  # sampled by the prefill worker; the reservation awaits its Generate
    assert first.token_ids == (next_token(PROMPT),)
    await stream.aclose()
    assert decode.calls == {"Reserve": 1, "Release": 1}
    assert decode.released == decode.reserved
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_client_leaving_during_prefill_cancels_it_and_releases_the_reservation():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    prefill.hold = asyncio.Event()
    task = asyncio.create_task(collect(cluster.orchestrator()))
    while not prefill.calls["Prefill"]:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert prefill.cancelled == 1
    assert decode.calls == {"Reserve": 1, "Release": 1}
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_client_leaving_under_an_anyio_scope_still_releases_the_reservation():
    """Starlette cancels a gone client's stream through an anyio scope, which cancels every later await too."""
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    prefill.hold = asyncio.Event()

    async def leave_during_prefill() -> None:
        while not prefill.calls["Prefill"]:
            await asyncio.sleep(0)
        scope.cancel()

    with anyio.CancelScope() as scope:
        helper = asyncio.ensure_future(leave_during_prefill())
        await collect(cluster.orchestrator())
    await helper
    assert scope.cancelled_caught and prefill.cancelled == 1
    for _ in range(5):  # the shielded Release finishes in its own task
        await asyncio.sleep(0)
    assert decode.calls == {"Reserve": 1, "Release": 1}
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_invalid_request_is_not_retried_and_releases_the_reservation():
    cluster = FakeCluster(num_prefill=2, num_decode=1)
    (p0, p1), (decode,) = cluster.prefills, cluster.decodes
    p0.invalid = True
    with pytest.raises(InvalidRequestError, match="temperature"):
        await collect(cluster.orchestrator())
    assert (p0.calls, p1.calls) == ({"Prefill": 1}, {})
    assert decode.calls == {"Reserve": 1, "Release": 1}
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_decode_deaths_exhaust_the_budget_after_max_retries_plus_one_tries():
    cluster = FakeCluster(num_prefill=1, num_decode=4)
    for decode in cluster.decodes:
        decode.die_after_chunks = 1
    events: list[TokenEvent] = []
    with pytest.raises(NoWorkersError, match="failed 3 times"):
        await collect(cluster.orchestrator(max_retries=2), events=events)
    assert tokens_of(events) == expected_tokens(PROMPT, 6)  # each try: the prefill's token and one chunk
    assert [d.calls["Generate"] for d in cluster.decodes] == [1, 1, 1, 0]
    assert cluster.prefills[0].calls == {"Prefill": 3}
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_one_budget_is_shared_by_prefill_transfer_and_decode_failures():
    cluster = FakeCluster(num_prefill=2, num_decode=2)
    (p0, p1), (d0, d1) = cluster.prefills, cluster.decodes
    p0.dead = True  # failure 1: p1 takes over, same reservation
    d0.refuse_transfers = 1  # failure 2: the last try prefills on d0 itself
    d0.die_after_chunks = 1  # failure 3: over the budget of max_retries=2
    retries: list[str] = []
    events: list[TokenEvent] = []
    with pytest.raises(NoWorkersError, match="decode d0"):
        await collect(cluster.orchestrator(max_retries=2, retries=retries), events=events)
    assert tokens_of(events) == expected_tokens(PROMPT, 1)
    assert (p0.calls, p1.calls) == ({"Prefill": 1}, {"Prefill": 1})
    assert d0.calls == {"Reserve": 1, "Release": 1, "Generate": 1}
    assert d1.calls == {}
    assert retries == ["prefill_failed", "kv_transfer_failed", "decode_failed"]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_automatic_placement_prefills_on_the_decode_worker_when_the_prefill_pool_is_saturated():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    config = RouterConfig(local_prefill_max_tokens=4, auto_prefill_ttft_ms=100, local_prefill_budget_tokens=64)
    orchestrator = Orchestrator(MODEL, config, TransferConfig(), cluster.watcher, None, stubs=cluster.stub)
    assert tokens_of(await collect(orchestrator)) == expected_tokens(PROMPT, MAX_TOKENS)  # rate unknown: remote
    assert prefill.calls == {"Prefill": 1}
    clock = iter([0.0, 1.0, 1.0, *[1.0] * 100])
    load = orchestrator.prefill_load = PrefillLoad(lambda: next(clock))
    load.start("p0", 8192)  # as if the worker had done 8,192 tokens in 1 s and had 1,000 queued
    load.finish("p0", 8192, completed=True)
    load.start("p0", 1000)  # predicted wait for the prompt: (1000 + 20) / 8192 s > 100 ms
    events = await collect(orchestrator)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 1}  # not asked again
    assert decode.generate_calls[-1][0].reservation_id == ""  # the decode worker prefilled it
    assert orchestrator.local_prefill_load.tokens_in_flight("d0") == 0
    load.finish("p0", 1000, completed=False)
    events = await collect(orchestrator)  # the queue drained: remote again
    assert prefill.calls == {"Prefill": 2}
    cluster.assert_nothing_held()


# ---------------------------------------------------------------------------------------------- placement


class FakePrefixLookup:
    """The Redis prefix index: ``hits[worker_id]`` leading blocks cached (capped at the context's full blocks)."""

    def __init__(self, hits: dict[str, int]) -> None:
        self.hits = hits
        self.lookups: list[list[str]] = []  # the worker ids of each round trip

    async def matched_blocks(self, worker_ids: list[str], block_hashes: list[bytes]) -> dict[str, int]:
        self.lookups.append(list(worker_ids))
        return {w: min(self.hits.get(w, 0), len(block_hashes)) for w in worker_ids}


def placing_orchestrator(cluster: FakeCluster, placements: list[tuple[str, str]],
                         lookup: FakePrefixLookup | None = None, **settings: object) -> Orchestrator:
    config = RouterConfig(**{"local_prefill_max_tokens": 4, **settings})
    return Orchestrator(MODEL, config, TransferConfig(), cluster.watcher, lookup, stubs=cluster.stub,
                        on_placement=lambda placement, reason: placements.append((placement, reason)))


def set_live(cluster: FakeCluster, worker_id: str, **live: object) -> None:
    """What the worker's next heartbeat would say."""
    cluster.watcher.snapshot[worker_id] = replace(cluster.watcher.snapshot[worker_id], **live)


def saturate(orchestrator: Orchestrator, queued: int = 1000) -> PrefillLoad:
    """p0 measured at 8,192 tok/s with ``queued`` tokens ahead: the prompt's predicted wait is (queued + 20) / 8192
    s."""
    clock = iter([0.0, 1.0, *[1.0] * 1000])
    load = orchestrator.prefill_load = PrefillLoad(lambda: next(clock))
    load.start("p0", 8192)
    load.finish("p0", 8192, completed=True)
    if queued:
        load.start("p0", queued)
    return load


@pytest.mark.asyncio
async def test_prefix_hits_on_a_decode_worker_steer_the_pick_and_place_the_prefill_there():
    cluster = FakeCluster(num_prefill=1, num_decode=2)
    (prefill,), (d0, d1) = cluster.prefills, cluster.decodes
    placements: list[tuple[str, str]] = []
    prompt = list(range(1, 37))  # 36 tokens: 2 full blocks and 4 tokens
    lookup = FakePrefixLookup({"d1": 2})  # d1 (the busier one) holds both full blocks: 4 tokens left to compute
    events = await collect(placing_orchestrator(cluster, placements, lookup), prompt=prompt)
    assert tokens_of(events) == expected_tokens(prompt, MAX_TOKENS)
    assert {e.worker_id for e in events} == {"d1"}
    assert (prefill.calls, d0.calls, d1.calls) == ({}, {}, {"Generate": 1})
    assert d1.generate_calls[0][0].reservation_id == ""
    assert placements == [("local", "decode_cache_hit")]
    assert lookup.lookups == [["p0", "d0", "d1"]]  # both pools in one round trip
    lookup.hits = {}  # without the hit: the idler d0, and a prefill worker
    events = await collect(placing_orchestrator(cluster, placements, lookup), prompt=prompt)
    assert {e.worker_id for e in events} == {"d0"}
    assert (prefill.calls, placements[-1]) == ({"Prefill": 1}, ("remote", "prefill_pool"))
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_saturated_prefill_pool_places_locally_on_a_decode_worker_within_its_tpot_budget():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    # 20 tokens at the pool's 8,192 tok/s over 256 tokens: +0.0095 ms on 19.99 ms <= 20 ms
    set_live(cluster, "d0", running=4, tpot_ms=19.99)
    placements: list[tuple[str, str]] = []
    orchestrator = placing_orchestrator(cluster, placements, auto_prefill_ttft_ms=100, slo_tpot_ms=20)
    saturate(orchestrator)  # (1000 + 20) / 8192 s > 100 ms
    events = await collect(orchestrator)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert (prefill.calls, decode.calls) == ({}, {"Generate": 1})
    assert decode.generate_calls[0][0].reservation_id == ""
    assert placements == [("local", "prefill_saturated")]
    assert orchestrator.local_prefill_load.tokens_in_flight("d0") == 0
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_saturated_prefill_pool_queues_on_the_prefill_worker_when_the_decode_worker_is_over_budget():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    set_live(cluster, "d0", running=4, tpot_ms=19.995)  # + 0.0095 ms > 20 ms
    placements: list[tuple[str, str]] = []
    orchestrator = placing_orchestrator(cluster, placements, auto_prefill_ttft_ms=100, slo_tpot_ms=20)
    load = saturate(orchestrator)
    events = await collect(orchestrator)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert (prefill.calls, decode.calls) == ({"Prefill": 1}, {"Reserve": 1, "Generate": 1})
    assert placements == [("remote", "decode_over_tpot")]
    assert load.tokens_in_flight("p0") == 1000  # queued behind the 1,000 tokens, and answered
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_idle_prefill_pool_keeps_long_prompts_even_from_an_idle_decode_worker():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    placements: list[tuple[str, str]] = []
    orchestrator = placing_orchestrator(cluster, placements, auto_prefill_ttft_ms=100, slo_tpot_ms=20)
    saturate(orchestrator, queued=0)  # 20 / 8192 s: well under 100 ms
    events = await collect(orchestrator)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert (prefill.calls, decode.calls) == ({"Prefill": 1}, {"Reserve": 1, "Generate": 1})
    assert placements == [("remote", "prefill_pool")]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_busy_decode_worker_sends_a_prompt_it_caches_to_the_idle_prefill_pool():
    cluster = FakeCluster(num_prefill=1, num_decode=1)
    (prefill,), (decode,) = cluster.prefills, cluster.decodes
    set_live(cluster, "d0", running=4, tpot_ms=25.0)
    placements: list[tuple[str, str]] = []
    orchestrator = placing_orchestrator(cluster, placements, FakePrefixLookup({"d0": 1}), slo_tpot_ms=20)
    assert tokens_of(await collect(orchestrator)) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 1}
    set_live(cluster, "p0", running=1)  # the prefill worker is busy now: the decode worker's cache wins
    assert tokens_of(await collect(orchestrator)) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prefill.calls == {"Prefill": 1}
    assert decode.generate_calls[-1][0].reservation_id == ""
    assert placements == [("remote", "decode_busy"), ("local", "decode_cache_hit")]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_each_try_reports_its_final_placement_fallbacks_included():
    cluster = FakeCluster(num_prefill=1, num_decode=2)
    (prefill,), (d0, _) = cluster.prefills, cluster.decodes
    placements: list[tuple[str, str]] = []
    d0.full = True
    await collect(placing_orchestrator(cluster, placements))
    d0.full, d0.corrupt_transfers = False, 1000
    await collect(placing_orchestrator(cluster, placements, max_retries=1))
    d0.corrupt_transfers, d0.die_after_chunks = 0, 2
    await collect(placing_orchestrator(cluster, placements))  # d0 dies: the migration is a second try on d1
    assert await collect(placing_orchestrator(cluster, placements), prompt=[1, 2, 3])  # 3 tokens: d1 itself
    prefill.dead = True
    await collect(placing_orchestrator(cluster, placements))  # p0 fails: d1 prefills, p0 leaves the snapshot
    await collect(placing_orchestrator(cluster, placements))
    assert placements == [
        ("local", "decode_full"),
        ("local", "remote_failed"),
        ("remote", "prefill_pool"), ("remote", "prefill_pool"),
        ("local", "short_prompt"),
        ("local", "prefill_unavailable"),
        ("local", "no_prefill_worker"),
    ]
    cluster.assert_nothing_held()


# ---------------------------------------------------------------------------------------------- prompt logprobs
def expected_prompt_logprobs(prompt: list[int]) -> list[dict | None]:
    return [None] + [{prompt[i]: pytest.approx(prompt_logprob(prompt[: i + 1]), abs=1e-6)}
                     for i in range(1, len(prompt))]


def prompt_logprob_values(event: TokenEvent) -> list[dict | None]:
    return [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in event.prompt_logprobs]


@pytest.mark.asyncio
@pytest.mark.parametrize("num_prefill", [1, 0])  # computed by the prefill worker / by the decode worker itself
async def test_prompt_logprobs_come_with_the_first_event_from_whichever_worker_prefilled(num_prefill):
    cluster = FakeCluster(num_prefill=num_prefill, num_decode=1)
    (decode,) = cluster.decodes
    events = await collect(cluster.orchestrator(), prompt_logprobs=1)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert prompt_logprob_values(events[0]) == expected_prompt_logprobs(PROMPT)
    assert all(event.prompt_logprobs is None for event in events[1:])
    generate = decode.generate_calls[0][0]
    assert generate.sampling.HasField("prompt_logprobs") == (num_prefill == 0)  # never asked of imported KV
    if num_prefill:
        assert cluster.prefills[0].requests[0].sampling.prompt_logprobs == 1
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_a_migrated_stream_neither_recomputes_nor_repeats_the_prompt_logprobs():
    cluster = FakeCluster(num_prefill=1, num_decode=2)
    (prefill,), (d0, d1) = cluster.prefills, cluster.decodes
    d0.die_after_chunks = 3
    events = await collect(cluster.orchestrator(), prompt_logprobs=2)
    assert tokens_of(events) == expected_tokens(PROMPT, MAX_TOKENS)
    assert [event.prompt_logprobs is not None for event in events] == [True] + [False] * (len(events) - 1)
    assert prompt_logprob_values(events[0]) == expected_prompt_logprobs(PROMPT)
    assert [r.sampling.HasField("prompt_logprobs") for r in prefill.requests] == [True, False]
    assert not d1.generate_calls[0][0].sampling.HasField("prompt_logprobs")
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_a_worker_sending_too_few_prompt_logprobs_has_failed_the_request():
    cluster = FakeCluster(num_prefill=2, num_decode=1)
    (p0, p1), _ = cluster.prefills, cluster.decodes
    p0.short_prompt_logprobs = 1
    retries: list[str] = []
    events = await collect(cluster.orchestrator(retries=retries), prompt_logprobs=0)
    assert prompt_logprob_values(events[0]) == expected_prompt_logprobs(PROMPT)
    assert (p0.calls["Prefill"], p1.calls["Prefill"]) == (1, 1) and retries == ["prefill_failed"]
    cluster.assert_nothing_held()


@pytest.mark.asyncio
async def test_prefix_hits_do_not_place_a_prompt_whose_logprobs_skip_the_cache():
    cluster = FakeCluster(num_prefill=1, num_decode=2)
    (prefill,), (_, d1) = cluster.prefills, cluster.decodes
    placements: list[tuple[str, str]] = []
    prompt = list(range(1, 37))
    lookup = FakePrefixLookup({"d1": 2})  # would place it on d1 (see the test above), which must recompute it all
    events = await collect(placing_orchestrator(cluster, placements, lookup), prompt=prompt, prompt_logprobs=0)
    assert prompt_logprob_values(events[0]) == expected_prompt_logprobs(prompt)
    assert {e.worker_id for e in events} == {"d0"} and d1.calls == {}
    assert (prefill.calls, placements) == ({"Prefill": 1}, [("remote", "prefill_pool")])
    assert lookup.lookups == []
    cluster.assert_nothing_held()
