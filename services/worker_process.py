"""The process behind `tandem prefill` and `tandem decode`: one worker of the given role until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from common.config import WorkerSettings
from services.decode.service import DecodeService
from services.prefill.service import PrefillService
from services.worker_runtime import serve_worker

SERVICES = {"prefill": PrefillService, "decode": DecodeService}


def run_worker(settings: WorkerSettings) -> int:
    """Serve one worker of ``settings.worker.role``; returns the process exit code."""
    role = settings.worker.role
    if role not in SERVICES:
        raise ValueError(f"role must be prefill or decode, got {role!r}")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve_worker(settings, SERVICES[role]))
