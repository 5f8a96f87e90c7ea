"""The process behind `tandem prefill` and `tandem decode`: one worker of the given role until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from common.config import WorkerSettings
from services.decode.service import DecodeService
from services.prefill.service import PrefillService
from services.worker_runtime import serve_worker

SERVICES = {"prefill": PrefillService, "decode": DecodeService}
# Where the engine runs on a thread of this process (prefill workers, `--engine-in-thread`), it gives the GIL up
# at every torch call and must win it back from the gRPC thread; at CPython's default 5 ms switch interval one
# step could wait that long several times. (A decode worker's engine has its own process and GIL.)
ENGINE_GIL_SWITCH_INTERVAL_S = 0.0002


def run_worker(settings: WorkerSettings) -> int:
    """Serve one worker of ``settings.worker.role``; returns the process exit code."""
    role = settings.worker.role
    if role not in SERVICES:
        raise ValueError(f"role must be prefill or decode, got {role!r}")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(ENGINE_GIL_SWITCH_INTERVAL_S)
    return asyncio.run(serve_worker(settings, SERVICES[role]))
