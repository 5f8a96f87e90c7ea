"""A request's speculation back-off state (kept on the Request; see common/engine/spec/speculator.py)."""

from __future__ import annotations

from dataclasses import dataclass

MISSES_BEFORE_BACKOFF = 4
MIN_COOLDOWN_STEPS = 16
MAX_COOLDOWN_STEPS = 256
ACCEPTED_EWMA_WEIGHT = 0.3  # of each new verification in a request's expected accepted drafts


@dataclass
class SpeculationState:
    """One request's back-off bookkeeping."""

    misses: int = 0  # verification (or proposal) steps in a row that gained nothing
    cooldown: int = 0  # scheduled steps left without speculating
    next_cooldown: int = MIN_COOLDOWN_STEPS
    expected_accepted: float = 1.0  # drafts a verification accepts (moving mean; optimistic until measured)

    def observe(self, num_accepted: int) -> None:
        self.expected_accepted += ACCEPTED_EWMA_WEIGHT * (num_accepted - self.expected_accepted)

    def miss(self) -> bool:
        """A verification (or lookup) that gained nothing; True when this one starts a cool-down."""
        self.misses += 1
        if self.misses < MISSES_BEFORE_BACKOFF:
            return False
        self.hold_back()
        return True

    def hold_back(self) -> None:
        """Stop speculating for a cool-down (doubling each time up to MAX_COOLDOWN_STEPS)."""
        self.misses = 0
        self.cooldown = self.next_cooldown
        self.next_cooldown = min(2 * self.next_cooldown, MAX_COOLDOWN_STEPS)
