"""Sample quality of an image generator, measured with a forgeml image classifier.

The Fréchet distance (Heusel et al. 2017) compares two sets of images through the mean and covariance of a
network's features: here the global-pooled penultimate features (the input of the head) of a forgeml
`image-classification` run the user trained on similar images. The published FID uses Inception-v3
features pre-trained on ImageNet, which cannot be downloaded here, so these numbers rank generators
trained on the same data against each other and over training; they are NOT comparable to published FID.
The classifier also says how confidently it recognises a class in each sample and which classes the samples
look like (a generator that draws one class only shows as a spike).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forgeml.errors import ConfigError

NOT_FID = (
    "Fréchet distances here use the penultimate features of the forgeml classifier run named in "
    "evaluate.classifier, not Inception-v3: they compare generators on the same data (and a generator over its "
    "training) and are NOT comparable to published (Inception-based) FID numbers."
)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two sets of feature rows (N x D each).

    Tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a
    symmetric matrix with the same eigenvalues: stable where a general matrix square root (scipy's sqrtm)
    returns complex noise for nearly singular covariances."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: needs two N x D feature sets (N >= 2), got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0.0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(max(distance, 0.0))  # rounding can take an exact 0 a hair below zero


class FeatureClassifier:
    """A finished image-classification run: penultimate features and class probabilities of pixel batches."""

    def __init__(self, run_dir: str | Path):
        from forgeml.tasks import load_task

        self.run_dir = Path(run_dir)
        model_folder = self.run_dir / "model"
        if not (model_folder / "task.json").is_file():
            raise ConfigError(
                f"evaluate.classifier: {self.run_dir} is not a finished forgeml run (no model/task.json); name an "
                "image-classification run directory, e.g. runs/cifar10/latest"
            )
        task, model = load_task(model_folder)
        if getattr(task, "name", None) != "image-classification" or not hasattr(model, "head"):
            raise ConfigError(
                f"evaluate.classifier: {self.run_dir} is a {getattr(task, 'name', '?')} run; the Fréchet distance "
                "needs an image-classification run"
            )
        self.image_shape: tuple[int, ...] = tuple(task.image_shape)  # (height, width, channels)
        self.classes: list[str] = list(task.target.classes)
        self.model: nn.Module = model.eval()

    @torch.inference_mode()
    def features(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(features N x D, probabilities N x classes) of N x C x H x W pixels in 0..255."""
        captured: list[torch.Tensor] = []
        # The head's input is the global-pooled penultimate activation (dropout is off in eval mode).
        hook = self.model.head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
        probabilities = []
        try:
            pixels = torch.as_tensor(pixels)
            for start in range(0, len(pixels), batch_size):
                logits = self.model(pixels=pixels[start : start + batch_size].float())
                probabilities.append(torch.softmax(logits.float(), dim=1))
        finally:
            hook.remove()
        return torch.cat(captured).double().numpy(), torch.cat(probabilities).double().numpy()

    def check_shape(self, image_shape: tuple[int, ...]) -> None:
        if tuple(image_shape) != self.image_shape:
            raise ConfigError(
                f"evaluate.classifier: {self.run_dir} takes images of shape {self.image_shape} (height, width, "
                f"channels); this run's images are {tuple(image_shape)}"
            )


def sample_quality(classifier: FeatureClassifier, real: np.ndarray, samples: np.ndarray) -> dict[str, Any]:
    """Fréchet distance between `real` and `samples` (pixels, N x C x H x W), the classifier's mean top-class
    probability on each set, and the classes it sees in the samples."""
    real_features, real_probabilities = classifier.features(real)
    sample_features, sample_probabilities = classifier.features(samples)
    counts = np.bincount(sample_probabilities.argmax(axis=1), minlength=len(classifier.classes))
    return {
        "frechet_distance": frechet_distance(real_features, sample_features),
        "sample_confidence": float(sample_probabilities.max(axis=1).mean()),
        "real_confidence": float(real_probabilities.max(axis=1).mean()),
        "sample_classes": {name: int(count) for name, count in zip(classifier.classes, counts, strict=True)},
        "frechet_images": int(min(len(real), len(samples))),
    }
