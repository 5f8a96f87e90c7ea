"""The router's own view of prefill load: prompt tokens it has in flight on each worker, and their measured rate.

With it the router predicts how long a new prompt would wait for its first token on a prefill worker (tokens
ahead of it plus its own, over the worker's measured rate) and on a decode worker prefilling for itself. The
counts are this router process's own: with several routers each sees its share of the load (the heartbeat's
running/waiting counts are too coarse and too late for this).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Below this many completed tokens a worker's rate is not trusted yet (the first prefills include warm-up).
MIN_TOKENS_FOR_RATE = 8192


@dataclass
class _WorkerLoad:
    tokens_in_flight: int = 0
    tokens_done: int = 0
    busy_s: float = 0.0
    busy_since: float | None = None


class PrefillLoad:
    """Per worker: prompt tokens sent and not yet answered, and tokens per second of busy time.

    Invariant: a worker is busy while it has tokens in flight; its rate is tokens finished over time busy, so
    idle gaps between requests do not dilute it and a batch of concurrent prompts counts once.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._workers: dict[str, _WorkerLoad] = {}

    def start(self, worker_id: str, tokens: int) -> None:
        load = self._workers.setdefault(worker_id, _WorkerLoad())
        if load.tokens_in_flight == 0:
            load.busy_since = self._clock()
        load.tokens_in_flight += tokens

    def finish(self, worker_id: str, tokens: int, completed: bool) -> None:
        """``tokens`` of ``start`` are answered; ``completed``: they count toward the measured rate."""
        load = self._workers.setdefault(worker_id, _WorkerLoad())
        load.tokens_in_flight = max(load.tokens_in_flight - tokens, 0)
        if completed:
            load.tokens_done += tokens
        if load.tokens_in_flight == 0 and load.busy_since is not None:
            load.busy_s += self._clock() - load.busy_since
            load.busy_since = None

    def tokens_in_flight(self, worker_id: str) -> int:
        load = self._workers.get(worker_id)
        return load.tokens_in_flight if load else 0

    def tokens_per_s(self, worker_id: str) -> float | None:
        """The measured rate, or None until MIN_TOKENS_FOR_RATE tokens were completed."""
        load = self._workers.get(worker_id)
        if load is None or load.tokens_done < MIN_TOKENS_FOR_RATE:
            return None
        busy = load.busy_s + (self._clock() - load.busy_since if load.busy_since is not None else 0.0)
        return load.tokens_done / busy if busy > 0 else None

    def predicted_wait_s(self, worker_id: str, tokens: int) -> float | None:
        """Seconds until ``tokens`` more would be prefilled on ``worker_id``; None while its rate is unknown."""
        rate = self.tokens_per_s(worker_id)
        return None if rate is None else (self.tokens_in_flight(worker_id) + tokens) / rate
