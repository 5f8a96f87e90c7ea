"""Reservation leases on the decode service: Renew pushes a live reservation's deadline, never pulls it in, and
answers False for one that is unknown or already gone."""

from __future__ import annotations

import time

import pytest

from proto import worker_pb2
from services.decode.service import Reservation
from tests.services.decode.test_direct_receive import decode_service


@pytest.mark.asyncio
async def test_renew_extends_a_live_reservation_and_refuses_a_gone_one():
    service = decode_service()
    try:
        deadline = time.monotonic() + 1.0
        service.reservations["r1"] = Reservation("r1", (0, 1), deadline)
        reply = await service.Renew(worker_pb2.RenewRequest(reservation_id="r1", lease_s=30.0), None)
        assert reply.renewed and service.reservations["r1"].deadline >= deadline + 28
        later = service.reservations["r1"].deadline
        reply = await service.Renew(worker_pb2.RenewRequest(reservation_id="r1", lease_s=0.5), None)
        assert reply.renewed and service.reservations["r1"].deadline == later  # a shorter lease never shortens it
        reply = await service.Renew(worker_pb2.RenewRequest(reservation_id="gone", lease_s=30.0), None)
        assert not reply.renewed
    finally:
        await service.close()
