"""Drift of what a server answers, checked in the background and published as Prometheus gauges.

Every `serve.drift_every_s` seconds the newest `serve.drift_window` predictions the primary version
stored are compared with its training data by `forgeml.monitor.DriftMonitor`, on one lowest-priority
thread: never on a request's path. The monitor (its reference statistics, built on first use) is kept
until the primary version changes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from forgeml.serve.batching import lowest_priority

logger = logging.getLogger(__name__)


class DriftGauges:
    """The watcher and its gauges: `forgeml_drift_detected`, `forgeml_drift_p_value{test}`,
    `forgeml_drift_psi{feature}`, `forgeml_drift_rows`, `forgeml_drift_checks_total{outcome}`."""

    def __init__(self, registry: CollectorRegistry, db_url: str, window: int):
        self.db_url, self.window = db_url, window
        self.detected = Gauge(
            "forgeml_drift_detected", "1 when the newest window drifted", ["version"], registry=registry
        )
        self.p_value = Gauge(
            "forgeml_drift_p_value", "Holm-adjusted p-value per drift test", ["version", "test"], registry=registry
        )
        self.psi = Gauge(
            "forgeml_drift_psi", "Population stability index per feature", ["version", "feature"], registry=registry
        )
        self.rows = Gauge(
            "forgeml_drift_rows", "Served rows in the newest window checked", ["version"], registry=registry
        )
        self.checks = Counter("forgeml_drift_checks", "Background drift checks", ["outcome"], registry=registry)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="forgeml-drift", initializer=lowest_priority
        )
        self._monitor: Any = None
        self._version: str | None = None

    async def watch(self, runtime_of: Any, every_s: float) -> None:
        """Check every `every_s` seconds the version `runtime_of()` returns, until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(every_s)
                runtime = runtime_of()
                try:
                    result = await loop.run_in_executor(self._executor, self._check, runtime)
                except Exception:  # a failing check is counted and logged; serving goes on
                    logger.exception("background drift check failed")
                    self.checks.labels("failed").inc()
                    continue
                if result is None:
                    self.checks.labels("too_few_rows").inc()
                    continue
                self._publish(runtime.version, result)
                self.checks.labels("done").inc()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _check(self, runtime: Any) -> dict[str, Any] | None:
        from forgeml.monitor import DriftMonitor, served_rows
        from forgeml.monitor.monitor import MIN_ROWS

        if self._monitor is None or self._version != runtime.version:
            self._monitor, self._version = DriftMonitor(runtime.predictor), runtime.version
        inputs, answers, _ = served_rows(self.db_url, runtime.name, version=runtime.version, limit=self.window)
        if len(inputs) < MIN_ROWS:
            return None
        return self._monitor.check(inputs, answers)

    def _publish(self, version: str, result: dict[str, Any]) -> None:
        self.detected.clear()
        self.p_value.clear()
        self.psi.clear()
        self.rows.clear()
        self.detected.labels(version).set(1.0 if result["drift"] else 0.0)
        self.rows.labels(version).set(result["rows"])
        from forgeml.monitor import tests_by_name

        for name, test in tests_by_name(result).items():
            self.p_value.labels(version, name).set(test["p_adjusted"])
            if test.get("psi") is not None and name.startswith("feature:"):
                self.psi.labels(version, name.removeprefix("feature:")).set(test["psi"])
