"""A per-key rate limit: a token bucket for each API key, refilled at `per_minute / 60` tokens a second.

A key may send `burst` requests at once and `per_minute` a minute on average; past that the server answers
429 with a Retry-After header saying when the next request will be accepted.
"""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    def __init__(self, per_minute: float, burst: int | None = None):
        if per_minute <= 0:
            raise ValueError(f"per_minute must be > 0, got {per_minute}")
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, math.floor(self.rate * 10)))
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when they were counted)
        self._lock = threading.Lock()  # the auth check runs in the server's thread pool

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """0 if `key` may go ahead now (and `cost` tokens are spent), else the seconds until it may.

        A cost above the burst is capped at the burst: such a request waits for a full bucket, not forever."""
        cost = min(cost, self.burst)
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate
