"""Plots written as PNG files into a run's `plots/` folder (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt
import numpy as np

from forgeml.workspace import atomic_write_bytes


def save_figure(figure: plt.Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def class_balance(split_counts: dict[str, dict[str, int]], path: Path) -> Path:
    """Grouped bars: rows per class in each split."""
    classes = sorted({c for counts in split_counts.values() for c in counts})
    figure, axis = plt.subplots(figsize=(max(5, 0.8 * len(classes) + 3), 3.5))
    width = 0.8 / max(1, len(split_counts))
    positions = np.arange(len(classes))
    for offset, (split, counts) in enumerate(split_counts.items()):
        axis.bar(positions + offset * width, [counts.get(c, 0) for c in classes], width, label=split)
    axis.set_xticks(positions + width * (len(split_counts) - 1) / 2, classes, rotation=30 if len(classes) > 4 else 0)
    axis.set_ylabel("rows")
    axis.set_title("Class balance")
    axis.legend()
    return save_figure(figure, path)


def lengths(lengths_by_split: dict[str, list[int]], path: Path, unit: str = "tokens") -> Path:
    """Histogram of input lengths per split."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for split, values in lengths_by_split.items():
        axis.hist(values, bins=40, alpha=0.5, label=split)
    axis.set_xlabel(f"input length ({unit})")
    axis.set_ylabel("rows")
    axis.set_title("Input lengths")
    axis.legend()
    return save_figure(figure, path)


def confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, title: str = "Confusion matrix") -> Path:
    values = np.asarray(matrix)
    size = max(4, 0.6 * len(classes) + 2.5)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(values, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if values[i, j] > values.max() / 2 else "black"
            axis.text(j, i, str(values[i, j]), ha="center", va="center", color=color)
    axis.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 3 else 0)
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    return save_figure(figure, path)


def calibration(targets: np.ndarray, probabilities: np.ndarray, path: Path, bins: int = 10) -> Path:
    """Reliability diagram of the top-class confidence."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
    centers, accuracy = [], []
    for b in range(bins):
        if np.any(which == b):
            centers.append(confidence[which == b].mean())
            accuracy.append(correct[which == b].mean())
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    axis.plot(centers, accuracy, "o-", label="model")
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_title("Calibration")
    axis.legend()
    return save_figure(figure, path)


def regression_scatter(targets: np.ndarray, predicted: np.ndarray, path: Path) -> Path:
    """Predicted against true values, the ideal diagonal and the least-squares fitted line."""
    targets, predicted = np.asarray(targets, dtype=float), np.asarray(predicted, dtype=float)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(targets, predicted, s=8, alpha=0.5)
    low, high = float(min(targets.min(), predicted.min())), float(max(targets.max(), predicted.max()))
    axis.plot([low, high], [low, high], "--", color="grey", label="ideal")
    if len(targets) > 1 and np.ptp(targets) > 0:
        slope, intercept = np.polyfit(targets, predicted, 1)
        axis.plot(
            [low, high],
            [slope * low + intercept, slope * high + intercept],
            color="C3",
            label=f"fit: y = {slope:.2f}x + {intercept:.2f}",
        )
    axis.set_xlabel("true")
    axis.set_ylabel("predicted")
    axis.set_title("Predicted vs true")
    axis.legend()
    return save_figure(figure, path)


def training_curves(history: list[dict[str, Any]], metric: str, path: Path, unit: str = "step") -> Path:
    """Training loss per logged step (or federated round: `unit`) and validation loss/metric per evaluation."""
    train = [h for h in history if h.get("event") == "train"]
    evals = [h for h in history if h.get("event") == "eval"]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    if evals and "loss" in evals[0]:
        loss_axis.plot([h["step"] for h in evals], [h["loss"] for h in evals], "o-", label="validation")
    loss_axis.set_xlabel(unit)
    loss_axis.set_ylabel("loss")
    loss_axis.set_title("Loss")
    loss_axis.legend()
    if evals:
        metric_axis.plot([h["step"] for h in evals], [h.get(metric, np.nan) for h in evals], "o-", color="C2")
    metric_axis.set_xlabel(unit)
    metric_axis.set_ylabel(metric)
    metric_axis.set_title(f"Validation {metric}")
    return save_figure(figure, path)


def federated_clients(history: list[dict[str, Any]], summary: dict[str, Any], metric: str, path: Path) -> Path:
    """Left: the global model's validation metric per round, with the range over the clients' own validation
    rows. Right: the final model on each client's own held-out rows, with the client's training rows."""
    evals = [h for h in history if h.get("event") == "eval"]
    figure, (rounds_axis, clients_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
    rounds = [h["round"] for h in evals]
    per_client = [list((h.get("clients") or {}).values()) for h in evals]
    if any(per_client):
        low = [min(values) if values else np.nan for values in per_client]
        high = [max(values) if values else np.nan for values in per_client]
        rounds_axis.fill_between(rounds, low, high, alpha=0.25, color="C0", label="clients (min to max)")
    rounds_axis.plot(rounds, [h.get(metric, np.nan) for h in evals], "o-", color="C0", label="global validation")
    rounds_axis.set_xlabel("round")
    rounds_axis.set_ylabel(metric)
    rounds_axis.set_title(f"Validation {metric} per round")
    rounds_axis.legend(fontsize=8)
    scored = [c for c in summary.get("clients_scored", []) if metric in c]
    if scored:
        names = [c["client"] for c in scored]
        clients_axis.bar(range(len(scored)), [c[metric] for c in scored], color="C2")
        clients_axis.set_xticks(range(len(scored)), names, rotation=45, ha="right", fontsize=7)
        for index, client in enumerate(scored):
            clients_axis.annotate(
                f"{client['train_rows']:,}", (index, client[metric]), ha="center", va="bottom", fontsize=6
            )
        clients_axis.set_ylabel(metric)
        clients_axis.set_title(f"Final model per client ({scored[0]['split']} rows; label: training rows)", fontsize=9)
    return save_figure(figure, path)


def image_grid(images: np.ndarray, titles: list[str], wrong: list[bool], path: Path, columns: int = 8) -> Path:
    """Images (N x C x H x W, uint8) in a grid, each titled; wrong answers titled in red."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title, is_wrong in zip(axes.flat, images, titles, wrong, strict=False):
        pixels = image.transpose(1, 2, 0)
        axis.imshow(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, cmap="gray" if pixels.shape[2] == 1 else None)
        axis.set_title(title, fontsize=6.5, color="C3" if is_wrong else "black")
    return save_figure(figure, path)
