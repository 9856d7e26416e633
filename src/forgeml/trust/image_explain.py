"""Saliency for image classifiers: Captum's integrated gradients on the raw pixels, drawn over the image.

What is explained is the predicted class's log-odds, log(p / (1 - p)), as for text (`explain.log_odds`), so
a pixel's score is its share of the change in log-odds between the baseline and the image.

The baseline is the training split's per-channel mean colour (a flat image), not a black one. The model
normalises with that mean, so the baseline is exactly the all-zero input the network sees as "no signal";
a black baseline would instead give every dark pixel (a black cat, a shadow) a difference of zero from the
baseline and so zero attribution, however much the model relies on it (Sturmfels et al., "Visualizing the
Impact of Feature Attribution Baselines", Distill 2020).

Integrated gradients is complete: the attributions sum to f(image) - f(baseline). Captum's numerical
integral misses by `delta`, which each explanation reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from forgeml.trust.explain import log_odds
from forgeml.trust.image_attacks import evaluation_mode

ROWS_PER_PASS = 256  # interpolated images per forward+backward pass: bounds memory for large images


@dataclass
class ImageExplanation:
    """One image's prediction and each pixel's attribution (C x H x W) toward the predicted class."""

    source: str
    label: str
    probability: float
    explained_change: float  # f(image) - f(baseline), the predicted class's log-odds
    delta: float  # sum of attributions - explained_change: Captum's integration error
    true_label: str | None = None
    pixels: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # C x H x W uint8
    attributions: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # C x H x W

    @property
    def saliency(self) -> np.ndarray:
        """H x W: the attribution magnitude summed over colour channels."""
        return np.abs(self.attributions).sum(axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "label": self.label,
            "probability": self.probability,
            "true_label": self.true_label,
            "explained_change": self.explained_change,
            "attribution_sum": self.explained_change + self.delta,
            "delta": self.delta,
        }


def mean_image_baseline(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The training mean colour at every pixel (black when the model keeps no mean)."""
    mean = getattr(model, "mean", None)
    if mean is None:
        return torch.zeros_like(pixels)
    return mean.to(pixels.dtype).view(1, -1, 1, 1).expand_as(pixels).contiguous()


def explain_images(
    model: nn.Module,
    pixels: torch.Tensor,
    classes: list[str],
    steps: int = 50,
    sources: list[str] | None = None,
    true_labels: list[str] | None = None,
) -> list[ImageExplanation]:
    """Integrated-gradients attributions of each image's predicted class (pixels: N x C x H x W, 0..255)."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    device = next(model.parameters()).device
    images = pixels.to(device).float()
    baseline = mean_image_baseline(model, images)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return log_odds(model(batch).float())

    with evaluation_mode(model):
        with torch.no_grad():
            probabilities = torch.softmax(model(images).float(), dim=1)
        predicted = probabilities.argmax(dim=1)
        attributions, delta = IntegratedGradients(forward).attribute(
            images,
            baselines=baseline,
            target=predicted,
            n_steps=steps,
            internal_batch_size=max(len(images), ROWS_PER_PASS),
            return_convergence_delta=True,
        )
        with torch.no_grad():
            change = (forward(images) - forward(baseline)).gather(1, predicted[:, None])[:, 0]
    return [
        ImageExplanation(
            source=sources[i] if sources else f"image {i + 1}",
            label=classes[int(predicted[i])],
            probability=float(probabilities[i, predicted[i]]),
            explained_change=float(change[i]),
            delta=float(delta[i]),
            true_label=true_labels[i] if true_labels else None,
            pixels=pixels[i].cpu().numpy().astype(np.uint8),
            attributions=attributions[i].detach().cpu().numpy(),
        )
        for i in range(len(images))
    ]


def plot_saliency(explanations: list[ImageExplanation], path: Path, columns: int = 4) -> Path:
    """Each image beside its saliency (attribution magnitude over a grey copy of it); wrong answers in red."""
    from forgeml.evaluate.plots import plt, save_figure

    columns = max(1, min(columns, len(explanations)))
    rows = max(1, -(-len(explanations) // columns))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2.9 * columns, 1.75 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, explanation in enumerate(explanations):
        image_axis, overlay_axis = axes[index // columns, 2 * (index % columns) : 2 * (index % columns) + 2]
        picture = explanation.pixels.transpose(1, 2, 0)
        grey = picture.mean(axis=2)
        wrong = explanation.true_label is not None and explanation.true_label != explanation.label
        image_axis.imshow(picture[:, :, 0] if picture.shape[2] == 1 else picture, cmap="gray", vmin=0, vmax=255)
        title = f"{explanation.label} {explanation.probability:.0%}"
        if wrong:
            title += f"\n(is {explanation.true_label})"
        image_axis.set_title(title, fontsize=6.5, color="C3" if wrong else "black")
        saliency = explanation.saliency
        # The 99th percentile, not the maximum, sets full colour: a few extreme pixels would wash out the rest.
        scale = float(np.percentile(saliency, 99)) or 1.0
        overlay_axis.imshow(grey, cmap="gray", vmin=0, vmax=255)
        overlay_axis.imshow(np.clip(saliency / scale, 0, 1), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        overlay_axis.set_title("saliency", fontsize=6.5)
    return save_figure(figure, path)
