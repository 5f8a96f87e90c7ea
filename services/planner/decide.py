"""The planner's decision: replica counts per pool from the profile, the SLO and the observed load. Pure: no I/O,
no clock (time comes in), no state but what goes in and comes out (``PlannerState``).

Each pool on its own resource, so one pool's load never scales the other (llm-d scaled by one signal for
both roles and left prefill alone under prefill-heavy load):
  prefill: the fewest workers whose predicted TTFT (``PrefillProfile.ttft_s``, the prompt-token load shared
           evenly) is within the target;
  decode:  the fewest workers whose steady running batch b, from Little's law b = (rate / n) x output tokens x
           TPOT(b), stays within the largest batch whose TPOT meets the target (so the requirement is
           n >= rate x output tokens x TPOT(b*) / b*; no fixed TPOT is assumed, which over-scales decode).
Stabilised against flapping (Dynamo's planner oscillated): the count needed for the SLO itself is applied at
once when above the current one; a lower count must also meet the SLO with a margin (``band``: the latency
predicted for it within (1 - band) x SLO) and be wanted for ``cooldown_s`` without a break, and then the pool
shrinks by one replica, after which the cool-down starts again. No scale-down while the observed p90 breaks
the SLO. Noise that moves the prediction inside the band changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from services.planner.load import ClusterLoad, PoolLoad
from services.planner.profile import DecodeProfile, PrefillProfile, Profile


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class PoolLimits:
    """Invariant: 0 <= min_replicas <= max_replicas."""

    min_replicas: int
    max_replicas: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min <= max replicas, got {self.min_replicas}..{self.max_replicas}")

    def clamp(self, count: int) -> int:
        return min(max(count, self.min_replicas), self.max_replicas)


@dataclass(frozen=True)
class Policy:
    slo: Slo
    prefill: PoolLimits
    decode: PoolLimits
    cooldown_s: float
    band: float = 0.2

    def limits(self, role: str) -> PoolLimits:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class PoolState:
    """The count the planner last set for a pool, and since when a lower count has been wanted (None: not)."""

    replicas: int
    down_since: float | None = None


@dataclass(frozen=True)
class PlannerState:
    prefill: PoolState
    decode: PoolState

    @staticmethod
    def from_load(load: ClusterLoad) -> PlannerState:
        """Start from the replicas running now."""
        return PlannerState(PoolState(load.prefill.replicas), PoolState(load.decode.replicas))


REASON_KINDS = ("clamped", "up", "hold", "hold_observed", "hold_cooldown", "down")


@dataclass(frozen=True)
class Decision:
    """One pool's decision: `current` (the count before), `desired` (after), why; `kind` is the reason's kind,
    one of ``REASON_KINDS`` (a bounded label value for metrics, where `reason` is free text)."""

    role: str
    current: int
    desired: int
    reason: str
    kind: str = "hold"

    @property
    def changed(self) -> bool:
        return self.desired != self.current


# ---------------------------------------------------------------------------------------------------- predictions


def prefill_ttft_s(profile: PrefillProfile, load: PoolLoad, replicas: int) -> float:
    """Predicted TTFT with the prompt-token load shared by `replicas` workers (inf for none under load)."""
    if replicas <= 0:
        return math.inf if load.request_rate > 0 else 0.0
    return profile.ttft_s(load.mean_prompt_tokens, load.prompt_tokens_per_s / replicas)


def decode_tpot_s(profile: DecodeProfile, load: PoolLoad, replicas: int, tpot_target_s: float) -> float:
    """Predicted TPOT at `replicas` workers: TPOT at the steady batch b = (rate / n) x output x TPOT(b); inf when
    that batch would pass the largest one within `tpot_target_s` (no steady state within the target)."""
    streams_per_s = load.request_rate * load.mean_output_tokens  # output tokens a second, the pool's demand
    if streams_per_s <= 0:
        return profile.tpot_s(0.0)
    best = profile.max_batch_within(tpot_target_s)
    if replicas <= 0 or best <= 0 or streams_per_s / replicas * profile.tpot_s(best) > best:
        return math.inf
    lo, hi = 0.0, best  # b - c TPOT(b) < 0 at 0 and >= 0 at best: bisect to the crossing
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < streams_per_s / replicas * profile.tpot_s(mid) else (lo, mid)
    return profile.tpot_s(hi)


def predicted_s(profile: Profile, role: str, load: PoolLoad, replicas: int, target_s: float) -> float:
    if role == "prefill":
        return prefill_ttft_s(profile.prefill, load, replicas)
    return decode_tpot_s(profile.decode, load, replicas, target_s)


def needed_replicas(profile: Profile, role: str, load: PoolLoad, limits: PoolLimits, target_s: float) -> int:
    """The fewest replicas in [min, max] whose predicted latency is within `target_s` (max when none is)."""
    for count in range(limits.min_replicas, limits.max_replicas + 1):
        if predicted_s(profile, role, load, count, target_s) <= target_s:
            return count
    return limits.max_replicas


# ---------------------------------------------------------------------------------------------------- decisions


def decide_pool(profile: Profile, policy: Policy, role: str, load: PoolLoad, state: PoolState,
                now: float) -> tuple[Decision, PoolState]:
    """One pool's next count and state (see the module docstring for the rules)."""
    limits = policy.limits(role)
    slo_s = policy.slo.ttft_s if role == "prefill" else policy.slo.tpot_s
    current = state.replicas
    if limits.clamp(current) != current:
        desired = limits.clamp(current)
        reason = f"clamped to [{limits.min_replicas}, {limits.max_replicas}]"
        return Decision(role, current, desired, reason, "clamped"), PoolState(desired)
    needed = needed_replicas(profile, role, load, limits, slo_s)
    if needed > current:
        reason = _why(profile, role, load, current, needed, slo_s)
        return Decision(role, current, needed, reason, "up"), PoolState(needed)
    relaxed = needed_replicas(profile, role, load, limits, slo_s * (1 - policy.band))
    if relaxed >= current:
        reason = f"hold: {current} needed ({_metric(role)} SLO {slo_s * 1e3:g} ms with a {policy.band:.0%} margin)"
        return Decision(role, current, current, reason, "hold"), PoolState(current)
    return _scale_down(policy, role, load, state, now, relaxed, slo_s)


def _scale_down(policy: Policy, role: str, load: PoolLoad, state: PoolState, now: float, relaxed: int,
                slo_s: float) -> tuple[Decision, PoolState]:
    """`relaxed` < current replicas would do, with margin: shrink by one once wanted for the whole cool-down."""
    current = state.replicas
    observed = load.ttft_p90_s if role == "prefill" else load.tpot_p90_s
    if observed is not None and observed > slo_s:
        reason = f"hold: {relaxed} would do but observed {_metric(role)} p90 {observed * 1e3:.0f} ms > SLO"
        return Decision(role, current, current, reason, "hold_observed"), PoolState(current)
    since = now if state.down_since is None else state.down_since
    if now - since < policy.cooldown_s:
        reason = f"hold: {relaxed} would do; cool-down {now - since:.0f}/{policy.cooldown_s:g} s"
        return Decision(role, current, current, reason, "hold_cooldown"), replace(state, down_since=since)
    reason = f"down by one: {relaxed} would do for {now - since:.0f} s (cool-down {policy.cooldown_s:g} s)"
    return Decision(role, current, current - 1, reason, "down"), PoolState(current - 1, down_since=now)


def _metric(role: str) -> str:
    return "TTFT" if role == "prefill" else "TPOT"


def _why(profile: Profile, role: str, load: PoolLoad, current: int, needed: int, slo_s: float) -> str:
    at_current = _ms(predicted_s(profile, role, load, current, slo_s))
    at_needed = _ms(predicted_s(profile, role, load, needed, slo_s))
    return f"up: predicted {_metric(role)} {at_current} at {current} > SLO {slo_s * 1e3:g} ms; {at_needed} at {needed}"


def _ms(seconds: float) -> str:
    return "unbounded (over capacity)" if math.isinf(seconds) else f"{seconds * 1e3:.0f} ms"


def decide(profile: Profile, policy: Policy, load: ClusterLoad,
           state: PlannerState) -> tuple[tuple[Decision, Decision], PlannerState]:
    """Both pools' decisions at `load.at`, and the state the next call takes."""
    prefill, prefill_state = decide_pool(profile, policy, "prefill", load.prefill, state.prefill, load.at)
    decode, decode_state = decide_pool(profile, policy, "decode", load.decode, state.decode, load.at)
    return (prefill, decode), PlannerState(prefill_state, decode_state)
