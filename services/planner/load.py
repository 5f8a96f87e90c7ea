"""What the planner observes: one typed snapshot per pool over the last window (``observe`` fills them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolLoad:
    """One pool over the observation window. Rates are per second; latencies in seconds (None: no data in
    the window). TTFT figures are the router's (what clients see), filed under the prefill pool; TPOT under
    decode. ``replicas`` counts the workers seen now."""

    role: str
    replicas: int
    request_rate: float = 0.0
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    tpot_p50_s: float | None = None
    tpot_p90_s: float | None = None

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.request_rate * self.mean_prompt_tokens


@dataclass(frozen=True)
class ClusterLoad:
    """Both pools at one moment (`at`: seconds on the planner's monotonic clock)."""

    at: float
    prefill: PoolLoad
    decode: PoolLoad
