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

Reacting to what is observed (``Reaction``), as Dynamo's planner does, without its failures:
  correction: per pool, c = observed p50 / predicted latency at the observed load and the current count (TTFT
           for prefill, TPOT for decode), clamped to [low, high] and smoothed (EWMA, weight ``alpha`` on the new
           ratio). A prediction p at n replicas counts as c x p, so a pool slower than its profile scales earlier
           and a faster one later. A count meets a target T iff its raw prediction meets T / c.
  queue growth: a prefill pool whose queued prompt tokens (its workers' waiting requests x the mean prompt)
           rose at each of the last ``queue_intervals`` settled observations is short of capacity whatever the
           profile says: one more replica (and no scale-down while it grows). The count it left is remembered
           as at least as slow as the SLO (factor SLO / predicted there), so rule 4 applies to it too.
The rules that keep the correction from flapping or over-scaling:
  1. Settled observations only. A count change (the planner's, or one adopted from the actuator) marks the
     pool unsettled; observations update the correction and the queue history only once the pool has run at
     its count for ``settle_s`` and the replicas observed equal it (so no window mixes two counts and no
     starting worker's cold start is learned: Dynamo #2511 over-compensated for cold starts).
  2. The factor belongs to the count it was measured at. After a count change it is carried over as
     provisional until the first settled observation at the new count re-estimates it (the EWMA continues
     from the carried value). A provisional factor only holds: it never drives a scale-up, and it counts
     for a scale-down only when above 1 (it can make the planner keep replicas, never shed them).
  3. The correction moves a pool up by at most one replica beyond what the raw profile needs per settled
     estimate (a factor measured at n is extrapolated to n + 1 only; Dynamo #12430 over-scaled decode by
     extrapolating far), then it is re-measured there before the next step. Likewise a factor below 1 holds a
     scale-up back by at most one replica below the profile's count.
  4. A scale-down to m replicas is judged with the larger of the current factor and the factor last confirmed
     at m (``by_count``): having left m because it was slower than predicted, the pool returns to it only if
     the load fell enough for m to meet the SLO with that slowness (Dynamo #9294: 2 <-> 1 oscillation when a
     scale-down ignored how the survivors would fare).
The hysteresis band, cool-down and the observed-p90 guard apply to corrected predictions as to raw ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
class Reaction:
    """How observations correct the profile (see the module docstring). Invariant: 0 < low <= 1 <= high,
    0 < alpha <= 1, queue_intervals >= 1."""

    enabled: bool = True
    low: float = 0.5
    high: float = 4.0
    alpha: float = 0.5
    settle_s: float = 60.0
    queue_intervals: int = 3

    def __post_init__(self) -> None:
        if not (0 < self.low <= 1 <= self.high and 0 < self.alpha <= 1 and self.queue_intervals >= 1):
            raise ValueError(f"bad correction settings: {self}")

    def clamp(self, factor: float) -> float:
        return min(max(factor, self.low), self.high)


@dataclass(frozen=True)
class Policy:
    slo: Slo
    prefill: PoolLimits
    decode: PoolLimits
    cooldown_s: float
    band: float = 0.2
    reaction: Reaction = Reaction()

    def limits(self, role: str) -> PoolLimits:
        return self.prefill if role == "prefill" else self.decode

    def slo_s(self, role: str) -> float:
        return self.slo.ttft_s if role == "prefill" else self.slo.tpot_s


@dataclass(frozen=True)
class PoolState:
    """The count the planner last set for a pool, since when a lower count has been wanted (None: not), and what
    it learned from observations: the correction factor (``confirmed``: measured at this count since it last
    changed), when the count last changed (None: before the planner started), the factor last confirmed at each
    count, and the queued prompt tokens of the last settled observations (oldest first)."""

    replicas: int
    down_since: float | None = None
    correction: float = 1.0
    confirmed: bool = False
    changed_at: float | None = None
    by_count: tuple[tuple[int, float], ...] = ()
    queued: tuple[float, ...] = ()
    prompt_tokens: float = 0.0  # the last mean prompt length observed: a window that finishes nothing has none

    def moved_to(self, replicas: int, now: float, down_since: float | None = None) -> PoolState:
        """The state after the count changed to `replicas`: unsettled, the factor provisional (rules 1, 2)."""
        return replace(self, replicas=replicas, down_since=down_since, confirmed=False, changed_at=now, queued=())

    def factor_at(self, count: int) -> float | None:
        return dict(self.by_count).get(count)


@dataclass(frozen=True)
class PlannerState:
    prefill: PoolState
    decode: PoolState

    @staticmethod
    def from_load(load: ClusterLoad) -> PlannerState:
        """Start from the replicas running now."""
        return PlannerState(PoolState(load.prefill.replicas), PoolState(load.decode.replicas))


REASON_KINDS = ("clamped", "up", "up_correction", "up_queue", "hold", "hold_observed", "hold_cooldown", "down")


@dataclass(frozen=True)
class Decision:
    """One pool's decision: `current` (the count before), `desired` (after), why; `kind` is the reason's kind,
    one of ``REASON_KINDS`` (a bounded label value for metrics, where `reason` is free text): ``up_correction``
    when the correction factor asked for more than the raw profile, ``up_queue`` when the queue growth did."""

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


def needed_replicas(profile: Profile, role: str, load: PoolLoad, limits: PoolLimits, target_s: float,
                    factor: Callable[[int], float] = lambda count: 1.0) -> int:
    """The fewest replicas in [min, max] whose predicted latency, times `factor(count)`, is within `target_s`
    (max when none is)."""
    for count in range(limits.min_replicas, limits.max_replicas + 1):
        scaled_target = target_s / factor(count)
        if predicted_s(profile, role, load, count, scaled_target) <= scaled_target:
            return count
    return limits.max_replicas


# ---------------------------------------------------------------------------------------------------- observations


def settled(policy: Policy, load: PoolLoad, state: PoolState, now: float) -> bool:
    """Rule 1: the pool has run at its count for ``settle_s`` and the replicas observed are that count."""
    waited = state.changed_at is None or now - state.changed_at >= policy.reaction.settle_s
    return waited and load.replicas == state.replicas


def observed_ratio(profile: Profile, role: str, load: PoolLoad, replicas: int) -> float | None:
    """Observed p50 / predicted latency at the observed load and `replicas` (None: no latency, no load, or a
    prediction that is not a finite positive number, as past a prefill worker's ``max_utilisation``)."""
    observed = load.ttft_p50_s if role == "prefill" else load.tpot_p50_s
    if observed is None or load.request_rate <= 0:
        return None
    predicted = predicted_s(profile, role, load, replicas, math.inf)  # decode: up to the KV limit, not the SLO
    return observed / predicted if 0 < predicted < math.inf else None


def learn(profile: Profile, policy: Policy, role: str, load: PoolLoad, state: PoolState, now: float) -> PoolState:
    """The state after one observation: the correction and the queue history updated when settled."""
    reaction = policy.reaction
    if not reaction.enabled or not settled(policy, load, state, now):
        return state
    # A stuck pool finishes no prompt in the window, so its mean prompt is unknown: the last one seen stands in,
    # else its waiting requests would count as no queued tokens just when the queue matters most.
    prompt = load.mean_prompt_tokens or state.prompt_tokens
    queued = (*state.queued, load.waiting * prompt)[-(reaction.queue_intervals + 1):]
    state = replace(state, queued=queued if role == "prefill" else (), prompt_tokens=prompt)
    ratio = observed_ratio(profile, role, load, state.replicas)
    if ratio is None:
        return state
    factor = (1 - reaction.alpha) * state.correction + reaction.alpha * reaction.clamp(ratio)
    by_count = tuple(sorted({**dict(state.by_count), state.replicas: factor}.items()))
    return replace(state, correction=factor, confirmed=True, by_count=by_count)


def queue_growing(policy: Policy, state: PoolState) -> bool:
    """The queued prompt tokens rose at each of the last ``queue_intervals`` settled observations."""
    queued = state.queued
    rising = all(b > a for a, b in zip(queued, queued[1:]))
    return len(queued) > policy.reaction.queue_intervals and rising


# ---------------------------------------------------------------------------------------------------- decisions


def decide_pool(profile: Profile, policy: Policy, role: str, load: PoolLoad, state: PoolState,
                now: float) -> tuple[Decision, PoolState]:
    """One pool's next count and state (see the module docstring for the rules)."""
    limits = policy.limits(role)
    current = state.replicas
    if limits.clamp(current) != current:
        desired = limits.clamp(current)
        reason = f"clamped to [{limits.min_replicas}, {limits.max_replicas}]"
        return Decision(role, current, desired, reason, "clamped"), state.moved_to(desired, now)
    state = learn(profile, policy, role, load, state, now)
    up = _scale_up(profile, policy, role, load, state)
    if up is not None:
        if up.kind == "up_queue":
            state = _short_at_current(profile, policy, role, load, state)
        return up, state.moved_to(up.desired, now)
    slo_s = policy.slo_s(role)
    relaxed = needed_replicas(profile, role, load, limits, slo_s * (1 - policy.band), _hold_factor(state))
    if relaxed >= current:
        reason = f"hold: {current} needed ({_metric(role)} SLO {slo_s * 1e3:g} ms with a {policy.band:.0%} margin)"
        return Decision(role, current, current, reason + _noting(state), "hold"), replace(state, down_since=None)
    return _scale_down(policy, role, load, state, now, relaxed, slo_s)


def _up_factor(state: PoolState) -> float:
    """Rule 2: only a factor confirmed at this count drives a scale-up."""
    return state.correction if state.confirmed else 1.0


def _hold_factor(state: PoolState) -> Callable[[int], float]:
    """Rules 2 and 4: the factor a lower count is judged with."""
    factor = state.correction if state.confirmed else max(state.correction, 1.0)
    return lambda count: max(factor, state.factor_at(count) or factor)


def _scale_up(profile: Profile, policy: Policy, role: str, load: PoolLoad, state: PoolState) -> Decision | None:
    """The decision to grow, if the profile, the correction (rule 3) or the queue growth asks for it."""
    limits, slo_s, current = policy.limits(role), policy.slo_s(role), state.replicas
    factor = _up_factor(state)
    raw = needed_replicas(profile, role, load, limits, slo_s)
    corrected = needed_replicas(profile, role, load, limits, slo_s, lambda count: factor)
    target = max(raw, min(corrected, current + 1)) if factor > 1 else max(corrected, raw - 1)
    if target > current:
        kind = "up_correction" if target > raw else "up"
        why = _why(profile, role, load, state, target, slo_s)
        if corrected > target:
            why += f"; corrected, {corrected} after re-measuring at {target}"
        return Decision(role, current, target, why if target <= raw else f"{why} (the profile alone: {raw})", kind)
    if queue_growing(policy, state) and current < limits.max_replicas:
        trail = " -> ".join(f"{tokens:.0f}" for tokens in state.queued)
        reason = f"up by one: queued prompt tokens rose for {len(state.queued) - 1} intervals ({trail})"
        return Decision(role, current, current + 1, reason + _noting(state), "up_queue")
    return None


def _short_at_current(profile: Profile, policy: Policy, role: str, load: PoolLoad, state: PoolState) -> PoolState:
    """The queue grew at this count, so its latency was past the SLO whatever the prediction: remember at least
    the factor that puts it there (rule 4 then keeps the pool from returning here at this load)."""
    predicted = predicted_s(profile, role, load, state.replicas, math.inf)
    if not 0 < predicted < math.inf:
        return state
    factor = policy.reaction.clamp(max(policy.slo_s(role) / predicted, state.factor_at(state.replicas) or 0.0))
    return replace(state, by_count=tuple(sorted({**dict(state.by_count), state.replicas: factor}.items())))


def _scale_down(policy: Policy, role: str, load: PoolLoad, state: PoolState, now: float, relaxed: int,
                slo_s: float) -> tuple[Decision, PoolState]:
    """`relaxed` < current replicas would do, with margin: shrink by one once wanted for the whole cool-down."""
    current = state.replicas
    observed = load.ttft_p90_s if role == "prefill" else load.tpot_p90_s
    if observed is not None and observed > slo_s:
        reason = f"hold: {relaxed} would do but observed {_metric(role)} p90 {observed * 1e3:.0f} ms > SLO"
        return Decision(role, current, current, reason, "hold_observed"), replace(state, down_since=None)
    if queue_growing(policy, state):
        reason = f"hold: {relaxed} would do but the queue keeps growing (at the max, {current})"
        return Decision(role, current, current, reason, "hold_observed"), replace(state, down_since=None)
    since = now if state.down_since is None else state.down_since
    if now - since < policy.cooldown_s:
        reason = f"hold: {relaxed} would do; cool-down {now - since:.0f}/{policy.cooldown_s:g} s" + _noting(state)
        return Decision(role, current, current, reason, "hold_cooldown"), replace(state, down_since=since)
    reason = f"down by one: {relaxed} would do for {now - since:.0f} s (cool-down {policy.cooldown_s:g} s)"
    return Decision(role, current, current - 1, reason + _noting(state), "down"), state.moved_to(current - 1, now,
                                                                                                 down_since=now)


def _metric(role: str) -> str:
    return "TTFT" if role == "prefill" else "TPOT"


def _noting(state: PoolState) -> str:
    """The correction in force, when there is one, for the reason's text."""
    if state.correction == 1.0:
        return ""
    return f" [correction x{state.correction:.2f}{'' if state.confirmed else ', provisional'}]"


def _why(profile: Profile, role: str, load: PoolLoad, state: PoolState, needed: int, slo_s: float) -> str:
    factor, current = _up_factor(state), state.replicas
    at_current = _ms(factor * predicted_s(profile, role, load, current, slo_s / factor))
    at_needed = _ms(factor * predicted_s(profile, role, load, needed, slo_s / factor))
    predicted = f"predicted {_metric(role)}" if factor == 1.0 else f"corrected {_metric(role)} (x{factor:.2f})"
    return f"up: {predicted} {at_current} at {current} > SLO {slo_s * 1e3:g} ms; {at_needed} at {needed}"


def _ms(seconds: float) -> str:
    return "unbounded (over capacity)" if math.isinf(seconds) else f"{seconds * 1e3:.0f} ms"


def decide(profile: Profile, policy: Policy, load: ClusterLoad,
           state: PlannerState) -> tuple[tuple[Decision, Decision], PlannerState]:
    """Both pools' decisions at `load.at`, and the state the next call takes."""
    prefill, prefill_state = decide_pool(profile, policy, "prefill", load.prefill, state.prefill, load.at)
    decode, decode_state = decide_pool(profile, policy, "decode", load.decode, state.decode, load.at)
    return (prefill, decode), PlannerState(prefill_state, decode_state)
