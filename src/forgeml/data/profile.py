"""The data report: class balance, input lengths, what cleaning removed and vocabulary coverage."""

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


UNKNOWN_TOKEN_WARNING = 0.05  # above this share of [UNK] tokens the backbone does not cover the text


def vocabulary_warning(shares: dict[str, float | None], backbone: str) -> str | None:
    """One sentence for the user when a split's share of unknown tokens is above 5 %, else None."""
    measured = {name: share for name, share in shares.items() if share is not None}
    if not measured:
        return None
    worst = max(measured, key=lambda name: measured[name])
    if measured[worst] <= UNKNOWN_TOKEN_WARNING:
        return None
    return (
        f"{100 * measured[worst]:.1f} % of the {worst} split's tokens are unknown ([UNK]) to the tokenizer of "
        f"model.backbone {backbone!r}, so it does not cover the text's language or domain and the model sees "
        "little of it: set model.backbone to a checkpoint whose vocabulary covers this text (a multilingual or "
        "domain model), or to one pre-trained on your own corpus."
    )
