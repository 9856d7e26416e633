"""Drift of served inputs from a model's training data (`forgeml monitor`).

from forgeml.monitor import DriftMonitor, monitor_run
DriftMonitor("runs/sst2/latest").check(texts)          # one window, in memory
monitor_run("runs/sst2/latest", "sqlite:///forgeml.db", since=since_time("24h"), window=500)
"""

from forgeml.monitor.embeddings import TextPass, text_embeddings, text_pass
from forgeml.monitor.monitor import DriftMonitor, Reference, Window
from forgeml.monitor.report import monitor_run, tests_by_name, window_bounds, write_report
from forgeml.monitor.served import served_rows, since_time

__all__ = [
    "DriftMonitor",
    "Reference",
    "TextPass",
    "Window",
    "monitor_run",
    "served_rows",
    "since_time",
    "tests_by_name",
    "text_embeddings",
    "text_pass",
    "window_bounds",
    "write_report",
]
