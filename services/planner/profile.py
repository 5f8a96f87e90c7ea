"""The capacity profile the planner predicts latencies from: one small JSON file, per pool.

Prefill: one worker computes ``tokens_per_s`` prompt tokens a second when busy. A prompt of P tokens takes
S = P / tokens_per_s; with prompts arriving at a worker at utilisation rho = (its prompt tokens/s) /
tokens_per_s, TTFT = overhead + S + W, where W = rho * S / (2 (1 - rho)) is the M/D/1 mean queueing wait
(deterministic service: prefill time is nearly linear in prompt tokens). rho is capped at ``max_utilisation``
so the planner never plans a worker at the edge of an unbounded queue.

Decode: TPOT as a function of the running batch of one worker (piecewise-linear points, extended past the
last point along its last segment) and ``max_batch``, the streams one worker's KV cache holds.

``from_pd_goodput`` builds a profile from ``benchmarks/pd_goodput.py --result-json`` output (see its docstring).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PrefillProfile(BaseModel):
    """One prefill worker: its prompt-token rate when busy and the fixed time every request adds to TTFT."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens_per_s: float = Field(gt=0)
    overhead_ms: float = Field(0.0, ge=0)
    max_utilisation: float = Field(0.9, gt=0, lt=1)

    def ttft_s(self, prompt_tokens: float, worker_tokens_per_s: float) -> float:
        """Predicted mean TTFT for a prompt of `prompt_tokens` on a worker receiving `worker_tokens_per_s`;
        inf when the worker would be over ``max_utilisation``."""
        rho = worker_tokens_per_s / self.tokens_per_s
        if rho > self.max_utilisation:
            return math.inf
        service = prompt_tokens / self.tokens_per_s
        return self.overhead_ms / 1e3 + service + rho * service / (2 * (1 - rho))


class DecodeProfile(BaseModel):
    """One decode worker: TPOT (ms) at running batch sizes, as (batch, ms) points sorted by batch, and the
    most streams its KV cache holds. Invariant: batches strictly increase and TPOT never decreases."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tpot_ms_by_batch: tuple[tuple[float, float], ...] = Field(min_length=1)
    max_batch: int = Field(gt=0)

    @field_validator("tpot_ms_by_batch")
    @classmethod
    def _monotone(cls, points: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            if b1 <= b0 or t1 < t0:
                raise ValueError(f"points must rise in batch and not fall in TPOT: ({b0}, {t0}) then ({b1}, {t1})")
        return points

    def tpot_s(self, batch: float) -> float:
        """Predicted TPOT at a running batch of `batch` streams (linear between points, beyond them too)."""
        points = self.tpot_ms_by_batch
        if len(points) == 1 or batch <= points[0][0]:
            return points[0][1] / 1e3
        segment = next((pair for pair in zip(points, points[1:]) if batch <= pair[1][0]), (points[-2], points[-1]))
        (b0, t0), (b1, t1) = segment
        return (t0 + (t1 - t0) * (batch - b0) / (b1 - b0)) / 1e3

    def max_batch_within(self, tpot_target_s: float) -> float:
        """The largest running batch (at most ``max_batch``) whose TPOT is within `tpot_target_s`; 0 if none."""
        lo, hi = 0.0, float(self.max_batch)
        if self.tpot_s(hi) <= tpot_target_s:
            return hi
        if self.tpot_s(lo) > tpot_target_s:
            return 0.0
        for _ in range(50):  # bisection on a monotone function: 2^-50 of max_batch is exact enough
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.tpot_s(mid) <= tpot_target_s else (lo, mid)
        return lo


class Profile(BaseModel):
    """Both pools' capacity models and where they came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill: PrefillProfile
    decode: DecodeProfile
    source: str = ""


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON file (the shape of ``Profile``); errors name the file."""
    try:
        return Profile.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"planner profile {path}: {exc}") from exc


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(profile.model_dump_json(indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- pd_goodput


def from_pd_goodput(report: Mapping[str, Any], layout: str = "1p1d", max_batch: int = 256) -> Profile:
    """A profile from a pd_goodput result, read from `layout` (one prefill + one decode worker) of every workload.

    Prefill, kept simple and on the safe side: per rate, the median TTFT with everything it includes (transfer,
    routing) is taken as the service time of the mean prompt, so tokens_per_s = mean prompt tokens / median
    TTFT, and the best (least queued) rate counts; overhead 0. Decode: one point per rate, (the decode worker's
    mean running batch, its own ms per output token, else the client's TPOT median), sorted by batch and made
    monotone. `max_batch` (the KV limit) is not in the report; pass the worker's.
    """
    rates = [rate for entry in report["workloads"] for lay in entry["layouts"] if lay.get("layout") == layout
             for rate in lay.get("rates", [])]
    if not rates:
        raise ValueError(f"no rates measured for layout {layout!r}")
    prefill = PrefillProfile(tokens_per_s=max(_prefill_rates(rates)))
    decode = DecodeProfile(tpot_ms_by_batch=_decode_points(rates), max_batch=max_batch)
    return Profile(prefill=prefill, decode=decode, source=f"pd_goodput {report.get('command', '')} [{layout}]")


def _prefill_rates(rates: Sequence[Mapping[str, Any]]) -> list[float]:
    found = []
    for rate in rates:
        metrics = rate["metrics"]
        ttft_ms = metrics["ttft"].get("median_ms")
        if metrics.get("completed") and ttft_ms:
            found.append(metrics["total_input_tokens"] / metrics["completed"] / (ttft_ms / 1e3))
    if not found:
        raise ValueError("no rate has a TTFT median")
    return found


def _decode_points(rates: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, float], ...]:
    points: dict[float, float] = {}
    for rate in rates:
        decode = rate.get("workers", {}).get("decode", {})
        batch = decode.get("mean_running")
        ms = decode.get("worker_ms_per_token") or rate["metrics"]["tpot"].get("median_ms")
        if batch and ms:
            points[round(batch, 3)] = max(points.get(round(batch, 3), 0.0), ms)
    if not points:
        raise ValueError("no rate has the decode worker's running batch and a TPOT")
    monotone, highest = [], 0.0
    for batch in sorted(points):
        highest = max(highest, points[batch])
        monotone.append((batch, highest))
    return tuple(monotone)


def profile_from_file(path: str | Path, max_batch: int = 256) -> Profile:
    """A profile file, or a pd_goodput result (recognised by its ``workloads`` key)."""
    try:
        data = json.loads(Path(path).read_text())
        return from_pd_goodput(data, max_batch=max_batch) if "workloads" in data else Profile.model_validate(data)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"planner profile {path}: {exc}") from exc
