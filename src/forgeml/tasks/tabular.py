"""Tabular tasks: an MLP over standardised numeric and encoded categorical columns.

The preprocessing (imputation values, scaling, category vocabularies) is fitted on the training
split only and saved beside the weights as JSON, so predictions apply exactly the same transform.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from forgeml.data.io import column as column_values
from forgeml.data.validate import require_columns
from forgeml.errors import DataError
from forgeml.models.mlp import TabularMLP
from forgeml.tasks.base import SafetensorsFolderTask, Target, TargetTask, TensorSplit

MISSING = 0  # category id for missing and never-seen values


class TabularPreprocessor:
    """Median imputation + standardisation for numbers; vocabularies for categories."""

    def __init__(self, numeric: dict[str, dict] | None = None, categorical: dict[str, list[str]] | None = None):
        self.numeric = numeric or {}  # column -> {median, mean, std}
        self.categorical = categorical or {}  # column -> categories (id = position + 1)

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def fit(self, dataset: Dataset, features: list[str]) -> None:
        schema = dataset.data.schema
        for column in features:
            values = column_values(dataset, column)
            if pa.types.is_integer(schema.field(column).type) or pa.types.is_floating(schema.field(column).type):
                numbers = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
                median = float(np.nanmedian(numbers)) if not np.all(np.isnan(numbers)) else 0.0
                filled = np.where(np.isnan(numbers), median, numbers)
                self.numeric[column] = {
                    "median": median,
                    "mean": float(filled.mean()),
                    "std": float(filled.std()) or 1.0,
                }
            else:
                counts = Counter(str(v) for v in values if v is not None and str(v).strip() != "")
                self.categorical[column] = [value for value, _ in counts.most_common()]

    def transform(self, dataset: Dataset, source: str) -> dict[str, torch.Tensor]:
        require_columns(dataset, self.columns, source or "input", "feature column")
        numeric = np.zeros((len(dataset), len(self.numeric)), dtype=np.float32)
        for j, (column, stats) in enumerate(self.numeric.items()):
            numeric[:, j] = (
                self._numbers(column_values(dataset, column), column, source, stats["median"]) - stats["mean"]
            ) / stats["std"]
        categorical = np.zeros((len(dataset), len(self.categorical)), dtype=np.int64)
        for j, (column, categories) in enumerate(self.categorical.items()):
            ids = {value: index + 1 for index, value in enumerate(categories)}
            categorical[:, j] = [
                ids.get(str(v), MISSING) if v is not None else MISSING for v in column_values(dataset, column)
            ]
        return {"numeric": torch.from_numpy(numeric), "categorical": torch.from_numpy(categorical)}

    @staticmethod
    def _numbers(values: list, column: str, source: str, fill: float) -> np.ndarray:
        numbers = np.empty(len(values), dtype=np.float64)
        for row, value in enumerate(values):
            if value is None or (isinstance(value, str) and value.strip() == ""):
                numbers[row] = fill
                continue
            try:
                numbers[row] = float(value)
            except (TypeError, ValueError):
                raise DataError(
                    f"{source}: column {column!r}, row {row + 1}: expected a number, got {value!r}"
                ) from None
            if math.isnan(numbers[row]):
                numbers[row] = fill
        return numbers

    def state(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical}


class TabularTask(TargetTask, SafetensorsFolderTask):
    """tabular-classification and tabular-regression."""

    def __init__(
        self,
        name: str,
        features: list[str],
        target: Target,
        model: dict[str, Any],
        preprocessor: TabularPreprocessor | None = None,
    ):
        self.name = name
        self.features = list(features)
        self.target = target
        self.model_options = dict(model)  # hidden_sizes, dropout, categorical, embedding_dim
        self.preprocessor = preprocessor or TabularPreprocessor()

    def fit(self, train: Dataset) -> None:
        self.target.fit(column_values(train, self.target.column))
        self.preprocessor.fit(train, self.features)

    def build_model(self) -> TabularMLP:
        options = self.model_options
        return TabularMLP(
            num_numeric=len(self.preprocessor.numeric),
            cardinalities=[len(c) + 1 for c in self.preprocessor.categorical.values()],
            num_outputs=self.target.num_outputs,
            hidden_sizes=options["hidden_sizes"],
            dropout=options["dropout"],
            categorical=options["categorical"],
            embedding_dim=options["embedding_dim"],
        )

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> TensorSplit:
        inputs = self.preprocessor.transform(dataset, source)
        targets = None
        if with_targets:
            targets = torch.as_tensor(self.target.encode(column_values(dataset, self.target.column), source))
        return TensorSplit(inputs, targets)

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"features": self.features, "preprocessing": self.preprocessor.state()},
            "target": self.target.state(),
            "model": {**self.model_options, "architecture": "mlp"},
        }

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Target) -> TabularTask:
        """The task written by `save_inputs`."""
        options = {k: v for k, v in state["model"].items() if k != "architecture"}
        prep = state["inputs"]["preprocessing"]
        return cls(state["task"], state["inputs"]["features"], target, options, TabularPreprocessor(**prep))
