"""The router's request path: /v1/chat/completions, /v1/completions, /v1/models and the plain ``POST /generate``.

Every generating request, whatever its endpoint: authenticate -> parse and validate -> rate limit -> admission
slot -> one orchestrator stream per choice (n choices per prompt) -> JSON or SSE, with the router metrics
labelled by endpoint. Only parsing and the response shape differ per endpoint (OpenAI's, or /generate's own).
Errors use the OpenAI envelope and never carry a traceback. A client that disconnects (while queued or
mid-stream) cancels its streams, which aborts the request on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from common.config import RouterConfig
from common.engine.outputs import Logprob
from common.engine.sampling_params import SamplingParams
from common.metrics import RouterMetrics
from services.router import protocol
from services.router.admission import AdmissionError, AdmissionQueue, ApiKeys, RateLimiter
from services.router.orchestrator import InvalidRequestError, NoWorkersError, Orchestrator, TokenEvent
from services.router.streams import merge_streams, until_disconnected
from services.router.text import TextAssembler
from services.router.tool_calls import ToolCallConfig, ToolPlan, constrained_params, plan_tools, render_chat
from services.router.tool_parsers import ToolCallStream

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = RouterConfig().max_request_body
FALLBACK_MAX_CHARS_PER_TOKEN = 128  # a tokenizer without a vocabulary to measure (test fakes)


def max_chars_per_token(tokenizer: object) -> int:
    """An upper bound on the characters of text one token stands for: twice the longest vocabulary entry (a
    byte-level or SentencePiece entry is at least as long as the text it decodes to; twice for normalizers that
    compose characters, such as NFC's 'e' + U+0301 -> 'é')."""
    vocab = getattr(tokenizer, "get_vocab", None)
    longest = max(map(len, vocab()), default=0) if vocab is not None else 0
    return 2 * longest if longest else FALLBACK_MAX_CHARS_PER_TOKEN


def _no_context_limit() -> int | None:
    return None


class BodyTooLarge(protocol.ProtocolError):
    """A body past the router's limit (413). ``close``: the body was still streaming in, with no end in sight, so
    the connection is closed rather than drained."""

    def __init__(self, limit: int, close: bool) -> None:
        super().__init__(f"The request body is larger than this router's limit of {limit} bytes "
                         "(--max-request-body).", status=413, code="request_too_large")
        self.close = close


@dataclass
class Gateway:
    """What the OpenAI handlers share; built once at startup and passed explicitly."""

    model_id: str
    tokenizer: object
    orchestrator: Orchestrator
    keys: ApiKeys
    limiter: RateLimiter | None
    queue: AdmissionQueue
    metrics: RouterMetrics
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's; responses carry their own
    tool_calls: ToolCallConfig = field(default_factory=ToolCallConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    context_limit: Callable[[], int | None] = _no_context_limit  # the longest context a decode worker holds now
    max_chars_per_token: int = 0  # 0: measured from the tokenizer's vocabulary (``max_chars_per_token``)

    def __post_init__(self) -> None:
        if not self.max_chars_per_token:
            self.max_chars_per_token = max_chars_per_token(self.tokenizer)


@dataclass
class Job:
    """One HTTP request after validation: its prompts (token ids), params and bookkeeping."""

    endpoint: str  # "chat" | "completion" | "generate" (also the metrics' endpoint label)
    response_id: str
    request_id: str
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    echo_only: bool = False  # echo with max_tokens 0: the sampled token is dropped, the prompt is the answer
    num_logprobs: int | None = None
    tools: ToolPlan | None = None  # chat only: how the answer's tool calls are read
    arrival: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))  # the responses' ``created`` (Unix seconds)
    queue_wait: float = 0.0  # seconds waiting for an admission slot (backpressure, not overhead)
    dispatched: float | None = None  # choice streams created: the worker RPCs start now

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass
class ChoiceState:
    """One choice as it streams: its text, tokens and logprobs so far."""

    index: int
    prompt_index: int
    text: TextAssembler
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[protocol.TokenLogprob] = field(default_factory=list)  # with echo: the prompt's first
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # vLLM's, decoded; only when asked for
    full_text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    tool_calls: ToolCallStream | None = None  # the chat message's content and calls when the request has tools

    @property
    def chat_finish_reason(self) -> str | None:
        """``finish_reason``, except "tool_calls" when the message ended (not cut by length) with calls of an auto or
        required tool choice (a named choice stays "stop", as OpenAI reports it)."""
        if self.finish_reason == "stop" and self.tool_calls is not None and self.tool_calls.finishes_with_tool_calls:
            return "tool_calls"
        return self.finish_reason


# ---------------------------------------------------------------------------------------------- entry points
async def chat_completions(gateway: Gateway, request: Request) -> Response:
    return await _handle(gateway, request, "chat")


async def completions(gateway: Gateway, request: Request) -> Response:
    return await _handle(gateway, request, "completion")


async def generate(gateway: Gateway, request: Request) -> Response:
    """``POST /generate``: the same path as /v1, with /generate's own body (``protocol.GenerateBody``) and answer."""
    return await _handle(gateway, request, "generate")


def list_models(gateway: Gateway) -> dict:
    return protocol.models_list([gateway.model_id], gateway.created)


async def _handle(gateway: Gateway, request: Request, endpoint: str) -> Response:
    client_id = request.headers.get("x-request-id")
    request_id = client_id or _new_request_id(endpoint)
    headers = {"X-Request-Id": request_id}
    gateway.metrics.count_request(endpoint)
    try:
        body = await _read_body(request, gateway.max_body_bytes)
    except BodyTooLarge as error:
        return _error_response(gateway, error, headers)
    except ClientDisconnect:  # the client left before sending its whole body: its abort, not our error
        gateway.metrics.finish_request("abort", None, None)
        return Response(status_code=499, headers=headers)
    try:
        key_id = gateway.keys.check(request.headers.get("authorization"))
        job = await asyncio.to_thread(_build_job, gateway, endpoint, body, request_id, client_id)  # loop keeps serving
        if gateway.limiter is not None:
            await gateway.limiter.acquire(key_id, sum(map(len, job.prompts)) + (job.params.max_tokens or 0))
    except (protocol.ProtocolError, AdmissionError) as error:
        return _error_response(gateway, error, headers)
    gateway.metrics.prompt_tokens.inc(sum(map(len, job.prompts)))
    output = GenerateOutput(job) if endpoint == "generate" else OpenAIOutput(gateway, job)
    if job.stream:
        return await _stream_response(gateway, request, job, output, headers)
    result = await until_disconnected(request.is_disconnected, _complete(gateway, job, output))
    if result is None:  # client gone: its streams were cancelled and aborted on the workers
        return Response(status_code=499, headers=headers)
    return result if isinstance(result, Response) else JSONResponse(result, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (BodyTooLarge) once it passes ``limit`` bytes: at once when Content-Length says so, else as
    soon as the streamed bytes do, so an oversized body is never held whole. ClientDisconnect if the client leaves."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit, close=False)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit, close=True)
    return bytes(body)


def _new_request_id(endpoint: str) -> str:
    return f"gen-{uuid.uuid4().hex[:16]}" if endpoint == "generate" else uuid.uuid4().hex


def _build_job(gateway: Gateway, endpoint: str, body: bytes, request_id: str, client_id: str | None = None) -> Job:
    if endpoint == "generate":
        return _generate_job(gateway, body, request_id)
    parsed = protocol.parse_chat(body) if endpoint == "chat" else protocol.parse_completion(body)
    if parsed.model != gateway.model_id:
        raise protocol.model_not_found(parsed.model)
    params = parsed.sampling_params()
    _check_vocab(gateway, params)
    tools = None
    if endpoint == "chat":
        tools = plan_tools(parsed, gateway.tool_calls)
        params = constrained_params(params, tools)
        _check_text_fits(gateway, sum(len(message.text) for message in parsed.messages), "messages")
        texts = [render_chat(gateway.tokenizer, parsed, tools, gateway.tool_calls.call_format)]
        prompts = [gateway.tokenizer.encode(texts[0], add_special_tokens=False)]
        num_logprobs = (parsed.top_logprobs or 0) if parsed.logprobs else None
        echo = False
        max_name = "max_completion_tokens" if parsed.max_completion_tokens is not None else "max_tokens"
        _check_context(gateway, prompts, "messages", parsed.requested_max_tokens, max_name)
    else:
        prompts, texts = _completion_prompts(gateway, parsed)
        num_logprobs = parsed.logprobs
        echo = parsed.echo
        _check_context(gateway, prompts, "prompt", _explicit_max_tokens(parsed), "max_tokens")
    response_id = protocol.new_id(endpoint, client_id or parsed.request_id)  # as vLLM: X-Request-Id wins
    return Job(endpoint=endpoint, response_id=response_id, request_id=request_id,
               model=gateway.model_id, prompts=prompts, prompt_texts=texts, params=params, stream=parsed.stream,
               include_usage=parsed.include_usage, echo=echo, num_logprobs=num_logprobs, tools=tools,
               echo_only=endpoint == "completion" and parsed.echo_only)


def _generate_job(gateway: Gateway, body: bytes, request_id: str) -> Job:
    parsed = protocol.parse_generate(body)
    params = parsed.sampling_params()
    _check_vocab(gateway, params)
    prompt = _generate_prompt(gateway, parsed)
    _check_context(gateway, [prompt], "prompt", _explicit_max_tokens(parsed), "max_tokens")
    return Job(endpoint="generate", response_id=request_id, request_id=request_id, model=gateway.model_id,
               prompts=[prompt], prompt_texts=[parsed.prompt or ""], params=params, stream=parsed.stream,
               include_usage=False)


def _generate_prompt(gateway: Gateway, parsed: protocol.GenerateBody) -> list[int]:
    """/generate's prompt as token ids: ``prompt_token_ids`` as given, else ``prompt`` tokenized."""
    if parsed.prompt_token_ids is not None:
        _check_prompt_fits(gateway, len(parsed.prompt_token_ids), "prompt_token_ids")
        ids = list(parsed.prompt_token_ids)
    elif parsed.prompt is not None:
        _check_text_fits(gateway, len(parsed.prompt), "prompt")
        ids = gateway.tokenizer.encode(parsed.prompt)
    else:
        raise protocol.ProtocolError("prompt: give prompt or prompt_token_ids", param="prompt")
    if not ids:
        raise protocol.ProtocolError("prompt: the prompt is empty", param="prompt")
    vocab = len(gateway.tokenizer)
    if any(not 0 <= token < vocab for token in ids):
        raise protocol.ProtocolError(f"prompt_token_ids: token ids must be in [0, {vocab})", param="prompt_token_ids")
    return ids


def _completion_prompts(gateway: Gateway, parsed: protocol.CompletionRequest) -> tuple[list[list[int]], list[str]]:
    prompts, texts = [], []
    vocab = len(gateway.tokenizer)
    for prompt in protocol.prompts_of(parsed):
        if isinstance(prompt, str):
            _check_text_fits(gateway, len(prompt), "prompt")
            prompts.append(gateway.tokenizer.encode(prompt))
            texts.append(prompt)
        else:
            _check_prompt_fits(gateway, len(prompt), "prompt")
            if any(t < 0 or t >= vocab for t in prompt):
                raise protocol.ProtocolError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
            prompts.append(list(prompt))
            texts.append(gateway.tokenizer.decode(prompt))
    return prompts, texts


def _check_text_fits(gateway: Gateway, chars: int, param: str) -> None:
    """Refuse, before tokenizing it, text longer than any prompt a decode worker holds: no token stands for more
    than ``gateway.max_chars_per_token`` characters, so this many characters are at least max_model_len tokens."""
    limit = gateway.context_limit()
    if limit is not None and chars >= limit * gateway.max_chars_per_token:
        raise protocol.text_too_long_error(limit, chars, param)


def _check_prompt_fits(gateway: Gateway, num_tokens: int, param: str) -> None:
    """A prompt must leave room for one generated token in the longest context a decode worker holds."""
    limit = gateway.context_limit()
    if limit is not None and num_tokens >= limit:
        raise protocol.context_length_error(limit, num_tokens, param)


def _explicit_max_tokens(parsed: protocol.CompletionRequest | protocol.GenerateBody) -> int | None:
    """``max_tokens`` when the client gave it (not the endpoint's default)."""
    return parsed.max_tokens if "max_tokens" in parsed.model_fields_set else None


def _check_context(gateway: Gateway, prompts: list[list[int]], prompt_param: str, max_tokens: int | None,
                   max_tokens_param: str) -> None:
    """Each prompt leaves room for one generated token, and for ``max_tokens`` when the client asked for that many:
    an explicit limit past the context is a 400, as vLLM and OpenAI answer, never silently cut."""
    limit = gateway.context_limit()
    if limit is None:
        return
    for prompt in prompts:
        if len(prompt) >= limit:
            raise protocol.context_length_error(limit, len(prompt), prompt_param)
        if max_tokens is not None and len(prompt) + max_tokens > limit:
            raise protocol.completion_too_long_error(limit, len(prompt), max_tokens, prompt_param, max_tokens_param)


def _check_vocab(gateway: Gateway, params: SamplingParams) -> None:
    """logit_bias and stop_token_ids name tokens of the vocabulary; the 400 names the field that does not."""
    vocab = len(gateway.tokenizer)
    for param, token_ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
        outside = next((token for token in token_ids if token >= vocab), None)
        if outside is not None:
            raise protocol.ProtocolError(f"{param}: token id {outside} is out of vocabulary (size {vocab})",
                                         param=param)


# ---------------------------------------------------------------------------------------------- running choices
def _choice_streams(gateway: Gateway, job: Job) -> tuple[list[ChoiceState], list[AsyncIterator[TokenEvent]]]:
    states, streams = [], []
    for prompt_index, prompt in enumerate(job.prompts):
        for sample in range(job.params.n):
            index = prompt_index * job.params.n + sample
            params = job.params.replace(n=1, seed=None if job.params.seed is None else job.params.seed + sample)
            tool_calls = job.tools.stream() if job.tools is not None else None
            states.append(ChoiceState(index, prompt_index, TextAssembler(gateway.tokenizer, prompt, params),
                                      tool_calls=tool_calls))
            streams.append(gateway.orchestrator.generate(prompt, params, f"{job.request_id}-{index}"))
    return states, streams


async def _admitted_events(gateway: Gateway, job: Job) -> AsyncIterator[tuple[ChoiceState, TokenEvent]]:
    """Hold an admission slot while the choices stream; yield (choice, event) as tokens arrive."""
    waited = time.perf_counter()
    async with gateway.queue.slot():
        job.queue_wait = time.perf_counter() - waited
        gateway.metrics.queue_time.observe(job.queue_wait)
        states, streams = _choice_streams(gateway, job)
        job.dispatched = time.perf_counter()
        gateway.metrics.running.inc()
        try:
            if len(streams) == 1:  # the common case: no merge task, one less event-loop hop per token
                async with contextlib.aclosing(streams[0]) as stream:  # closing it cancels the worker RPCs
                    async for event in stream:
                        yield states[0], event
            else:
                async for index, event in merge_streams(streams):
                    yield states[index], event
        finally:
            gateway.metrics.running.dec()


def _apply(gateway: Gateway, job: Job, state: ChoiceState, event: TokenEvent) -> tuple[str, list]:
    """Fold one event into its choice; return the new text and logprob entries to send (with echo, the first
    event's entries start with the prompt's)."""
    finished = event.finish_reason is not None
    token_ids, logprobs = ((), ()) if job.echo_only else (event.token_ids, event.logprobs)
    text = state.text.add(token_ids, finished)
    state.token_ids.extend(token_ids)
    state.full_text += text
    decode = _token_text(gateway)
    entries = []
    if event.prompt_logprobs is not None:
        state.prompt_logprobs = _decoded_prompt_logprobs(event.prompt_logprobs, decode)
        if job.echo and job.num_logprobs is not None:
            prompt = job.prompts[state.prompt_index]
            entries = [protocol.token_logprob(t, lp, decode, job.num_logprobs)
                       for t, lp in zip(prompt, state.prompt_logprobs, strict=True)]
    if job.num_logprobs is not None:
        entries += [protocol.token_logprob(t, lp, decode, job.num_logprobs)
                    for t, lp in zip(token_ids, logprobs, strict=False)]
        state.logprobs.extend(entries)
    if finished:
        state.finish_reason = "length" if job.echo_only or event.finish_reason == "length" else "stop"
        state.stop_reason = None if job.echo_only else _stop_reason(job.params, event.stop_reason)
    return text, entries


def _decoded_prompt_logprobs(
    entries: Sequence[dict[int, Logprob] | None], decode: Callable[[int], str]
) -> list[dict[int, Logprob] | None]:
    """The wire's prompt logprobs with each entry's ``decoded_token`` filled (as vLLM fills it)."""
    return [None if entry is None else {token_id: Logprob(lp.logprob, lp.rank, decode(token_id))
                                        for token_id, lp in entry.items()}
            for entry in entries]


def _stop_reason(params: SamplingParams, reason: str | None) -> str | int | None:
    """The wire's text back into vLLM's ``stop_reason``: a stop string as is, a stop token id as an int."""
    if reason is None or reason in (params.stop or ()):
        return reason
    try:
        token = int(reason)
    except ValueError:
        return reason
    return token if token in params.stop_token_ids else reason


def _token_text(gateway: Gateway) -> Callable[[int], str]:
    """Each token's own text, decoded once per event (a prompt's logprobs repeat the same alternatives often)."""
    texts: dict[int, str] = {}

    def decode(token_id: int) -> str:
        text = texts.get(token_id)
        if text is None:
            text = texts[token_id] = gateway.tokenizer.decode([token_id])
        return text

    return decode


class _Timing:
    """Router-side latency metrics for one request (the client's view)."""

    def __init__(self, gateway: Gateway, job: Job) -> None:
        self.metrics, self.start, self.job = gateway.metrics, job.arrival, job
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.finish_reason = "stop"  # what a normal end reports: "length" once any choice hit its limit

    def on_event(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        elif self.last is not None and event.token_ids:
            self.metrics.itl.observe((now - self.last) / len(event.token_ids))
        self.last = now
        self.tokens += len(event.token_ids)
        if event.finish_reason == "length":
            self.finish_reason = "length"

    def first_sent(self) -> None:
        """The first token's bytes are written: record what the router itself added to this TTFT."""
        job = self.job
        if self.first is None or job.dispatched is None:
            return
        before = job.dispatched - job.arrival - job.queue_wait  # parse, tokenize, rate limit, route
        after = time.perf_counter() - self.first  # first event -> detokenize -> SSE bytes handed to the server
        self.metrics.router_overhead.observe(max(0.0, before) + after)

    def finish(self, reason: str) -> None:
        """``reason``: stop | length for a normal end (latencies and goodput count), abort (client gone), error."""
        now = time.perf_counter()
        metrics = self.metrics
        metrics.generation_tokens.inc(self.tokens)
        tpot = None
        if reason in ("stop", "length"):
            metrics.e2e.observe(now - self.start)
            metrics.observe_request_tokens(_prompt_tokens(self.job), self.tokens)
            if self.first is not None and self.tokens > 1:
                tpot = (now - self.first) / (self.tokens - 1)
                metrics.tpot.observe(tpot)
        metrics.finish_request(reason, None if self.first is None else self.first - self.start, tpot)


# ---------------------------------------------------------------------------------------------- non-streaming
async def _complete(gateway: Gateway, job: Job, output: Output) -> dict | Response:
    timing = _Timing(gateway, job)
    reason = "abort"  # unless set below: the client left and this task was cancelled
    try:
        states = None
        async for state, event in _admitted_events(gateway, job):
            timing.on_event(event)
            output.fold(state, event)
            states = states or {}
            states[state.index] = state
        reason = timing.finish_reason
    except (AdmissionError, NoWorkersError, InvalidRequestError) as error:
        reason = "error"
        return _error_response(gateway, error, {"X-Request-Id": job.request_id})
    except Exception:
        reason = "error"
        raise
    finally:
        timing.finish(reason)
    ordered = [states[i] for i in sorted(states)]
    return output.final(ordered)


def _final_body(gateway: Gateway, job: Job, states: Sequence[ChoiceState]) -> dict:
    choices = []
    for state in states:
        text = job.prompt_texts[state.prompt_index] + state.full_text if job.echo else state.full_text
        logprobs = tuple(state.logprobs) if job.num_logprobs is not None else None
        calls = ()
        if state.tool_calls is not None:
            text, calls = state.tool_calls.content, tuple(state.tool_calls.calls)
        choices.append(protocol.ChoiceResult(state.index, text, state.chat_finish_reason or "stop",
                                             tuple(state.token_ids), logprobs, calls, state.stop_reason,
                                             state.prompt_logprobs))
    usage = protocol.usage(_prompt_tokens(job), sum(len(s.token_ids) for s in states))
    build = protocol.chat_completion if job.endpoint == "chat" else protocol.completion
    return build(job.response_id, job.model, job.created, choices, usage)


def _prompt_tokens(job: Job) -> int:
    """As OpenAI counts: each prompt once, however many choices it has."""
    return sum(len(p) for p in job.prompts)


# ---------------------------------------------------------------------------------------------- streaming
async def _stream_response(gateway: Gateway, request: Request, job: Job, output: Output, headers: dict) -> Response:
    """Wait for the first event before answering, so errors that happen before any token get real statuses."""
    events = _admitted_events(gateway, job)
    timing = _Timing(gateway, job)
    try:
        first = await until_disconnected(request.is_disconnected, anext(events))
    except (AdmissionError, NoWorkersError, InvalidRequestError) as error:
        await events.aclose()
        timing.finish("error")
        return _error_response(gateway, error, headers)
    except StopAsyncIteration:
        first = None
    if first is None:
        await events.aclose()
        timing.finish("abort")
        return Response(status_code=499, headers=headers)
    body = _sse_body(gateway, job, output, first, events, timing)
    return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


async def _sse_body(
    gateway: Gateway, job: Job, chunks: Output, first, events, timing: _Timing
) -> AsyncIterator[bytes]:
    reason = "abort"  # unless set below: the client left mid-stream
    try:
        for index in range(job.num_choices):
            yield chunks.opening(index)
        state, event = first
        timing.on_event(event)
        yield chunks.delta(state, event)
        timing.first_sent()
        async for state, event in events:
            timing.on_event(event)
            yield chunks.delta(state, event)
        yield chunks.closing(timing.tokens)
        reason = timing.finish_reason
    except (NoWorkersError, InvalidRequestError, AdmissionError) as error:
        reason = "error"
        status, body = error_status_and_body(error)
        gateway.metrics.count_error(status)
        yield protocol.sse(body)
    except Exception:  # noqa: BLE001 - the stream already started: report it as an event, never a traceback
        reason = "error"
        gateway.metrics.count_error(500)
        logger.exception("request %s failed mid-stream", job.request_id)
        yield protocol.sse(protocol.error_for_status(500))
    finally:
        await events.aclose()
        timing.finish(reason)
    yield protocol.DONE


class Output(Protocol):
    """One endpoint's response shape: SSE chunks for a streamed request, one body for a whole one."""

    def opening(self, index: int) -> bytes:
        """Sent for each choice before its first token (may be empty)."""

    def delta(self, state: ChoiceState, event: TokenEvent) -> bytes:
        """Fold `event` into its choice and return the chunk to send (may be empty)."""

    def closing(self, num_tokens: int) -> bytes:
        """Sent after the last token, before ``[DONE]`` (may be empty)."""

    def fold(self, state: ChoiceState, event: TokenEvent) -> None:
        """Fold `event` into its choice for a whole (non-streamed) answer."""

    def final(self, states: Sequence[ChoiceState]) -> dict:
        """The whole answer, from the choices in index order."""


class OpenAIOutput:
    """Chat and (legacy) completions objects and chunks, as api.openai.com sends them."""

    def __init__(self, gateway: Gateway, job: Job) -> None:
        self.gateway, self.job = gateway, job
        self.sent_chars: dict[int, int] = {}
        self.echoed: set[int] = set()  # choices whose prompt went out (with echo, in their first chunk)

    def fold(self, state: ChoiceState, event: TokenEvent) -> None:
        text, _ = _apply(self.gateway, self.job, state, event)
        if state.tool_calls is not None:
            state.tool_calls.feed(text, state.finish_reason is not None)

    def final(self, states: Sequence[ChoiceState]) -> dict:
        return _final_body(self.gateway, self.job, states)

    def closing(self, num_tokens: int) -> bytes:
        job = self.job
        if not job.include_usage:
            return b""
        usage = protocol.usage(_prompt_tokens(job), 0 if job.echo_only else num_tokens)
        return protocol.sse(protocol.usage_chunk(job.response_id, job.model, self.job.created, usage,
                                                 endpoint=job.endpoint))

    def opening(self, index: int) -> bytes:
        job, created = self.job, self.job.created
        if job.endpoint == "chat":
            return protocol.sse(protocol.chat_chunk_role(job.response_id, job.model, created, index,
                                                         job.include_usage))
        return b""

    def delta(self, state: ChoiceState, event: TokenEvent) -> bytes:
        text, entries = _apply(self.gateway, self.job, state, event)
        if self.job.echo and state.index not in self.echoed:  # as vLLM: the prompt and its logprobs, then the first
            self.echoed.add(state.index)                      # token, in the choice's first chunk
            text = self.job.prompt_texts[state.prompt_index] + text
        if state.tool_calls is not None:
            return self._tool_call_chunks(state, text, entries)
        if not text and state.finish_reason is None and not entries:
            return b""
        job, created = self.job, self.job.created
        logprobs = entries if job.num_logprobs is not None else None
        if job.endpoint == "chat":
            chunk = protocol.chat_chunk_delta(job.response_id, job.model, created, state.index, text, logprobs,
                                              state.finish_reason, job.include_usage, state.stop_reason)
        else:
            offset = self.sent_chars.get(state.index, 0)
            self.sent_chars[state.index] = offset + len(text)
            chunk = protocol.completion_chunk(job.response_id, job.model, created, state.index, text, logprobs,
                                              state.finish_reason, offset, job.include_usage, state.stop_reason)
        return protocol.sse(chunk)

    def _tool_call_chunks(self, state: ChoiceState, text: str, entries: list) -> bytes:
        """The parser's deltas for this text, one chunk each: the first carries the event's logprobs, the last
        the finish reason ("tool_calls" when the message has calls); an event that decides nothing yet sends a
        chunk only for its logprobs or its finish."""
        deltas = state.tool_calls.feed(text, state.finish_reason is not None)
        logprobs = entries if self.job.num_logprobs is not None else None
        finish = state.chat_finish_reason
        if not deltas and (finish is not None or entries):
            deltas = [{}]
        job, created = self.job, self.job.created
        return b"".join(
            protocol.sse(protocol.chat_chunk(job.response_id, job.model, created, state.index, delta,
                                             logprobs if k == 0 else None,
                                             finish if k == len(deltas) - 1 else None, job.include_usage,
                                             state.stop_reason))
            for k, delta in enumerate(deltas))


class GenerateOutput:
    """``POST /generate``'s own shape. Streamed: one event per orchestrator step, ``{request_id, text, token_ids,
    finish_reason, stop_reason, worker_id, logprobs}``; whole: those events joined, plus ``usage``."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.events: list[dict] = []

    def opening(self, index: int) -> bytes:
        return b""

    def delta(self, state: ChoiceState, event: TokenEvent) -> bytes:
        return protocol.sse(json.dumps(self._event(state, event)))

    def closing(self, num_tokens: int) -> bytes:
        return b""

    def fold(self, state: ChoiceState, event: TokenEvent) -> None:
        self.events.append(self._event(state, event))

    def final(self, states: Sequence[ChoiceState]) -> dict:
        tokens = [token for state in states for token in state.token_ids]
        last = self.events[-1] if self.events else {}
        logprobs = [entry for event in self.events for entry in event["logprobs"] or []]
        return {
            "request_id": self.job.request_id,
            "text": "".join(event["text"] for event in self.events),
            "token_ids": tokens,
            "finish_reason": last.get("finish_reason"),
            "stop_reason": last.get("stop_reason"),
            "logprobs": logprobs or None,
            "usage": {"prompt_tokens": _prompt_tokens(self.job), "completion_tokens": len(tokens)},
        }

    def _event(self, state: ChoiceState, event: TokenEvent) -> dict:
        state.token_ids.extend(event.token_ids)
        return {
            "request_id": self.job.request_id,
            "text": state.text.add(event.token_ids, event.finish_reason is not None),
            "token_ids": list(event.token_ids),
            "finish_reason": event.finish_reason,
            "stop_reason": event.stop_reason,
            "worker_id": event.worker_id,
            "logprobs": [{str(t): lp.logprob for t, lp in entry.items()} for entry in event.logprobs] or None,
        }


# ---------------------------------------------------------------------------------------------- errors
def error_status_and_body(error: Exception) -> tuple[int, dict]:
    """The HTTP status and OpenAI error envelope for any error a request can end with (500: no details)."""
    if isinstance(error, protocol.ProtocolError):
        return error.status, error.body()
    if isinstance(error, AdmissionError):
        return error.status, protocol.error_for_status(error.status, error.message, None, error.code)
    if isinstance(error, NoWorkersError):
        return 503, protocol.error_for_status(503, str(error))
    if isinstance(error, InvalidRequestError):
        return 400, protocol.error_for_status(400, str(error), _param_of(str(error)))
    return 500, protocol.error_for_status(500)


def _param_of(message: str) -> str | None:
    head = message.split(":", 1)[0].strip()
    return head if head and " " not in head else None


def _error_response(gateway: Gateway, error: Exception, headers: dict) -> JSONResponse:
    status, body = error_status_and_body(error)
    gateway.metrics.count_error(status)
    if status >= 500:
        logger.warning("request %s: %d %s", headers.get("X-Request-Id"), status, error)
    if isinstance(error, BodyTooLarge) and error.close:
        headers = {**headers, "Connection": "close"}  # uvicorn closes instead of reading the rest of the stream
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        headers = {**headers, "Retry-After": str(max(1, int(retry_after + 0.999)))}
    else:
        headers = {**headers, **protocol.retry_after_headers(status)}
    return JSONResponse(body, status_code=status, headers=headers)
