"""A request's speculation back-off state (kept on the Request; see common/engine/spec/speculator.py)."""

from __future__ import annotations

from dataclasses import dataclass

MISSES_BEFORE_BACKOFF = 4
MIN_COOLDOWN_STEPS = 16
MAX_COOLDOWN_STEPS = 256


@dataclass
class SpeculationState:
    """One request's back-off bookkeeping."""

    misses: int = 0  # verification (or proposal) steps in a row that gained nothing
    cooldown: int = 0  # scheduled steps left without speculating
    next_cooldown: int = MIN_COOLDOWN_STEPS
