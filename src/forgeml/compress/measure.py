"""How good and how fast a variant is: test metrics, latency at batch 1, throughput at batch 32."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from forgeml.evaluate.metrics import scalar_metrics
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks.base import EncodedSplit, Task

WARMUP_CALLS = 5


@torch.inference_mode()
def latency_ms(runtime: Any, split: EncodedSplit, rows: int) -> dict[str, float]:
    """p50/p95 milliseconds of single-row calls over the first `rows` rows (after a few warm-up calls)."""
    count = min(rows, len(split))
    for index in range(min(WARMUP_CALLS, count)):
        runtime(**split.batch([index])[0])
    times = []
    for index in range(count):
        inputs, _ = split.batch([index])
        started = time.perf_counter()
        runtime(**inputs)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)), "calls": count}


def throughput(runtime: Any, split: EncodedSplit, rows: int, batch_size: int = 32) -> float:
    """Rows per second over the first `rows` rows in length-grouped batches of `batch_size`."""
    subset = _Head(split, rows)
    model_outputs(runtime, _Head(split, batch_size), batch_size)  # warm-up
    started = time.perf_counter()
    model_outputs(runtime, subset, batch_size)
    return len(subset) / (time.perf_counter() - started)


def measure(task: Task, runtime: Any, test: EncodedSplit, latency_rows: int, throughput_rows: int) -> dict[str, Any]:
    """Test-split metrics, batch-1 latency and batch-32 throughput of one variant."""
    outputs, targets = model_outputs(runtime, test)
    return {
        "metrics": scalar_metrics(task.metrics(outputs, targets)),
        "latency_ms": latency_ms(runtime, test, latency_rows),
        "throughput_rows_per_s": throughput(runtime, test, throughput_rows),
    }


class _Head:
    """The first `count` rows of an encoded split, for timing on a fixed, small workload."""

    def __init__(self, split: EncodedSplit, count: int):
        self.split, self.count = split, min(count, len(split))
        self.lengths = split.lengths[: self.count]

    def __len__(self) -> int:
        return self.count

    def batch(self, rows: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return self.split.batch(rows)
