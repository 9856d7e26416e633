"""A closed-loop load generator: `concurrency` clients, each sending its next request as soon as the last
one is answered, over keep-alive connections. Used by the reliability tests and the serving benchmark.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Exchange:
    """One request and its answer: `status` 0 means the connection failed (`error` says how)."""

    index: int
    status: int
    seconds: float
    body: Any = None
    error: str = ""


@dataclass
class LoadResult:
    exchanges: list[Exchange] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return len(self.exchanges) / self.seconds if self.seconds else 0.0

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for exchange in self.exchanges:
            counts[exchange.status] = counts.get(exchange.status, 0) + 1
        return dict(sorted(counts.items()))

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile([e.seconds for e in self.exchanges], percentile) * 1000) if self.exchanges else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.exchanges),
            "seconds": round(self.seconds, 2),
            "requests_per_second": round(self.requests_per_second, 1),
            "p50_ms": round(self.latency_ms(50), 1),
            "p95_ms": round(self.latency_ms(95), 1),
            "p99_ms": round(self.latency_ms(99), 1),
            "statuses": self.statuses(),
        }


def closed_loop(
    port: int,
    request: Callable[[int], tuple[str, str, dict[str, Any] | None, dict[str, str]]],
    concurrency: int,
    total: int | None = None,
    duration_s: float | None = None,
    keep_bodies: bool = False,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Send `request(i)` = (method, path, JSON body, headers) for i = 0, 1, ... until `total` requests were
    sent or `duration_s` passed, from `concurrency` threads. Every exchange is recorded, failures included.
    """
    if (total is None) == (duration_s is None):
        raise ValueError("give either total or duration_s")
    counter = iter(range(total if total is not None else 1 << 62))
    lock = threading.Lock()
    result = LoadResult()
    started = time.perf_counter()
    deadline = started + duration_s if duration_s is not None else float("inf")

    def next_index() -> int | None:
        with lock:
            if time.perf_counter() >= deadline:
                return None
            return next(counter, None)

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        mine: list[Exchange] = []
        while (index := next_index()) is not None:
            method, path, body, headers = request(index)
            payload = None if body is None else json.dumps(body).encode("utf-8")
            sent = time.perf_counter()
            try:
                connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **headers})
                response = connection.getresponse()
                data = response.read()
                seconds = time.perf_counter() - sent
                try:
                    answer = json.loads(data) if keep_bodies and data else None
                except ValueError:  # not JSON (a plain-text error page): keep the text
                    answer = data.decode("utf-8", "replace")
                mine.append(Exchange(index, response.status, seconds, answer))
            except (OSError, http.client.HTTPException) as error:
                mine.append(Exchange(index, 0, time.perf_counter() - sent, error=f"{type(error).__name__}: {error}"))
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=120)
        connection.close()
        with lock:
            result.exchanges.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    result.exchanges.sort(key=lambda e: e.index)
    return result
