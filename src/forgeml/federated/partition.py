"""Which rows belong to which client: one client per value of a column, or a Dirichlet split of the label.

The Dirichlet split is the usual non-IID benchmark of federated learning (Hsu et al. 2019, "Measuring the
Effects of Non-Identical Data Distribution"): every class's rows are shared among the clients in proportions
drawn from Dir(alpha), so a small alpha gives each client a few dominant classes. Validation and test rows are
shared with the same proportions, so each client is scored on data like its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forgeml.errors import DataError

MAX_DRAWS = 100  # Dirichlet redraws before giving up on min_rows (Flower Datasets' partitioner also redraws)


@dataclass
class Partition:
    """Rows of each split that each client holds (indices into that split), and the clients' names."""

    names: list[str]
    rows: dict[str, list[np.ndarray]]  # split name -> one index array per client

    def sizes(self, split: str) -> list[int]:
        return [len(rows) for rows in self.rows.get(split, [])]


def by_column(values: dict[str, Sequence], column: str) -> Partition:
    """One client per value of `column` in the training split (`values`: split name -> that column's values).

    Validation and test rows go to the client with their value; a value no training row has belongs to nobody.
    """
    train = _as_keys(values["train"])
    names = sorted(set(train))
    if len(names) < 2:
        raise DataError(f"federated.by_column: column {column!r} has {len(names)} value(s) in train; need 2 or more")
    rows = {}
    for split, column_values in values.items():
        keys = np.asarray(_as_keys(column_values), dtype=object)
        rows[split] = [np.flatnonzero(keys == name) for name in names]
    return Partition(names=names, rows=rows)


def dirichlet(labels: dict[str, Sequence], clients: int, alpha: float, seed: int, min_rows: int) -> Partition:
    """`clients` clients; each class's rows shared among them in Dir(alpha) proportions (`labels`: split -> labels).

    The proportions are redrawn (up to MAX_DRAWS times) until every client holds `min_rows` training rows.
    """
    keys = {split: _as_keys(values) for split, values in labels.items()}
    classes = sorted(set(keys["train"]))
    train_rows = len(keys["train"])
    if train_rows < clients * min_rows:
        raise DataError(
            f"federated.clients: {clients} clients of at least {min_rows} rows need {clients * min_rows} training "
            f"rows; train has {train_rows}"
        )
    codes = {split: _class_codes(split_keys, classes) for split, split_keys in keys.items()}
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        shares = rng.dirichlet([alpha] * clients, size=len(classes))  # one row of client shares per class
        train = _share(codes["train"], shares, rng)
        if min(len(rows) for rows in train) >= min_rows:  # only then share the other splits alike
            rows = {split: train if split == "train" else _share(codes[split], shares, rng) for split in codes}
            return Partition(names=[f"client-{index}" for index in range(clients)], rows=rows)
    raise DataError(
        f"federated.alpha: no Dirichlet({alpha}) split in {MAX_DRAWS} draws gave each of {clients} clients "
        f"{min_rows} training rows; raise alpha, lower federated.min_client_rows or use fewer clients"
    )


def _class_codes(keys: list[str], classes: list[str]) -> np.ndarray:
    """Each row's class index (-1 for a class the training split does not have)."""
    index = {name: code for code, name in enumerate(classes)}
    return np.array([index.get(key, -1) for key in keys], dtype=np.int64)


def _share(codes: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's rows (shuffled) cut among the clients at the cumulative `shares`."""
    parts: list[list[np.ndarray]] = [[] for _ in range(shares.shape[1])]
    for code in range(shares.shape[0]):
        rows = rng.permutation(np.flatnonzero(codes == code))
        cuts = (np.cumsum(shares[code])[:-1] * len(rows)).round().astype(int)
        for client, piece in enumerate(np.split(rows, cuts)):
            parts[client].append(piece)
    return [np.sort(np.concatenate(pieces)) for pieces in parts]


def _as_keys(values: Sequence) -> list[str]:
    """Column values as client names: text, with missing values as one group of their own."""
    return ["(missing)" if value is None else str(value) for value in values]
