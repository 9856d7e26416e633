"""Cleaning: Unicode normalisation, empty inputs, duplicates, conflicting labels, over-long inputs.

Every step reports what it did as counts, so the data profile shows exactly what was removed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

from datasets import Dataset

from forgeml.config import CleanConfig
from forgeml.data.io import column, replace_column
from forgeml.data.split import take

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str | None) -> str:
    """NFKC (full-width forms, ligatures, compatibility characters) and collapsed whitespace."""
    if text is None:
        return ""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", str(text))).strip()


def clean(
    dataset: Dataset, text_columns: list[str], input_columns: list[str], label: str | None, options: CleanConfig
) -> tuple[Dataset, dict[str, int]]:
    """Return the cleaned dataset and counts of what each step changed.

    `text_columns` are normalised and checked for emptiness/length; `input_columns` (text or tabular
    features) decide what a duplicate is. `label=None` (a file without labels, e.g. one to audit) skips the
    conflicting-label check.
    """
    report = {"rows_in": len(dataset)}
    if options.normalize and text_columns:
        changed = 0
        for name in text_columns:
            original = column(dataset, name)
            cleaned = [normalize_text(value) for value in original]
            changed += sum(a != b for a, b in zip(cleaned, original, strict=True))
            dataset = replace_column(dataset, name, cleaned)
        report["normalized"] = changed

    label_columns = [] if label is None else [label]
    columns = {name: column(dataset, name) for name in {*input_columns, *label_columns}}
    keep = [True] * len(dataset)

    if options.drop_empty and text_columns:
        empty = 0
        for row in range(len(dataset)):
            if any(not (columns[c][row] or "").strip() for c in text_columns):
                keep[row], empty = False, empty + 1
        report["dropped_empty"] = empty

    overlong = 0
    if options.max_chars and text_columns:
        for row in range(len(dataset)):
            if keep[row] and any(len(columns[c][row] or "") > options.max_chars for c in text_columns):
                overlong += 1
                if options.overlong == "drop":
                    keep[row] = False
        report["dropped_overlong" if options.overlong == "drop" else "truncated_overlong"] = overlong

    if options.dedupe:
        seen, duplicates = set(), 0
        for row in range(len(dataset)):
            if not keep[row]:
                continue
            key = tuple(str(columns[c][row]) for c in (*input_columns, *label_columns))
            if key in seen:
                keep[row], duplicates = False, duplicates + 1
            seen.add(key)
        report["dropped_duplicates"] = duplicates

    if label is not None:
        labels_by_input: dict[tuple, set] = defaultdict(set)
        for row in range(len(dataset)):
            if keep[row]:
                labels_by_input[tuple(str(columns[c][row]) for c in input_columns)].add(str(columns[label][row]))
        conflicting = {key for key, labels in labels_by_input.items() if len(labels) > 1}
        conflicting_rows = 0
        for row in range(len(dataset)):
            if keep[row] and tuple(str(columns[c][row]) for c in input_columns) in conflicting:
                conflicting_rows += 1
                if options.conflicting_labels == "drop":
                    keep[row] = False
        report["conflicting_label_inputs"] = len(conflicting)
        report["conflicting_label_rows"] = conflicting_rows
        if options.conflicting_labels == "drop":
            report["dropped_conflicting"] = conflicting_rows

    dataset = take(dataset, [row for row, kept in enumerate(keep) if kept])
    if options.max_chars and options.overlong == "truncate" and overlong:
        for name in text_columns:
            truncated = [(value or "")[: options.max_chars] for value in column(dataset, name)]
            dataset = replace_column(dataset, name, truncated)
    report["rows_out"] = len(dataset)
    return dataset, report
