"""Seeded (stratified) splits, k-fold indices, per-split sampling and content hashes."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
from datasets import Dataset
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split


def take(dataset: Dataset, rows) -> Dataset:
    """`dataset.select(rows)` with a fingerprint from the rows' bytes: the datasets library would otherwise
    hash the index list through dill, seconds for a few tens of thousands of rows."""
    indices = np.asarray(rows, dtype=np.int64)
    digest = hashlib.sha256(f"{dataset._fingerprint}".encode() + indices.tobytes()).hexdigest()[:16]
    return dataset.select(indices, new_fingerprint=digest)


def holdout(dataset: Dataset, fraction: float, labels: list | None, seed: int) -> tuple[Dataset, Dataset | None, bool]:
    """Carve `fraction` of the rows off. Returns (rest, held_out, stratified).

    Stratifies on `labels` when given and every class has at least two rows; otherwise the
    split is a plain seeded shuffle (and the caller records that it was not stratified).
    """
    if fraction <= 0:
        return dataset, None, False
    rows = np.arange(len(dataset))
    stratify = labels if labels is not None and _stratifiable(labels, fraction) else None
    rest, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify, shuffle=True)
    return take(dataset, np.sort(rest)), take(dataset, np.sort(held)), stratify is not None


def _stratifiable(labels: list, fraction: float) -> bool:
    counts = Counter(labels)
    held_rows = max(1, round(len(labels) * fraction))
    return min(counts.values()) >= 2 and held_rows >= len(counts) and len(labels) - held_rows >= len(counts)


def sample(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A seeded random subset of `size` rows (all rows when `size` is None or too big)."""
    if size is None or size >= len(dataset):
        return dataset
    rows = np.random.default_rng(seed).permutation(len(dataset))[:size]
    return take(dataset, np.sort(rows))


def kfold(num_rows: int, k: int, labels: list | None, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train_rows, held_out_rows) for each of `k` folds; stratified when labels allow it."""
    rows = np.arange(num_rows)
    if labels is not None and min(Counter(labels).values()) >= k:
        yield from StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, labels)
    else:
        yield from KFold(n_splits=k, shuffle=True, random_state=seed).split(rows)


def content_hash(dataset: Dataset) -> str:
    """SHA-256 of the split's rows (as CSV, columns in order): equal data gives equal hashes."""
    digest = hashlib.sha256()
    digest.update(",".join(dataset.column_names).encode())
    for start in range(0, len(dataset), 50_000):
        chunk = dataset.select(range(start, min(start + 50_000, len(dataset)))).to_pandas()
        digest.update(chunk.to_csv(index=False, header=False).encode("utf-8"))
    return digest.hexdigest()
