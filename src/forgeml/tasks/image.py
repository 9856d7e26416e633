"""Image classification on raw pixels, augmented inside the model: a small ResNet trained from scratch, or a
pre-trained timm or torchvision network from a local checkpoint folder fine-tuned with a new head.

What is fitted on the training split (the classes, the image shape and, for the small ResNet, the per-channel
mean and standard deviation) is saved as JSON beside the weights; the normalisation is also in buffers of the
model, so the model itself (and its ONNX export) takes raw pixels. A pre-trained network's weights come from its
folder when training starts; task.json records how to build it (library, model name, its arguments, mean and
standard deviation), so a saved run reloads from its own model.safetensors without that folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional

from forgeml.config import RESNET_SMALL
from forgeml.data.images import IMAGE_COLUMN, SHAPE_COLUMN, as_image, pixels, to_rows
from forgeml.data.io import column as column_values
from forgeml.errors import ConfigError, DataError
from forgeml.models.cnn import ResNetSmall
from forgeml.models.vision import (
    Checkpoint,
    PretrainedImageModel,
    build_network,
    head_name,
    inspect_checkpoint,
    load_pretrained,
)
from forgeml.tasks.base import SafetensorsFolderTask, Target, TargetTask, TensorSplit

GRID_SIZE = 32  # images in the card's grid of test answers
GRID_WRONG = 16  # of which at most this many are wrong answers
MIXING = ("mixup", "cutmix")  # data.augment keys that mix images with their targets (the task's, not the model's)
PRETRAINED = "pretrained"  # task.json's model architecture for a network from a checkpoint folder


class ImageClassificationTask(TargetTask, SafetensorsFolderTask):
    """image-classification: `model.backbone: resnet_small` (width and depths configurable), or a folder holding a
    pre-trained timm or torchvision checkpoint (models/vision.py)."""

    name = "image-classification"
    architectures: ClassVar[tuple[str, ...]] = (RESNET_SMALL, PRETRAINED)  # task.json's model.architecture
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
        checkpoint: Checkpoint | None = None,
    ):
        """`model`: resnet_small's width, depths and dropout, or {"backbone": a checkpoint folder}. A saved run
        passes the `checkpoint` it recorded instead: its network is then built without the folder's weights."""
        self.target = target
        options = dict(model)
        backbone = options.pop("backbone", None) or RESNET_SMALL
        if backbone != RESNET_SMALL or checkpoint is not None:
            options = {"backbone": str(backbone)}  # resnet_small's width, depths and dropout do not apply
            if checkpoint is None:
                checkpoint = inspect_checkpoint(backbone)  # what the folder holds; its weights load in build_model
        self.checkpoint = checkpoint
        self.model_options = options  # width, depths, dropout; or the checkpoint folder
        self.augment = dict(augment or {})  # crop_padding, flip, jitter, cutout, mixup, cutmix: while training
        inputs = inputs or {}
        self.image_shape: tuple[int, ...] | None = tuple(inputs["shape"]) if "shape" in inputs else None
        self.mean: list[float] | None = inputs.get("mean")
        self.std: list[float] | None = inputs.get("std")
        self.new_head: list[str] = []  # a pre-trained network's weights left to train from scratch (its head)

    def fit(self, train: Dataset) -> None:
        self.target.fit(column_values(train, self.target.column))
        if len(train) == 0:
            raise DataError("train: no images")
        self.image_shape = tuple(train[0][SHAPE_COLUMN])  # pixels() checks every other image against it
        if self.checkpoint is not None:  # normalised as the checkpoint's weights were trained
            return
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

    def build_model(self) -> nn.Module:
        """A fresh model: the small ResNet, or the checkpoint's network with a new head for the run's classes (its
        pre-trained weights from the folder for a new run; a saved run's come from its model.safetensors)."""
        if self.checkpoint is not None:
            return self._pretrained_model()
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
            augment=self.pixel_augment,
        )

    def _pretrained_model(self) -> PretrainedImageModel:
        checkpoint = self.checkpoint
        assert checkpoint is not None and self.image_shape is not None, "fit() first"
        height, width, channels = self.image_shape
        where = self.model_options.get("backbone", checkpoint.network)
        if channels not in (1, checkpoint.channels):
            raise DataError(
                f"train: the images have {channels} channels; model.backbone {where} takes {checkpoint.channels}"
            )
        if checkpoint.fixed_size and checkpoint.input_size and [height, width] != checkpoint.input_size:
            size_h, size_w = checkpoint.input_size
            raise ConfigError(
                f"data.image_size: {checkpoint.network} (model.backbone {where}) takes {size_h} x {size_w} images "
                f"only, these are {height} x {width}; set data.image_size: {size_h}"
            )
        classes = self.target.num_outputs
        network = build_network(checkpoint, classes)
        head = head_name(network, checkpoint, classes)
        if checkpoint.weights is not None:  # a new run starts from the checkpoint's weights
            self.new_head = load_pretrained(network, checkpoint, head)
        return PretrainedImageModel(
            network, (channels, height, width), checkpoint.mean, checkpoint.std, head, augment=self.pixel_augment
        )

    @property
    def pixel_augment(self) -> dict[str, Any]:
        """The augmentation inside the model (each image on its own); mixing images is `training_batch`'s."""
        return {key: value for key, value in self.augment.items() if key not in MIXING}

    def training_batch(
        self, inputs: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A training batch as the loss sees it: with `data.augment.mixup` or `cutmix`, each image blended with
        (or patched from) another of the batch and its target the same mix of the two one-hot labels (the
        cross-entropy takes such probabilities); otherwise unchanged. Draws from torch's generator, which
        checkpoints save, so a resumed run mixes exactly as an uninterrupted one."""
        mixup, cutmix = self.augment.get("mixup", 0.0), self.augment.get("cutmix", 0.0)
        if not (mixup or cutmix) or len(targets) < 2:
            return inputs, targets
        pixels = inputs["pixels"]
        use_cutmix = bool(cutmix) and (not mixup or bool(torch.rand(()) < 0.5))
        alpha = cutmix if use_cutmix else mixup
        share = float(torch.distributions.Beta(alpha, alpha).sample())  # of each image's own pixels / label
        partner = torch.randperm(len(targets)).to(pixels.device)
        if use_cutmix:
            pixels, share = _paste_box(pixels, partner, share)
        else:
            pixels = share * pixels.float() + (1.0 - share) * pixels[partner].float()
        labels = functional.one_hot(targets, self.target.num_outputs).float()
        return {**inputs, "pixels": pixels}, share * labels + (1.0 - share) * labels[partner]

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
        if self.checkpoint is not None:  # how to rebuild the network; the normalisation is the checkpoint's
            inputs: dict[str, Any] = {"shape": list(self.image_shape or ())}
            model = {**self.model_options, **self.checkpoint.state(), "architecture": PRETRAINED}
        else:
            inputs = {"shape": list(self.image_shape or ()), "mean": self.mean, "std": self.std}
            model = {**self.model_options, "architecture": RESNET_SMALL}
        return {
            "task": self.name,
            "inputs": inputs,
            "augment": self.augment,
            "target": self.target.state(),
            "model": model,
        }

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Target) -> ImageClassificationTask:
        options = {k: v for k, v in state["model"].items() if k != "architecture"}
        if state["model"].get("architecture") == PRETRAINED:  # built as recorded, without the checkpoint folder
            checkpoint = Checkpoint.from_state(options)
            return cls(target, {"backbone": options.get("backbone")}, state.get("augment"), state["inputs"], checkpoint)
        return cls(target, options, state.get("augment"), state["inputs"])


def _paste_box(pixels: torch.Tensor, partner: torch.Tensor, share: float) -> tuple[torch.Tensor, float]:
    """CutMix: one box, (1 - share) of the image's area, centred at random (clipped at the edges), copied from
    each image's partner into it; returns the images and the share of each image's own pixels left."""
    height, width = pixels.shape[-2:]
    ratio = (1.0 - share) ** 0.5
    box_h, box_w = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h // 2, height)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w // 2, width)
    mixed = pixels.clone()
    mixed[..., top:bottom, left:right] = pixels[partner][..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
