"""A per-key rate limit: a token bucket for each API key, refilled at `per_minute / 60` tokens a second.

A key may send `burst` requests at once and `per_minute` a minute on average; past that the server answers
429 with a Retry-After header saying when the next request will be accepted.

`RateLimiter` keeps the buckets in memory (one process). `SharedRateLimiter` keeps them in the store the
API keys live in, so several server processes, on one machine or many, spend one bucket per key: each
take is one conditional UPDATE, atomic in SQLite and PostgreSQL alike, so no two servers spend a token twice.
"""

from __future__ import annotations

import math
import threading
import time

from sqlalchemy import Engine, Float, String, text
from sqlalchemy.orm import Mapped, mapped_column

from forgeml.store import Base


def _rate_and_burst(per_minute: float, burst: int | None) -> tuple[float, float]:
    """Tokens a second, and the bucket's size (default: ten seconds' worth, at least one)."""
    if per_minute <= 0:
        raise ValueError(f"per_minute must be > 0, got {per_minute}")
    rate = per_minute / 60.0
    return rate, float(burst if burst is not None else max(1, math.floor(rate * 10)))


class RateLimiter:
    def __init__(self, per_minute: float, burst: int | None = None):
        self.rate, self.burst = _rate_and_burst(per_minute, burst)
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


class RateBucket(Base):
    __tablename__ = "rate_limit_buckets"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)  # Unix time: servers on several machines share the clock


# The bucket's level now, at most full: the same expression in SQLite and PostgreSQL (no LEAST/MIN).
_LEVEL = "CASE WHEN tokens + (:now - updated) * :rate > :burst THEN :burst ELSE tokens + (:now - updated) * :rate END"


class SharedRateLimiter:
    """`RateLimiter` with its buckets in the database at `engine`: one limit per key across every server."""

    def __init__(self, engine: Engine, per_minute: float, burst: int | None = None):
        self.engine = engine
        self.rate, self.burst = _rate_and_burst(per_minute, burst)
        Base.metadata.create_all(engine, tables=[RateBucket.__table__])

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """0 if `key` may go ahead now (and `cost` tokens are spent), else the seconds until it may."""
        cost = min(cost, self.burst)
        values = {"key": key, "now": time.time(), "rate": self.rate, "burst": self.burst, "cost": cost}
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO rate_limit_buckets (key_id, tokens, updated) VALUES (:key, :burst, :now) "
                    "ON CONFLICT (key_id) DO NOTHING"
                ),
                values,
            )
            taken = connection.execute(
                text(
                    f"UPDATE rate_limit_buckets SET tokens = {_LEVEL} - :cost, updated = :now "
                    f"WHERE key_id = :key AND {_LEVEL} >= :cost"
                ),
                values,
            )
            if taken.rowcount == 1:
                return 0.0
            level = connection.execute(
                text(f"SELECT {_LEVEL} FROM rate_limit_buckets WHERE key_id = :key"), values
            ).scalar_one()
        return max(0.0, (cost - float(level)) / self.rate)
