"""The data report: class balance, input lengths and what cleaning removed."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from datasets import Dataset

from forgeml.data.io import column

PERCENTILES = (5, 25, 50, 75, 95, 99, 100)


def length_percentiles(lengths: list[int] | np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    values = np.percentile(np.asarray(lengths), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)} | {"mean": float(np.mean(lengths))}


def profile_split(dataset: Dataset, text_columns: list[str], label: str, classification: bool) -> dict[str, Any]:
    """Summary of one split: rows, label distribution and input lengths in words and characters."""
    summary: dict[str, Any] = {"rows": len(dataset)}
    labels = column(dataset, label)
    if classification:
        counts = Counter(str(value) for value in labels)
        summary["class_counts"] = dict(sorted(counts.items()))
    else:
        values = np.asarray(labels, dtype=float)
        summary["target"] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    for name in text_columns:
        texts = column(dataset, name)
        summary[f"{name}_chars"] = length_percentiles([len(t or "") for t in texts])
        summary[f"{name}_words"] = length_percentiles([len((t or "").split()) for t in texts])
    return summary
