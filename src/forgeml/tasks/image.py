"""Image classification: a small ResNet trained from scratch on raw pixels, augmented inside the model.

What is fitted on the training split (the classes, the image shape, the per-channel mean and standard
deviation) is saved as JSON beside the weights; the mean and standard deviation are also buffers of the
model, so the model itself (and its ONNX export) takes raw pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset

from forgeml.data.images import IMAGE_COLUMN, SHAPE_COLUMN, as_image, pixels, to_rows
from forgeml.data.io import column as column_values
from forgeml.errors import DataError
from forgeml.models.cnn import ResNetSmall
from forgeml.tasks.base import SafetensorsFolderTask, Target, TargetTask, TensorSplit

GRID_SIZE = 32  # images in the card's grid of test answers
GRID_WRONG = 16  # of which at most this many are wrong answers


class ImageClassificationTask(TargetTask, SafetensorsFolderTask):
    """image-classification: `model.backbone: resnet_small` (width and depths configurable)."""

    name = "image-classification"
    features: ClassVar[list[str]] = [IMAGE_COLUMN]  # the input column (a file, its bytes or pixels when predicting)
    # int8 exports are statically quantized (a CNN's work is in its convolutions), calibrated on this many
    # training images: enough to see each activation's range, few enough to take seconds.
    int8_calibration_rows: ClassVar[int] = 512

    def __init__(
        self,
        target: Target,
        model: dict[str, Any],
        augment: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
    ):
        self.target = target
        self.model_options = dict(model)  # width, depths, dropout
        self.augment = dict(augment or {})  # crop_padding, flip, jitter, cutout: applied while training
        inputs = inputs or {}
        self.image_shape: tuple[int, ...] | None = tuple(inputs["shape"]) if "shape" in inputs else None
        self.mean: list[float] | None = inputs.get("mean")
        self.std: list[float] | None = inputs.get("std")

    def fit(self, train: Dataset) -> None:
        self.target.fit(column_values(train, self.target.column))
        if len(train) == 0:
            raise DataError("train: no images")
        self.image_shape = tuple(train[0][SHAPE_COLUMN])  # pixels() checks every other image against it
        images = pixels(train, self.image_shape, "train")
        total, squares, count = np.zeros(images.shape[1]), np.zeros(images.shape[1]), 0
        for start in range(0, len(images), 1024):  # in chunks: float64 copies of every image would not fit
            chunk = images[start : start + 1024].astype(np.float64)
            total += chunk.sum(axis=(0, 2, 3))
            squares += (chunk**2).sum(axis=(0, 2, 3))
            count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
        mean = total / count
        self.mean = mean.round(4).tolist()
        self.std = [max(s, 1e-3) for s in np.sqrt(np.maximum(squares / count - mean**2, 0.0)).round(4).tolist()]

    def build_model(self) -> ResNetSmall:
        assert self.image_shape is not None and self.mean is not None and self.std is not None, "fit() first"
        height, width, channels = self.image_shape
        options = self.model_options
        return ResNetSmall(
            num_classes=self.target.num_outputs,
            image_shape=(channels, height, width),
            mean=self.mean,
            std=self.std,
            width=options["width"],
            depths=options["depths"],
            dropout=options["dropout"],
            augment=self.augment,
        )

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> TensorSplit:
        assert self.image_shape is not None, "fit() first"
        inputs = {"pixels": torch.from_numpy(self._pixels(dataset, source or "input"))}
        targets = None
        if with_targets:
            targets = torch.as_tensor(self.target.encode(column_values(dataset, self.target.column), source))
        return TensorSplit(inputs, targets)

    def input_rows(self, rows: list[Any]) -> Dataset:
        """Inputs to predict (each an image file's path or bytes, an array of pixels, or {"image": one of
        those}) as the image table, decoded once here rather than through a table of Python objects."""
        assert self.image_shape is not None, "fit() first"
        images = [
            as_image(row[IMAGE_COLUMN] if isinstance(row, dict) else row, f"row {index + 1}", self.image_shape)
            for index, row in enumerate(rows)
        ]
        return to_rows(images, None, self.target.column)

    def _pixels(self, dataset: Dataset, source: str) -> np.ndarray:
        """N x C x H x W uint8: from the image table, or from raw inputs (files, file bytes, pixel arrays)."""
        assert self.image_shape is not None
        if SHAPE_COLUMN in dataset.column_names:
            return pixels(dataset, self.image_shape, source)
        values = column_values(dataset, IMAGE_COLUMN)
        images = [as_image(value, f"{source}: row {row + 1}", self.image_shape) for row, value in enumerate(values)]
        if not images:
            height, width, channels = self.image_shape
            return np.zeros((0, channels, height, width), dtype=np.uint8)
        return np.stack(images).transpose(0, 3, 1, 2).copy()

    def prediction_examples(self, split: TensorSplit, outputs: np.ndarray, targets: np.ndarray, folder: Path) -> None:
        """A grid of evaluated images with their answers: the most confidently wrong first, then seeded others."""
        from forgeml.evaluate import plots

        probabilities = self.predictions(outputs)["probabilities"]
        predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
        wrong = np.flatnonzero(predicted != targets)
        wrong = wrong[np.argsort(-confidence[wrong])][:GRID_WRONG]
        rest = np.setdiff1d(np.arange(len(targets)), wrong)
        others = np.random.default_rng(0).permutation(rest)[: GRID_SIZE - len(wrong)]
        shown = np.concatenate([wrong, np.sort(others)]).astype(np.int64)
        classes = self.target.classes
        titles = [
            f"{classes[predicted[i]]} {confidence[i]:.0%}"
            + ("" if predicted[i] == targets[i] else f"\n(is {classes[targets[i]]})")
            for i in shown
        ]
        images = split.inputs["pixels"][torch.as_tensor(shown)].numpy()
        plots.image_grid(images, titles, [bool(predicted[i] != targets[i]) for i in shown], folder / "examples.png")

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"shape": list(self.image_shape or ()), "mean": self.mean, "std": self.std},
            "augment": self.augment,
            "target": self.target.state(),
            "model": {**self.model_options, "architecture": "resnet_small"},
        }

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Target) -> ImageClassificationTask:
        options = {k: v for k, v in state["model"].items() if k != "architecture"}
        return cls(target, options, state.get("augment"), state["inputs"])
