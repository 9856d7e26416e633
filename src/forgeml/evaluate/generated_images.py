"""Pictures of an image generator: tiled sample grids (exact pixels, as PNG) and its training curves."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.workspace import atomic_write_bytes

GAP = 2  # pixels of white between tiled images
CARD_SCALE = 3  # 32 x 32 images are enlarged (nearest neighbour) in the card's figures to be seen at all


def as_pixels(images: Any) -> np.ndarray:
    """Floats (or uint8) in 0..255, N x C x H x W -> rounded uint8."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64)), 0, 255).astype(np.uint8)


def grid_shape(count: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a grid of `count` images: square-ish unless `columns` is given."""
    columns = columns or int(np.ceil(np.sqrt(count)))
    return int(np.ceil(count / columns)), columns


def tile(images: np.ndarray, columns: int | None = None, gap: int = GAP) -> np.ndarray:
    """N x C x H x W uint8 -> one H' x W' x C image: the images row by row, `gap` white pixels between them."""
    count, channels, height, width = images.shape
    rows, columns = grid_shape(count, columns)
    canvas = np.full(
        (rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, channels), 255, dtype=np.uint8
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + gap), column * (width + gap)
        canvas[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    return canvas


def write_png(image: np.ndarray, path: Path, scale: int = 1) -> Path:
    """An H x W x C uint8 array as a PNG file (written atomically), enlarged `scale` times (nearest)."""
    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_grid(images: Any, path: Path, columns: int | None = None, scale: int = 1) -> Path:
    """Images (N x C x H x W, 0..255) tiled into one PNG."""
    return write_png(tile(as_pixels(images), columns), path, scale)


def validation_curves(history: list[dict[str, Any]], keys: list[str], title: str, path: Path) -> Path:
    """Each of `keys` at every validation of training (from the training history), against the epoch."""
    from forgeml.evaluate.plots import plt, save_figure

    evaluations = [event for event in history if event.get("event") == "eval"]
    # Epochs from steps: the loop's last evaluation, at the final step, still carries the epoch it ran in.
    first = next((event for event in evaluations if event.get("epoch")), None)
    steps_per_epoch = first["step"] / first["epoch"] if first else 1.0
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for key in keys:
        points = [(event["step"] / steps_per_epoch, event[key]) for event in evaluations if key in event]
        if points:
            epochs, values = zip(*points, strict=True)
            axis.plot(epochs, values, marker="o", label=key.replace("_", " "))
    axis.set_xlabel("epoch")
    axis.set_title(title, fontsize=10)
    axis.legend()
    return save_figure(figure, path)


def class_histogram(counts: dict[str, int], path: Path) -> Path:
    """Bars: how many samples the classifier assigns to each class."""
    from forgeml.evaluate.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(max(5, 0.6 * len(counts) + 2), 3.4))
    axis.bar(range(len(counts)), list(counts.values()))
    axis.set_xticks(range(len(counts)), list(counts), rotation=30 if len(counts) > 4 else 0)
    axis.set_ylabel("samples")
    axis.set_title("Classes the classifier sees in the samples")
    return save_figure(figure, path)
