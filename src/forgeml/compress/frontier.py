"""Measure every variant, draw the accuracy/latency frontier, and pick the default for serving.

The selected variant is the fastest at batch 1 (median latency) among those whose quality on the test
split is within `max_accuracy_drop` of the original's: accuracy for classifiers, the primary metric
(e.g. RMSE, lower is better) for regression.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from forgeml.compress.distill import distill, teach
from forgeml.compress.measure import measure
from forgeml.compress.prune import magnitude_prune, make_permanent, prune_attention_heads, prune_feed_forward
from forgeml.compress.variants import Variant, build_variants, onnx_int8_of
from forgeml.config import LOWER_IS_BETTER, CompressConfig, TrainConfig
from forgeml.evaluate.outputs import model_outputs
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
    calibration: EncodedSplit | None = None,
) -> dict[str, Any]:
    """Build, measure and compare the variants; write `compression.json` and `frontier.png` into `folder`.

    `training` (train split, validation split, the run's train settings) is needed for distillation and
    pruning; those variants are saved in `folder/<name>/` like a run's `model/`, so they can be served.
    `calibration` (training rows) makes the int8 export by static quantization (see `export.quantize_int8`).
    """
    variants, parity = build_variants(task, model, parity_rows, export_folder, options.quantize, calibration)
    learned: dict[str, Any] = {}
    if options.distill or options.prune:
        if training is None:
            raise ValueError("compress_model: distillation and pruning need the training splits")
        trained, learned = _trained_variants(task, model, folder, options, training)
        variants += trained
        if options.quantize:  # the smaller models in int8 as well: the gains multiply
            variants += [onnx_int8_of(task, variant, parity_rows) for variant in trained]
    metric = "accuracy" if hasattr(task.target, "classes") else task.primary_metric
    lower_is_better = metric in LOWER_IS_BETTER
    results = []
    for variant in variants:
        measured = measure(task, variant.runtime, test, options.latency_rows, options.throughput_rows)
        where = {
            key: path.relative_to(folder.parent).as_posix()
            for key, path in (("file", variant.file), ("source", variant.source))
            if path is not None
        }
        result = {"name": variant.name, "description": variant.description, "bytes": variant.bytes, **where}
        results.append(
            {**result, **measured, "parity_passed": variant.parity_passed, "batch_invariant": variant.batch_invariant}
        )
    original = results[0]
    for result in results:
        change = result["metrics"][metric] - original["metrics"][metric]
        result["drop"] = (change if lower_is_better else -change) + 0.0  # + 0.0: no "-0.0000" for the original
        result["speedup_batch1"] = original["latency_ms"]["p50"] / result["latency_ms"]["p50"]
        result["speedup_batch32"] = result["throughput_rows_per_s"] / original["throughput_rows_per_s"]
        result["size_ratio"] = result["bytes"] / original["bytes"]
    tolerance = options.select.max_accuracy_drop
    selected = select_variant(results, tolerance, options.select.require_parity)
    report = {
        "metric": metric,
        "rows": len(test),
        "tolerance": tolerance,
        "selected": selected["name"],
        "variants": results,
        "onnx_parity": parity,
        **learned,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "compression.json", report)
    plot_frontier(report, folder / "frontier.png")
    return report


def select_variant(results: list[dict[str, Any]], tolerance: float, require_parity: bool = True) -> dict[str, Any]:
    """The fastest variant at batch 1 whose quality drop is within `tolerance` (and, with `require_parity`,
    whose int8 file passed its parity check). A variant whose answers depend on the rows batched with it
    (PyTorch dynamic int8) is never chosen: a server batches requests. The original always qualifies."""
    trusted = [r for r in results if (r["parity_passed"] or not require_parity) and r.get("batch_invariant", True)]
    eligible = [r for r in trusted if r["drop"] <= tolerance]
    return min(eligible, key=lambda r: r["latency_ms"]["p50"])


def _trained_variants(
    task: Task,
    model: nn.Module,
    folder: Path,
    options: CompressConfig,
    training: tuple[EncodedSplit, EncodedSplit | None, TrainConfig],
) -> tuple[list[Variant], dict[str, Any]]:
    """The variants that learn from the original: the distilled student and the pruned models."""
    variants: list[Variant] = []
    learned: dict[str, Any] = {}
    teacher_logits, _ = model_outputs(model, training[0], training[2].eval_batch_size)  # once, for all of them
    if options.distill:
        student, learned["distillation"] = distill(task, model, training, options.distill, teacher_logits)
        layers = options.distill.layers
        variants.append(_saved(task, student, folder / "student", f"distilled_{layers}_layers", f"{layers} layers"))
    prune_options = options.prune
    if prune_options and prune_options.sparsity:
        pruned = magnitude_prune(model, prune_options.sparsity)
        recovery = teach(
            task, model, pruned, training, prune_options.epochs, prune_options.lr, teacher_logits=teacher_logits
        )
        learned["magnitude_pruning"] = {"sparsity": make_permanent(pruned), **recovery}
        name = f"pruned_{round(100 * prune_options.sparsity)}pct"
        description = f"{learned['magnitude_pruning']['sparsity']:.0%} of weights zero"
        variants.append(_saved(task, pruned, folder / name, name, description))
    structured = [name for name in ("ffn_keep", "heads_keep") if prune_options and getattr(prune_options, name)]
    if structured and not hasattr(model, "encoder"):
        learned["structured_pruning"] = {"skipped": "neuron and head pruning are for transformer text models"}
        return variants, learned
    if "ffn_keep" in structured:
        narrow, width = prune_feed_forward(model, prune_options.ffn_keep)
        recovery = teach(
            task, model, narrow, training, prune_options.epochs, prune_options.lr, teacher_logits=teacher_logits
        )
        learned["ffn_pruning"] = {"intermediate_size": width, **recovery}
        name = f"ffn_pruned_{round(100 * prune_options.ffn_keep)}pct"
        variants.append(_saved(task, narrow, folder / name, name, f"feed-forward width {width}"))
    if "heads_keep" in structured:
        fewer, removed = prune_attention_heads(model, prune_options.heads_keep, _sample_batches(training))
        recovery = teach(
            task, model, fewer, training, prune_options.epochs, prune_options.lr, teacher_logits=teacher_logits
        )
        kept = fewer.encoder.encoder.layer[0].attention.self.num_attention_heads
        heads = kept + len(removed[0])
        learned["head_pruning"] = {"heads_kept": kept, "heads": heads, "removed": removed, **recovery}
        name = f"heads_pruned_{round(100 * prune_options.heads_keep)}pct"
        variants.append(_saved(task, fewer, folder / name, name, f"{kept} of {heads} attention heads per layer"))
    return variants, learned


def _sample_batches(training: tuple[EncodedSplit, EncodedSplit | None, TrainConfig], rows: int = 512):
    """Batches of the first `rows` training rows: what head importance is measured on."""
    split, _, train_config = training
    count, size = min(rows, len(split)), train_config.eval_batch_size
    return (split.batch(range(start, min(start + size, count)))[0] for start in range(0, count, size))


def _saved(task: Task, model: nn.Module, folder: Path, name: str, description: str) -> Variant:
    """A trained variant saved like a run's `model/` (servable later), measured by its weights' size."""
    task.save(folder, model)
    return Variant(name, model, (folder / "model.safetensors").stat().st_size, description, folder, folder)


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
