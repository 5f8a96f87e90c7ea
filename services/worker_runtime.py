"""What prefill and decode workers share: engine on its thread, gRPC server, registry heartbeat, drain.

Lifecycle: start the HTTP side (/metrics, /health, /ready) -> load the engine -> start gRPC -> register in
Redis -> print TANDEM_READY -> serve -> on SIGTERM: mark draining (/ready turns 503; routers send nothing new),
finish in-flight work (bounded) while still heartbeating, deregister, stop gRPC, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import signal
import socket
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.config import EngineConfig, WorkerSettings
from common.coord.prefix_index import PrefixPublisher
from common.coord.redis_client import connect
from common.coord.registry import WorkerRegistration
from common.coord.worker_info import WorkerInfo
from common.engine.async_engine import AsyncEngine
from common.engine.engine import LLMEngine
from common.engine.engine_process import EngineProcess
from common.engine.llm import validate_engine_args
from common.engine.stats import EngineStats, FinishedRequest, StepClock
from common.metrics import WorkerMetrics
from common.transfer.base import grpc_message_options
from proto import worker_pb2_grpc
from services.worker_http import WorkerHealth, WorkerHttpServer

logger = logging.getLogger(__name__)
EXIT_ENGINE_DIED = 3  # the worker's exit code when its engine died under it


class WorkerRuntime:
    """One worker process: its engine, its identity, its live stats for heartbeats, the Status RPC and metrics."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: AsyncEngine | EngineProcess,
        metrics: WorkerMetrics | None = None,
        health: WorkerHealth | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.settings = settings
        self.role = settings.worker.role
        self.engine = engine
        self.device = engine.device
        self.model_name = settings.engine.model.model
        self.block_size = settings.engine.cache.block_size
        self.max_model_len = engine.max_model_len
        self.worker_id = settings.worker.worker_id or f"{self.role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.host_id = socket.gethostname()
        self.gpu_uuid = gpu_uuid(self.device)
        # Under tensor parallelism ``engine.kv_cache`` is rank 0's KV heads only: KV imports go through the engine.
        self.kv_cache_sharded = settings.engine.model.tensor_parallel_size > 1
        self.started_at = time.time()
        self.address = ""
        self.reservations = 0
        self.stats = EngineStats(engine.num_blocks, engine.num_blocks, 0, 0, 0)
        self.step_time = RecentStepTime()
        self.metrics = metrics or WorkerMetrics(self.model_name, self.role)
        self.health = health or WorkerHealth()
        self.metrics_port = metrics_port

    @property
    def draining(self) -> bool:
        """Set on SIGTERM or by the Drain RPC; /ready answers 503 from then on."""
        return self.health.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.health.draining = value

    def info(self) -> WorkerInfo:
        """The registry record, from the stats refreshed every heartbeat."""
        return WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            model=self.model_name,
            grpc_address=self.address,
            metrics_port=self.metrics_port,
            device=self.device,
            host_id=self.host_id,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            total_blocks=self.stats.total_blocks,
            free_blocks=self.stats.free_blocks,
            running=self.stats.running,
            waiting=self.stats.waiting,
            tpot_ms=self.step_time.ms,
            draining=self.draining,
            started_at=self.started_at,
        )

    async def refresh_stats(self, prefix: PrefixPublisher | None) -> None:
        self.stats, finished = await self.engine.call(_stats_and_finished)
        steps = self.engine.step_clock.snapshot()
        self.step_time.update(steps)
        self.metrics.update(self.stats, finished, self.reservations, steps)
        if prefix is not None:
            events = await self.engine.call(_take_cache_events)
            prefix.record([h for h, cached in events if cached], [h for h, cached in events if not cached])

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request or reservation is left (True), or the timeout passes (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = await self.engine.stats()
            if stats.num_requests == 0 and self.reservations == 0:
                return True
            await asyncio.sleep(0.05)
        return False


class RecentStepTime:
    """The engine's recent mean time per step with output, in ms: what each running stream waits between two of
    its tokens (the heartbeat's ``tpot_ms``). Each ``update`` takes the step clock's growth since the previous one
    as a window and folds its mean into an exponential moving average (``weight`` on the newest window).

    Invariants: 0 until a window holds a step; a window without steps (idle) or with a clock that went back (a
    new engine) leaves the figure as it was.
    """

    def __init__(self, weight: float = 0.5) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.ms = 0.0
        self._last = StepClock()

    def update(self, clock: StepClock) -> float:
        steps, seconds = clock.steps - self._last.steps, clock.seconds - self._last.seconds
        self._last = clock
        if steps > 0 and seconds >= 0:
            window_ms = 1e3 * seconds / steps
            self.ms = window_ms if self.ms == 0 else self.weight * window_ms + (1 - self.weight) * self.ms
        return self.ms


def _stats_and_finished(engine: LLMEngine) -> tuple[EngineStats, list[FinishedRequest]]:
    return engine.stats(), engine.stats_recorder.take_finished()


def _take_cache_events(engine: LLMEngine) -> list:
    return engine.kv_cache_manager.pool.take_cache_events()


def configure_for_role(engine: LLMEngine, role: str) -> None:
    """What a worker's engine records beyond the offline engine: finished-request records for the metrics, and
    prefix-cache events for the Redis prefix index (both roles publish one: the router routes by cache across
    both pools)."""
    engine.kv_cache_manager.pool.track_cache_events = role in ("prefill", "decode")
    engine.stats_recorder.collect_finished = True


def gpu_uuid(device: str) -> str:
    """The physical GPU's UUID ('' on CPU): decides whether two workers can pair over NCCL."""
    if not device.startswith("cuda"):
        return ""
    import torch

    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def speculative_positions(settings: WorkerSettings) -> int:
    """Draft positions a worker's metrics list from the start: decode's ``num_speculative_tokens`` (prefill workers
    sample one token per request and never speculate)."""
    config = settings.engine.scheduler.speculative_config
    return config.num_speculative_tokens if config is not None and settings.worker.role == "decode" else 0


def engine_config_for_role(settings: WorkerSettings) -> EngineConfig:
    """The engine's config as this role runs it: a prefill worker samples one token per request, so speculation
    (and a draft model's memory) is left to decode workers even when both roles got the same flags."""
    config = settings.engine
    if settings.worker.role != "prefill" or config.scheduler.speculative_config is None:
        return config
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, speculative_config=None))


def start_engine(settings: WorkerSettings) -> AsyncEngine | EngineProcess:
    """The worker's engine, loaded: in its own process on a decode worker (no GIL shared with the gRPC side),
    on a thread otherwise. Blocks while the model loads. Under tensor parallelism that engine is rank 0 and starts
    the other ranks itself; the worker stays one worker to the cluster, and a rank's death is its engine's death
    (the engine raises ``TensorParallelError`` and stops, so the worker leaves the registry and exits)."""
    validate_engine_args(settings.engine)
    role = settings.worker.role
    engine_config = engine_config_for_role(settings)
    if role == "decode" and not settings.worker.engine_in_thread:
        return EngineProcess(engine_config, setup=functools.partial(configure_for_role, role=role))
    engine = LLMEngine(engine_config)
    configure_for_role(engine, role)
    return AsyncEngine(engine)


async def serve_worker(settings: WorkerSettings, servicer_factory) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit code.

    The HTTP side starts first, so liveness probes and scrapes work while the model loads."""
    worker = settings.worker
    metrics = WorkerMetrics(settings.engine.model.model, worker.role, speculative_positions(settings))
    health = WorkerHealth()
    http = WorkerHttpServer(worker.host, worker.metrics_port, metrics.registry, health).start()
    try:
        engine = await asyncio.to_thread(start_engine, settings)
        health.loaded = True
        return await _serve_loaded(WorkerRuntime(settings, engine, metrics, health, http.port), servicer_factory)
    finally:
        http.stop()


async def _serve_loaded(runtime: WorkerRuntime, servicer_factory) -> int:
    settings = runtime.settings
    server = grpc.aio.server(options=grpc_message_options(settings.transfer.grpc_chunk_bytes))
    servicer = servicer_factory(runtime)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    if hasattr(servicer, "add_extra_services"):
        servicer.add_extra_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.worker.host}:{settings.worker.port}")
    await server.start()
    runtime.address = f"{settings.worker.advertise_host or settings.worker.host}:{port}"
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return await _run_registered(runtime, server, health_servicer, servicer)


async def _run_registered(runtime: WorkerRuntime, server: grpc.aio.Server, health_servicer, servicer) -> int:
    settings = runtime.settings
    client = connect(settings.coord)
    prefix = PrefixPublisher(client, settings.coord, runtime.worker_id)
    registration = WorkerRegistration(client, settings.coord, runtime.info, prefix=prefix)
    stop = _stop_event()
    stats_task = asyncio.create_task(_refresh_forever(runtime, prefix, settings.coord.heartbeat_s, stop))
    await runtime.refresh_stats(prefix)
    await registration.start()
    runtime.health.registered = True
    print(
        "TANDEM_READY "
        + json.dumps(
            {
                "role": runtime.role,
                "worker_id": runtime.worker_id,
                "address": runtime.address,
                "metrics_port": runtime.metrics_port,
            }
        ),
        flush=True,
    )
    logger.info(
        "%s %s serving on %s (%s); metrics on port %d",
        runtime.role,
        runtime.worker_id,
        runtime.address,
        runtime.device,
        runtime.metrics_port,
    )
    await stop.wait()
    engine_alive = runtime.engine.is_alive
    logger.info("%s %s %s", runtime.role, runtime.worker_id, "draining" if engine_alive else "leaving: engine died")
    runtime.draining = True
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await registration.set_draining()
    # Heartbeats go on (draining=1: no new requests) until the in-flight ones finish: a worker that leaves the
    # registry is taken for frozen by the routers, which then move its streams elsewhere.
    drained = engine_alive and await runtime.wait_idle(settings.worker.drain_timeout_s)
    await registration.stop()
    stats_task.cancel()
    await server.stop(grace=1.0)
    if hasattr(servicer, "close"):
        await servicer.close()
    runtime.engine.shutdown()
    await client.aclose()
    logger.info("%s %s stopped (%s)", runtime.role, runtime.worker_id, "drained" if drained else "not drained")
    return 0 if engine_alive else EXIT_ENGINE_DIED


async def _refresh_forever(
    runtime: WorkerRuntime, prefix: PrefixPublisher | None, period_s: float, stop: asyncio.Event
) -> None:
    """Stats for the heartbeat; a dead engine (its process killed, its thread crashed) stops the worker, so it
    leaves the registry and exits non-zero for its supervisor to restart, instead of failing every request."""
    while True:
        await asyncio.sleep(period_s / 2)
        if not runtime.engine.is_alive:
            logger.error("%s %s: the engine is gone; leaving the cluster", runtime.role, runtime.worker_id)
            stop.set()
            return
        try:
            await runtime.refresh_stats(prefix)
        except Exception:  # noqa: BLE001 - a missed refresh only delays the heartbeat's numbers
            logger.exception("stats refresh failed")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
