"""RPCs every worker answers the same way (Status, Drain, Abort) and error mapping for the rest."""

from __future__ import annotations

import logging

import grpc

from proto import worker_pb2, worker_pb2_grpc
from services.worker_runtime import WorkerRuntime

logger = logging.getLogger(__name__)


class BaseWorkerService(worker_pb2_grpc.WorkerServicer):
    """Base servicer: an RPC the role does not serve answers FAILED_PRECONDITION (the default here)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    async def Status(self, request, context) -> worker_pb2.WorkerStatus:  # noqa: N802 - gRPC names
        return await self._status()

    async def Drain(self, request, context) -> worker_pb2.WorkerStatus:  # noqa: N802
        self.runtime.draining = True
        return await self._status()

    async def Abort(self, request, context) -> worker_pb2.AbortReply:  # noqa: N802
        request_id = request.request_id
        known = await self.runtime.engine.call(_abort, request_id)
        return worker_pb2.AbortReply(aborted=known)

    async def Reserve(self, request, context):  # noqa: N802
        await self.wrong_role(context, "Reserve")

    async def Release(self, request, context):  # noqa: N802
        await self.wrong_role(context, "Release")

    async def Renew(self, request, context):  # noqa: N802
        await self.wrong_role(context, "Renew")

    async def Prefill(self, request, context):  # noqa: N802
        await self.wrong_role(context, "Prefill")

    async def Generate(self, request, context):  # noqa: N802
        await self.wrong_role(context, "Generate")

    async def wrong_role(self, context, rpc: str) -> None:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{rpc} is not served by a {self.runtime.role} worker")

    async def _status(self) -> worker_pb2.WorkerStatus:
        stats = await self.runtime.engine.stats()
        runtime = self.runtime
        return worker_pb2.WorkerStatus(
            worker_id=runtime.worker_id, role=runtime.role, model=runtime.model_name,
            total_blocks=stats.total_blocks, free_blocks=stats.free_blocks, running=stats.running,
            waiting=stats.waiting, reservations=runtime.reservations, draining=runtime.draining,
            device=runtime.device,
        )


def _abort(engine, request_id: str) -> bool:
    known = request_id in engine.groups
    engine.abort_request(request_id)
    return known
