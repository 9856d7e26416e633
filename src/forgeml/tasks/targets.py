"""Targets: class labels (classification) and numbers (regression)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional

from forgeml.data import validate
from forgeml.errors import DataError
from forgeml.evaluate.metrics import classification_metrics, regression_metrics


def _natural_order(classes: set[str]) -> list[str]:
    """Numbers sort as numbers ('2' before '10'); anything else alphabetically."""
    try:
        return sorted(classes, key=float)
    except ValueError:
        return sorted(classes)


class ClassLabels:
    """Class names <-> ids; cross-entropy; accuracy, F1, ROC-AUC, log-loss."""

    kind = "classification"
    primary_metric = "f1"

    def __init__(self, column: str, classes: list[str] | None = None):
        self.column = column
        self.classes = list(classes or [])

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def fit(self, values: list) -> None:
        self.classes = _natural_order({str(v) for v in values})

    def encode(self, values: list, source: str) -> np.ndarray:
        ids = {name: index for index, name in enumerate(self.classes)}
        encoded = np.empty(len(values), dtype=np.int64)
        for row, value in enumerate(values):
            if str(value) not in ids:
                raise DataError(
                    f"{source}: column {self.column!r}, row {row + 1}: label {value!r} is not one of the "
                    f"classes the model knows ({', '.join(self.classes)})"
                )
            encoded[row] = ids[str(value)]
        return encoded

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(outputs, targets)

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        probabilities = _softmax(outputs)
        return {"label": [self.classes[i] for i in probabilities.argmax(axis=1)], "probabilities": probabilities}

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        return classification_metrics(targets, _softmax(outputs), self.classes)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "column": self.column, "classes": self.classes}


class NumericTarget:
    """A number, standardised with the train mean/std for training and restored for answers."""

    kind = "regression"
    primary_metric = "rmse"
    num_outputs = 1

    def __init__(self, column: str, mean: float = 0.0, std: float = 1.0):
        self.column = column
        self.mean, self.std = mean, std

    def fit(self, values: list) -> None:
        numbers = np.asarray(validate.numeric_targets(values, "train", self.column))
        self.mean = float(numbers.mean())
        self.std = float(numbers.std()) or 1.0

    def encode(self, values: list, source: str) -> np.ndarray:
        numbers = np.asarray(validate.numeric_targets(values, source, self.column), dtype=np.float64)
        return ((numbers - self.mean) / self.std).astype(np.float32)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.mse_loss(outputs.squeeze(-1), targets)

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        return {"value": (outputs.reshape(-1) * self.std + self.mean).tolist()}

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        scale = lambda values: values.reshape(-1) * self.std + self.mean  # noqa: E731
        return regression_metrics(scale(targets), scale(outputs))

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "column": self.column, "mean": self.mean, "std": self.std}


def target_from_state(state: dict[str, Any]) -> ClassLabels | NumericTarget:
    if state["kind"] == "classification":
        return ClassLabels(state["column"], state["classes"])
    return NumericTarget(state["column"], state["mean"], state["std"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
