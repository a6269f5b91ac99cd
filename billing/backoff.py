"""Exponential backoff with jitter, for every outbound call that retries (Stripe, alerts)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits base x 2^(n-1), capped, x [0.5, 1)."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, failed_attempts: int, rng: random.Random) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (failed_attempts - 1))
        return ceiling * (0.5 + rng.random() / 2)
