"""Image generation: a VAE or a DCGAN learns the training images, and draws new ones.

The model's outputs carry everything the task scores (see models/vae.py and models/gan.py): per image a few
statistics (the VAE's negative ELBO and its two terms; the GAN's two players' losses and its step count),
then, in eval mode, one generated image per row. So the one training loop trains both kinds, and its
validation is the task's `metrics` on those outputs, with the real images as targets:

- VAE: bits per dimension of the negative ELBO (an upper bound on the model's code length, because the ELBO
  is a lower bound of the log-likelihood), watched by early stopping (lower is better);
- GAN: the Fréchet distance between the classifier features of the validation images and of as many samples,
  when `evaluate.classifier` names an image-classification run; without one the GAN has no quality measure,
  so training watches `training_steps` (it only grows: the last weights are kept).

With a classifier, both kinds report the distance, the classifier's confidence on the samples and the
classes it sees in them (evaluate/frechet.py; not comparable to published Inception-based FID). A GAN's
samples from the same fixed noise are saved at every validation (plots/samples_by_step/).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from forgeml.data.images import IMAGE_COLUMN, SHAPE_COLUMN, as_image, pixels, read_images
from forgeml.data.io import column as column_values
from forgeml.errors import ConfigError, DataError, ForgeError
from forgeml.evaluate import generated_images
from forgeml.evaluate.frechet import FeatureClassifier, sample_quality
from forgeml.evaluate.pixel_likelihood import bits_per_dim, gaussian_pixel_baseline
from forgeml.models.flops import upsampling_stages
from forgeml.models.gan import DCGAN
from forgeml.models.vae import ConvVAE
from forgeml.tasks.base import SafetensorsFolderTask, TensorSplit

GRID_IMAGES = 64  # samples in the card's grid (the first rows of an evaluation: the same noise every time)
RECONSTRUCTED = 16  # test images shown above their reconstructions
INTERPOLATIONS, INTERPOLATION_STEPS = 4, 10  # rows of the latent interpolation strip, images per row
PROGRESS_FOLDER = "samples_by_step"  # below plots/: a GAN's fixed-noise grid at every validation


class ImageGenerationTask(SafetensorsFolderTask):
    """image-generation: `model.kind: vae | gan`, sized by `model.width` and `model.latent_size`."""

    name = "image-generation"
    features: ClassVar[list[str]] = [IMAGE_COLUMN]
    target = None  # nothing to predict: the task generates images
    refused_actions = ("predict", "explain", "audit", "export", "compress", "serve")  # see Predictor.refuse
    refusal_hint = "it predicts nothing: draw images with forgeml generate RUN --num-samples N -o grid.png"

    def __init__(
        self,
        model: dict[str, Any],
        classifier: str | None = None,
        inputs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.model_options = {key: model[key] for key in ("kind", "width", "latent_size")}
        self.kind: str = model["kind"]
        self.classifier_path = str(classifier) if classifier else None
        self.image_shape: tuple[int, ...] | None = tuple(inputs["shape"]) if inputs and "shape" in inputs else None
        self.seed = seed  # the evaluation noise: the same latent points in every evaluation and grid
        self.progress_folder: Path | None = None  # set by the pipeline: where per-validation grids go
        self._classifier: FeatureClassifier | None = None

    @property
    def primary_metric(self) -> str:
        if self.kind == "vae":
            return "bits_per_dim"
        return "frechet_distance" if self.classifier_path else "training_steps"

    @property
    def dimensions(self) -> int:
        assert self.image_shape is not None, "fit() first"
        return int(np.prod(self.image_shape))

    def classifier(self) -> FeatureClassifier | None:
        """The feature network of `evaluate.classifier`, loaded once; None when the config names none."""
        if self.classifier_path and self._classifier is None:
            if not Path(self.classifier_path).is_dir():
                raise ConfigError(f"evaluate.classifier: {self.classifier_path} does not exist (moved or deleted?)")
            self._classifier = FeatureClassifier(self.classifier_path)
        return self._classifier

    def fit(self, train: Dataset) -> None:
        if len(train) == 0:
            raise DataError("train: no images")
        shape = tuple(train[0][SHAPE_COLUMN])  # pixels() checks every other image against it
        height, width, _ = shape
        try:
            if height != width:
                raise DataError("")
            upsampling_stages(height)
        except DataError:
            raise DataError(
                f"train: images of {width} x {height} pixels; image-generation needs square images of side 4 x a "
                "power of two (8, 16, 32, 64, ...): set data.image_size (e.g. 32)"
            ) from None
        self.image_shape = shape
        classifier = self.classifier()
        if classifier is not None:
            classifier.check_shape(shape)

    def build_model(self) -> nn.Module:
        assert self.image_shape is not None, "fit() first"
        height, width, channels = self.image_shape
        network = ConvVAE if self.kind == "vae" else DCGAN
        options = self.model_options
        return network((channels, height, width), options["width"], options["latent_size"], eval_seed=self.seed)

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> TensorSplit:
        """Pixels in; the same pixels are the targets (what the model learns to generate)."""
        images = torch.from_numpy(self._pixels(dataset, source or "input"))
        return TensorSplit({"pixels": images}, images if with_targets else None)

    def _pixels(self, dataset: Dataset, source: str) -> np.ndarray:
        assert self.image_shape is not None, "fit() first"
        if SHAPE_COLUMN in dataset.column_names:
            return pixels(dataset, self.image_shape, source)
        values = column_values(dataset, IMAGE_COLUMN)
        images = [as_image(value, f"{source}: row {row + 1}", self.image_shape) for row, value in enumerate(values)]
        return np.stack(images).transpose(0, 3, 1, 2).copy()

    def read_file(self, path: Path, config: Any) -> Dataset:
        """A file of images to evaluate the run on (`forgeml evaluate RUN --data FILE`): an npz's x_test, a folder
        of class folders or a table of image files, brought to the run's image size."""
        assert self.image_shape is not None
        return read_images(path, config.data.label, "test", config.data.image, self.image_shape[0])

    # --- scoring ------------------------------------------------------------------------------------------

    def _split_outputs(self, outputs: np.ndarray | torch.Tensor) -> tuple[Any, Any]:
        """(statistics per image, generated images N x C x H x W or None when the outputs carry none)."""
        stats = len((ConvVAE if self.kind == "vae" else DCGAN).stat_names)
        samples = outputs[:, stats:]
        if samples.shape[1] == 0:
            return outputs[:, :stats], None
        height, width, channels = self.image_shape
        return outputs[:, :stats], samples.reshape(len(outputs), channels, height, width)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """VAE: the negative ELBO in bits per dimension. GAN: L_D + L_G (each moves only its own player)."""
        if self.kind == "vae":
            return outputs[:, 0].mean() / (self.dimensions * np.log(2.0))
        return outputs[:, 0].mean() + outputs[:, 1].mean()

    def metrics(self, outputs: np.ndarray, targets: np.ndarray | None) -> dict[str, Any]:
        stats, samples = self._split_outputs(outputs)
        if self.kind == "vae":
            scores: dict[str, Any] = {
                "bits_per_dim": bits_per_dim(stats[:, 0], self.dimensions),
                "reconstruction_bits_per_dim": bits_per_dim(stats[:, 1], self.dimensions),
                "kl_bits_per_dim": bits_per_dim(stats[:, 2], self.dimensions),
            }
        else:
            scores = {
                "discriminator_loss": float(stats[:, 0].mean()),
                "generator_loss": float(stats[:, 1].mean()),
                "training_steps": int(stats[0, 2]) if len(stats) else 0,
            }
        classifier = self.classifier()
        if samples is not None and classifier is not None and targets is not None and len(samples) > 1:
            scores |= sample_quality(classifier, np.asarray(targets), generated_images.as_pixels(samples))
        if samples is not None and self.kind == "gan" and self.progress_folder is not None:
            name = f"step_{scores['training_steps']:07d}.png"  # a re-evaluation of the same weights overwrites
            generated_images.write_grid(samples[:GRID_IMAGES], self.progress_folder / PROGRESS_FOLDER / name)
        return scores

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """The final model's samples (the evaluation noise: the same latent points as every per-step grid), and
        the classes the classifier sees in them."""
        _, samples = self._split_outputs(outputs)
        if samples is not None:
            generated_images.write_grid(
                samples[:GRID_IMAGES], folder / "samples.png", scale=generated_images.CARD_SCALE
            )
        if metrics.get("sample_classes"):
            generated_images.class_histogram(metrics["sample_classes"], folder / "sample_classes.png")

    @torch.inference_mode()
    def report_plots(self, model: nn.Module, split: TensorSplit, history: list[dict[str, Any]], folder: Path) -> None:
        """What needs the model or the training history: reconstructions (VAE), a latent interpolation strip,
        the Fréchet distance and the players' losses over training."""
        model.eval()
        scale = generated_images.CARD_SCALE
        real = split.inputs["pixels"]
        generator = torch.Generator().manual_seed(self.seed)
        shown = torch.as_tensor(np.sort(np.random.default_rng(self.seed).permutation(len(real))[:RECONSTRUCTED]))
        if self.kind == "vae":
            originals = real[shown]
            reconstructed = model.decode_pixels(model.encode(originals)[0])
            rows = []  # test images in one row, their reconstructions in the row below
            for start in range(0, len(originals), 8):
                rows += [originals[start : start + 8].float(), reconstructed[start : start + 8]]
            generated_images.write_grid(torch.cat(rows), folder / "reconstructions.png", columns=8, scale=scale)
            ends = model.encode(real[shown[: 2 * INTERPOLATIONS]])[0]  # posterior means of pairs of test images
            starts, stops = ends[:INTERPOLATIONS], ends[INTERPOLATIONS : 2 * INTERPOLATIONS]
        else:
            starts = torch.randn(INTERPOLATIONS, model.latent_size, generator=generator)
            stops = torch.randn(INTERPOLATIONS, model.latent_size, generator=generator)
        weights = torch.linspace(0.0, 1.0, INTERPOLATION_STEPS)[None, :, None]
        latents = (starts[:, None] * (1 - weights) + stops[:, None] * weights).reshape(-1, starts.shape[1])
        strip = model.decode_pixels(latents.to(starts.device))
        generated_images.write_grid(strip, folder / "interpolation.png", columns=INTERPOLATION_STEPS, scale=scale)
        if any("frechet_distance" in event for event in history):
            generated_images.validation_curves(
                history,
                ["frechet_distance"],
                "Fréchet distance of samples to validation images (classifier features, not FID)",
                folder / "frechet_by_epoch.png",
            )
        if self.kind == "gan":
            generated_images.validation_curves(
                history,
                ["discriminator_loss", "generator_loss"],
                "GAN losses on validation (fixed noise)",
                folder / "losses.png",
            )

    def baselines(self, splits: dict[str, Dataset | None], seed: int) -> dict[str, Any]:
        """The per-pixel independent Gaussian (mean and variance of every sub-pixel over the training images),
        discretized like the VAE's likelihood and scored in bits/dim on the test (else validation) split."""
        if self.kind != "vae":
            return {"skipped": "a GAN gives no likelihood, so there are no bits/dim to compare with baselines"}
        name = next((name for name in ("test", "validation") if splits.get(name) is not None), None)
        if name is None:
            return {"skipped": "no validation or test split to score baselines on"}
        started = time.perf_counter()
        train = pixels(splits["train"], self.image_shape, "train")
        fitted = gaussian_pixel_baseline(train, pixels(splits[name], self.image_shape, name))
        description = (
            "every sub-pixel an independent Gaussian with its own training mean and variance, integrated over its "
            f"pixel bin like the VAE's likelihood (mean std {fitted['mean_pixel_std']:.1f} of 255)"
        )
        return {
            "split": name,
            "train_rows": len(train),
            "seconds": time.perf_counter() - started,
            "models": {
                "per_pixel_gaussian": {
                    "label": "per-pixel Gaussian",
                    "description": description,
                    "metrics": {"bits_per_dim": fitted["bits_per_dim"]},
                }
            },
        }

    # --- generating -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample_images(self, model: nn.Module, count: int, seed: int) -> np.ndarray:
        """`count` new images (N x C x H x W uint8); the same seed gives the same images."""
        if count < 1:
            raise ForgeError(f"num_samples: must be >= 1, got {count}")
        model.eval()
        return generated_images.as_pixels(model.sample(count, torch.Generator().manual_seed(seed)).cpu())

    # --- saving ---------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"shape": list(self.image_shape or ())},
            "model": {**self.model_options, "architecture": self.kind},
            "classifier": self.classifier_path,
            "seed": self.seed,
        }

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any) -> ImageGenerationTask:
        return cls(state["model"], state.get("classifier"), state["inputs"], state.get("seed", 0))
