"""The Task protocol: the one place where text, text-pair, regression and tabular problems differ.

The training loop, evaluator, predictor and model card only ever talk to these interfaces.

Optional hooks a task may add, each read with getattr where it is used: `training_batch(inputs, targets)`
(the loop: a training batch reshaped before the loss, e.g. image mixing), `input_rows(rows)` (predict: raw
inputs decoded by the task), `refused_actions` + `refusal_hint` (Predictor.refuse: what it does not offer),
`int8_calibration_rows` (export: a static int8 scheme calibrated on that many training rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_model, save_model
from torch import nn

from forgeml.workspace import atomic_write_json


class EncodedSplit(Protocol):
    """A split turned into model inputs, fetched batch by batch."""

    lengths: np.ndarray  # tokens (or 1 for tabular rows) per example; drives length-grouped batching

    def __len__(self) -> int: ...

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Model inputs (padded to the longest row in the batch) and targets (None when unlabelled)."""
        ...


class Task(Protocol):
    """Everything a run needs to know about one kind of problem."""

    name: str
    primary_metric: str  # watched by early stopping unless the config names another

    def fit(self, train: Dataset) -> None:
        """Learn what comes from the training data only: classes, target scale, preprocessing."""

    def build_model(self) -> nn.Module:
        """A fresh model (pre-trained backbone + new head, or a new MLP)."""

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> EncodedSplit:
        """Rows -> model inputs. `source` names the data in error messages."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        """Raw model outputs -> answers: {'label', 'probabilities'} or {'value'}."""

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]: ...

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """Plots of one evaluated split into `folder` (confusion matrix, calibration, scatter, ...)."""

    def save(self, folder: Path, model: nn.Module) -> None:
        """Write weights (safetensors) and everything needed to rebuild the task (JSON)."""

    def save_inputs(self, folder: Path) -> None:
        """Write what turns raw inputs into model inputs and outputs into answers (task JSON, tokenizer or
        tabular preprocessing, label map), without the weights: what an exported model needs beside it."""


class Target(Protocol):
    """What the model predicts: class labels or a number. Shared by text and tabular tasks."""

    kind: str
    primary_metric: str
    num_outputs: int

    def fit(self, values: list) -> None: ...

    def encode(self, values: list, source: str) -> np.ndarray: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]: ...

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]: ...

    def state(self) -> dict[str, Any]: ...


class TargetTask:
    """Loss, answers and metrics come from the task's Target; subclasses turn rows into inputs."""

    target: Target

    @property
    def primary_metric(self) -> str:
        return self.target.primary_metric

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.target.loss(outputs, targets)

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        return self.target.predictions(outputs)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        return self.target.metrics(outputs, targets)

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """Confusion matrix and calibration for classes; predicted against true values for a number."""
        from forgeml.evaluate import plots

        answers = self.predictions(outputs)
        if "confusion_matrix" in metrics:
            plots.confusion_matrix(metrics["confusion_matrix"], metrics["classes"], folder / "confusion_matrix.png")
            plots.calibration(targets, answers["probabilities"], folder / "calibration.png")
        else:
            truth = self.predictions(targets.reshape(-1, 1))["value"]
            plots.regression_scatter(np.asarray(truth), np.asarray(answers["value"]), folder / "predicted_vs_true.png")


class SafetensorsFolderTask:
    """A task whose `model/` folder is task.json (all it fitted, as JSON) beside model.safetensors."""

    def state(self) -> dict[str, Any]: ...

    def build_model(self) -> nn.Module: ...

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any) -> Any: ...

    def save(self, folder: Path, model: nn.Module) -> None:
        self.save_inputs(folder)
        save_model(model, str(folder / "model.safetensors"))

    def save_inputs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "task.json", self.state())

    @classmethod
    def load(cls, folder: Path, state: dict[str, Any], target: Any) -> tuple[Any, nn.Module]:
        task = cls.from_saved(folder, state, target)
        model = task.build_model()
        load_model(model, str(folder / "model.safetensors"))
        return task, model


class EncoderFolderTask:
    """A task whose model is a pre-trained encoder with a head: its `model/` folder is model.safetensors, the
    encoder's config in encoder/, the tokenizer in tokenizer/ and task.json."""

    tokenizer: Any

    def state(self) -> dict[str, Any]: ...

    def save(self, folder: Path, model: nn.Module) -> None:
        """Weights (safetensors), encoder config, tokenizer and task.json."""
        self.save_inputs(folder)
        save_model(model, str(folder / "model.safetensors"))
        model.encoder.config.save_pretrained(folder / "encoder")

    def save_inputs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        atomic_write_json(folder / "task.json", self.state())


class HuggingFaceFolderTask:
    """A task whose `model/` folder is a Hugging Face one: the model, its tokenizer beside it, and task.json."""

    tokenizer: Any

    def state(self) -> dict[str, Any]: ...

    def save_inputs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        atomic_write_json(folder / "task.json", self.state())


class TensorSplit:
    """An EncodedSplit held as tensors (tabular data, or anything already fixed-size)."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor | None):
        self.inputs = inputs
        self.targets = targets
        self.lengths = np.ones(len(next(iter(inputs.values()))), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        index = torch.as_tensor(rows, dtype=torch.long)
        inputs = {name: tensor[index] for name, tensor in self.inputs.items()}
        return inputs, None if self.targets is None else self.targets[index]
