"""The router process: FastAPI + uvicorn in front of the Orchestrator.

The OpenAI-compatible surface (/v1/...) and the plain ``POST /generate`` (JSON in, JSON or SSE out) share one
request path (services/router/openai_api.py): the same keys, rate limits, admission queue, validation and metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import AutoTokenizer

from common.config import CoordConfig, RouterConfig, TransferConfig
from common.coord.prefix_index import PrefixLookup
from common.coord.redis_client import connect
from common.coord.watcher import RegistryWatcher
from common.metrics import RouterMetrics, cluster_exposition, exposition, prometheus_sd
from common.models.loader import resolve_model_path
from services.router import openai_api, protocol, vllm_api
from services.router.admission import AdmissionError, AdmissionQueue, ApiKeys, RateLimiter
from services.router.openai_api import Gateway
from services.router.orchestrator import Orchestrator
from services.router.processes import reuse_port_socket, supervise
from services.router.tool_calls import ToolCallConfig

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/prometheus/targets", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc"})
"""What answers without an API key when keys are set: probes and scrapes (Kubernetes, Prometheus' service discovery
and the planner send no key; they reveal counts and the workers' /metrics addresses, not their gRPC addresses)
and the API schema. Every other path needs the key: every generating one, /v1/models, /workers, and any route
added later (guarded by default, see ``ApiKeyGuard``)."""


@dataclass
class RouterState:
    """Everything the HTTP handlers use; built at startup, passed explicitly (no module globals)."""

    model: str
    tokenizer: object
    orchestrator: Orchestrator
    watcher: RegistryWatcher
    gateway: Gateway


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(protocol.error_for_status(status, message), status_code=status,
                        headers=protocol.retry_after_headers(status))


def build_app(state: RouterState) -> FastAPI:
    app = FastAPI(title="Tandem router", version="0.1.0",
                  description="OpenAI-compatible gateway of a disaggregated prefill/decode cluster")
    _add_error_handlers(app, state)
    _add_openai_routes(app, state)
    vllm_api.add_vllm_routes(app, state.gateway, vllm_api.served_max_model_len(state.watcher, state.model))
    app.add_middleware(ApiKeyGuard, keys=state.gateway.keys, on_refused=state.gateway.metrics.count_error)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        _refresh_gauges(state)
        cluster = cluster_exposition(state.gateway.model_id, state.watcher.alive(model=state.model))
        return Response(exposition(state.gateway.metrics.registry) + cluster, media_type=CONTENT_TYPE_LATEST)

    @app.get("/ready")
    async def ready():
        if not state.watcher.redis_reachable:  # the snapshot may list workers long gone
            return error_response(503, "Redis is unreachable: the worker registry cannot be read")
        decodes = state.watcher.alive(role="decode", model=state.model)
        if not decodes:
            return error_response(503, "no decode worker registered")
        return {
            "status": "ready",
            "decode_workers": len(decodes),
            "prefill_workers": len(state.watcher.alive(role="prefill", model=state.model)),
        }

    @app.get("/workers")
    async def workers() -> dict:
        return {"workers": [info.__dict__ for info in state.watcher.alive()]}

    @app.get("/prometheus/targets", include_in_schema=False)
    async def prometheus_targets() -> list[dict]:
        """Prometheus HTTP service discovery of the workers' /metrics (deploy/prometheus/prometheus-local.yml)."""
        return prometheus_sd(state.watcher.alive())

    @app.post("/generate", openapi_extra=_json_body_schema(protocol.GenerateBody))
    async def generate(request: Request) -> Response:
        """The plain API on /v1's path (keys, limits, admission, metrics). JSON body whatever the Content-Type
        (``curl -d`` sends form encoding by default)."""
        return await openai_api.generate(state.gateway, request)

    return app


class ApiKeyGuard:
    """ASGI middleware: with API keys set, an HTTP request to any path outside ``OPEN_PATHS`` without a valid key
    gets OpenAI's 401 before any route runs (a denylist of open paths, so a new route cannot be left open)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, on_refused: Callable[[int], None] | None = None) -> None:
        self.app, self.keys, self.on_refused = app, keys, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys.enabled and scope["path"] not in OPEN_PATHS:
            try:
                self.keys.check(Headers(scope=scope).get("authorization"))
            except AdmissionError as error:
                if self.on_refused is not None:
                    self.on_refused(error.status)
                body = protocol.error_for_status(error.status, error.message, None, error.code)
                await JSONResponse(body, status_code=error.status, headers=error.headers())(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_openai_routes(app: FastAPI, state: RouterState) -> None:
    gateway = state.gateway

    @app.post("/v1/chat/completions", openapi_extra=_json_body_schema(protocol.ChatCompletionRequest))
    async def chat(request: Request) -> Response:
        """OpenAI chat completions (streaming with ``stream: true``)."""
        return await openai_api.chat_completions(gateway, request)

    @app.post("/v1/completions", openapi_extra=_json_body_schema(protocol.CompletionRequest))
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) completions."""
        return await openai_api.completions(gateway, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return openai_api.list_models(gateway)


def _add_error_handlers(app: FastAPI, state: RouterState) -> None:
    """No traceback ever reaches a client: unknown paths and crashes get the OpenAI envelope."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """A path or method the router does not serve: OpenAI's "Invalid URL" with no code (not model_not_found)."""
        message = str(error.detail)
        if error.status_code in (404, 405):
            message = f"Invalid URL ({request.method} {request.url.path})"
        body = protocol.error_for_status(error.status_code, message)
        body["error"]["code"] = None
        headers = {**(error.headers or {}), **protocol.retry_after_headers(error.status_code)}  # 405's Allow
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(protocol.error_for_status(400, str(error.errors()[:1])), status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s crashed", request.headers.get("x-request-id", "-"))
        state.gateway.metrics.count_error(500)
        return JSONResponse(protocol.error_for_status(500), status_code=500)


def _refresh_gauges(state: RouterState) -> None:
    metrics = state.gateway.metrics
    for role in ("prefill", "decode"):
        metrics.set_workers(role, len(state.watcher.alive(role=role, model=state.model)))
    metrics.waiting.set(state.gateway.queue.stats().waiting)


def _json_body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@asynccontextmanager
async def router_state(
    model: str, router: RouterConfig, coord: CoordConfig, transfer: TransferConfig, download_dir: str | None = None
):
    client = connect(coord)
    watcher = RegistryWatcher(client, coord)
    await watcher.start()
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, resolve_model_path(model, download_dir))
    if router.chat_template is not None:
        tokenizer.chat_template = vllm_api.load_chat_template(router.chat_template)
    served = router.served_model_name or model
    metrics = RouterMetrics.create(served)

    orchestrator = Orchestrator(model, router, transfer, watcher, PrefixLookup(client, coord),
                                on_retry=metrics.count_retry, on_placement=metrics.count_placement)
    limiter = None
    if router.rate_limit_rpm or router.rate_limit_tpm:
        limiter = RateLimiter(client, coord.namespace, router.rate_limit_rpm, router.rate_limit_tpm)
    gateway = Gateway(model_id=served, tokenizer=tokenizer, orchestrator=orchestrator,
                      keys=ApiKeys.load(router.api_keys), limiter=limiter,
                      queue=AdmissionQueue(router.max_running, router.max_waiting),
                      metrics=metrics,
                      tool_calls=ToolCallConfig(router.tool_call_parser, router.enable_auto_tool_choice),
                      max_body_bytes=router.max_request_body, context_limit=orchestrator.max_model_len)
    try:
        yield RouterState(model=model, tokenizer=tokenizer, orchestrator=orchestrator, watcher=watcher,
                          gateway=gateway)
    finally:
        await orchestrator.close()
        await watcher.stop()
        await client.aclose()


async def serve_router(
    model: str, router: RouterConfig, coord: CoordConfig, transfer: TransferConfig, download_dir: str | None = None
) -> int:
    async with router_state(model, router, coord, transfer, download_dir) as state:
        config = uvicorn.Config(build_app(state), host=router.host, port=router.port, log_level="warning",
                                timeout_keep_alive=75)  # clients keep pooled connections open between requests
        server = uvicorn.Server(config)
        sockets = [reuse_port_socket(router.host, router.port)] if router.reuse_port else None
        task = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if task.done():
            return 1
        port = server.servers[0].sockets[0].getsockname()[1]
        print("TANDEM_READY " + json.dumps({"role": "router", "address": f"http://{router.host}:{port}"}), flush=True)
        started = time.monotonic()
        await task
        logger.info("router stopped after %.0f s", time.monotonic() - started)
    return 0


def main_router(
    model: str, router: RouterConfig, coord: CoordConfig, transfer: TransferConfig, download_dir: str | None = None
) -> int:
    """Entry point of `tandem router` (configured by the command line)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    if router.processes < 1:
        raise SystemExit(f"tandem router: --processes must be >= 1, got {router.processes}")
    if router.enable_auto_tool_choice and router.tool_call_parser is None:
        raise SystemExit("tandem router: --enable-auto-tool-choice needs --tool-call-parser")
    if router.chat_template is not None:
        try:
            vllm_api.load_chat_template(router.chat_template)
        except ValueError as error:
            raise SystemExit(f"tandem router: {error}") from None
    if router.processes > 1:
        return supervise(sys.argv[1:], router.host, router.port, router.processes)
    return run_event_loop(serve_router(model, router, coord, transfer, download_dir))


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop when installed: every token of every stream crosses this loop, and uvloop's transports and
    scheduling cost a fraction of asyncio's (uvicorn likewise picks httptools over h11 when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
