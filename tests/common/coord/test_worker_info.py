"""WorkerInfo's Redis form: every field survives the round trip, the new tpot_ms included; older records parse."""

from __future__ import annotations

from common.coord.worker_info import WorkerInfo


def test_round_trip_keeps_every_field() -> None:
    info = WorkerInfo("d0", "decode", "m", "h:1", running=3, waiting=1, tpot_ms=12.75, draining=True)
    assert WorkerInfo.from_redis(info.to_redis()) == info
    encoded = {k.encode(): v.encode() for k, v in info.to_redis().items()}
    assert WorkerInfo.from_redis(encoded).tpot_ms == 12.75


def test_a_record_without_tpot_ms_means_unknown() -> None:
    raw = WorkerInfo("d0", "decode", "m", "h:1").to_redis()
    del raw["tpot_ms"]
    assert WorkerInfo.from_redis(raw).tpot_ms == 0.0
