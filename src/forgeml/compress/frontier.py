"""Measure every variant, draw the accuracy/latency frontier, and pick the default for serving.

The selected variant is the fastest at batch 1 (median latency) among those whose quality on the test
split is within `max_accuracy_drop` of the original's: accuracy for classifiers, the primary metric
(e.g. RMSE, lower is better) for regression.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from forgeml.compress.distill import distill
from forgeml.compress.measure import measure
from forgeml.compress.variants import Variant, build_variants
from forgeml.config import LOWER_IS_BETTER, CompressConfig, TrainConfig
from forgeml.evaluate.plots import plt, save_figure
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.workspace import atomic_write_json


def compress_model(
    task: Task,
    model: nn.Module,
    test: EncodedSplit,
    parity_rows: EncodedSplit,
    folder: Path,
    export_folder: Path,
    options: CompressConfig,
    training: tuple[EncodedSplit, EncodedSplit | None, TrainConfig] | None = None,
) -> dict[str, Any]:
    """Build, measure and compare the variants; write `compression.json` and `frontier.png` into `folder`.

    `training` (train split, validation split, the run's train settings) is needed for distillation;
    the distilled student is saved in `folder/student/` like a run's `model/`.
    """
    variants, parity = build_variants(task, model, parity_rows, export_folder, options.quantize)
    distilled = None
    if options.distill:
        if training is None:
            raise ValueError("compress_model: distillation needs the training splits")
        student, distilled = distill(task, model, training[0], training[1], training[2], options.distill)
        task.save(folder / "student", student)
        size = (folder / "student" / "model.safetensors").stat().st_size
        layers = options.distill.layers
        variants.append(Variant(f"distilled_{layers}_layers", student, size, f"student with {layers} layers"))
    metric = "accuracy" if hasattr(task.target, "classes") else task.primary_metric
    lower_is_better = metric in LOWER_IS_BETTER
    results = []
    for variant in variants:
        measured = measure(task, variant.runtime, test, options.latency_rows, options.throughput_rows)
        results.append({"name": variant.name, "description": variant.description, "bytes": variant.bytes, **measured})
    original = results[0]
    for result in results:
        change = result["metrics"][metric] - original["metrics"][metric]
        result["drop"] = (change if lower_is_better else -change) + 0.0  # + 0.0: no "-0.0000" for the original
        result["speedup_batch1"] = original["latency_ms"]["p50"] / result["latency_ms"]["p50"]
        result["speedup_batch32"] = result["throughput_rows_per_s"] / original["throughput_rows_per_s"]
        result["size_ratio"] = result["bytes"] / original["bytes"]
    tolerance = options.select.max_accuracy_drop
    eligible = [r for r in results if r["drop"] <= tolerance]
    selected = min(eligible, key=lambda r: r["latency_ms"]["p50"])  # the original is always eligible
    report = {
        "metric": metric,
        "rows": len(test),
        "tolerance": tolerance,
        "selected": selected["name"],
        "variants": results,
        "onnx_parity": parity,
        "distillation": distilled,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "compression.json", report)
    plot_frontier(report, folder / "frontier.png")
    return report


def plot_frontier(report: dict[str, Any], path: Path) -> Path:
    """Quality against batch-1 latency; marker area is the size on disk; the selected variant is ringed."""
    metric = report["metric"]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    largest = max(r["bytes"] for r in report["variants"])
    for result in report["variants"]:
        x, y = result["latency_ms"]["p50"], result["metrics"][metric]
        area = 60 + 900 * result["bytes"] / largest
        chosen = result["name"] == report["selected"]
        axis.scatter([x], [y], s=area, alpha=0.6, edgecolors="black" if chosen else "none", linewidths=2)
        axis.annotate(
            f"{result['name']}\n{result['bytes'] / 1e6:.1f} MB",
            (x, y),
            fontsize=8,
            xytext=(6, 6),
            textcoords="offset points",
        )
    axis.margins(x=0.15, y=0.2)  # room for the labels inside the axes
    axis.set_xlabel("median latency at batch 1 (ms)")
    axis.set_ylabel(f"{metric} on the test split")
    axis.set_title(f"Compression frontier (ringed: selected, within {report['tolerance']:g} of the original)")
    axis.title.set_fontsize(9)
    axis.grid(alpha=0.3)
    return save_figure(figure, path)
