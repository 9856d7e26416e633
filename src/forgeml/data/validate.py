"""Checks that name the file, column and row of whatever is wrong with the data."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from datasets import Dataset

from forgeml.errors import DataError


def require_columns(dataset: Dataset, columns: Iterable[str], source: Path | str, role: str = "column") -> None:
    available = dataset.column_names
    for column in columns:
        if column not in available:
            raise DataError(f"{source}: no {role} {column!r}; available columns: {', '.join(available)}")


def numeric_targets(values: list, source: Path | str, column: str) -> list[float]:
    """Convert a regression target column to floats, naming the first row that is not a number."""
    numbers = []
    for row, value in enumerate(values, start=1):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number) or math.isinf(number):
            raise DataError(
                f"{source}: column {column!r}, row {row}: regression targets must be numbers, got {value!r}"
            )
        numbers.append(number)
    return numbers


def class_labels(values: list, source: Path | str, column: str) -> list[str]:
    """Labels as strings (the class names); a missing label names its row."""
    labels = []
    for row, value in enumerate(values, start=1):
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            raise DataError(f"{source}: column {column!r}, row {row}: the label is missing")
        labels.append(str(value))
    return labels


def check_trainable_labels(labels: list[str], source: Path | str, column: str) -> None:
    classes = set(labels)
    if len(classes) < 2:
        only = next(iter(classes)) if classes else "nothing"
        raise DataError(
            f"{source}: column {column!r} holds a single class ({only!r}); classification needs at least two"
        )


def check_known_labels(labels: list[str], known: set[str], source: Path | str, column: str, split: str) -> None:
    for row, label in enumerate(labels, start=1):
        if label not in known:
            raise DataError(
                f"{source}: column {column!r}, row {row}: label {label!r} in the {split} split never occurs in "
                f"train (train classes: {', '.join(sorted(known))})"
            )
