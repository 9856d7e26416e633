"""Images in, one table out: an `.npz` of arrays, a folder of class folders, or a table with an image-path column.

Every image becomes raw uint8 pixels (height x width x channels, in the `image` column) of one shape, with
its shape beside it and its label, so the rest of the pipeline (splitting, sampling, hashing, profiles)
handles images as it handles any table. Files are decoded with Pillow; one that is not an image is named
in the error. Images of different sizes are brought to `data.image_size` (shorter side resized, then the
centre cropped), or refused with the sizes found when it is not set.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from datasets import Dataset

from forgeml.data.io import column, read_table
from forgeml.errors import DataError

IMAGE_COLUMN = "image"
SHAPE_COLUMN = "image_shape"
SOURCE_COLUMN = "source"  # where each image came from: its file, or the npz array and index
PIXEL_COLUMNS = (IMAGE_COLUMN, SHAPE_COLUMN)
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NPZ_KEYS = ("x_{split}", "y_{split}"), ("x", "y"), ("images", "labels")


def read_images(
    path: Path, label: str, split: str = "train", image_column: str = IMAGE_COLUMN, size: int | None = None
) -> Dataset:
    """The images at `path` (an .npz, a folder of class folders, or a table naming image files) as a Dataset
    with columns `image` (raw pixels), `image_shape` and `label`; `split` picks x_<split>/y_<split> in an npz."""
    path = Path(path)
    if path.is_dir():
        return _from_folder(path, label, size)
    if path.suffix == ".npz":
        return _from_npz(path, label, split, size)
    return _from_table(path, label, image_column, size)


class ImageTooLarge(DataError):
    """An image with more pixels than allowed (a server's `serve.max_image_pixels`), found before decoding it."""


def decode_image(
    data: bytes | str | Path, source: str, size: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """One image file (or its bytes) as an H x W x 3 uint8 array; `size`: shorter side resized, centre cropped.

    `max_pixels` refuses a larger image from its header, before the pixels are decoded: a small compressed
    file can hold a huge image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"{source}: {width} x {height} pixels; at most {max_pixels:,} pixels per image")
            image = image.convert("RGB")
            if size is not None:
                image = _resize_and_crop(image, size)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{source}: not a readable image ({error})") from None


def to_rows(images: Iterable[np.ndarray], labels: list | None, label: str, sources: list[str] | None = None) -> Dataset:
    """Arrays -> the image table (labels optional: inputs to predict; `sources` name each image's origin)."""
    pixels, shapes = [], []
    for array in images:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        pixels.append(array.tobytes())
        shapes.append(list(array.shape))
    columns: dict[str, list] = {IMAGE_COLUMN: pixels, SHAPE_COLUMN: shapes}
    if labels is not None:
        columns[label] = labels
    if sources is not None:
        columns[SOURCE_COLUMN] = sources
    return Dataset.from_dict(columns)


def as_image(value: object, source: str, shape: tuple[int, ...], max_pixels: int | None = None) -> np.ndarray:
    """One input to predict (a file path, the bytes of an image file, or nested lists / an array of pixels) as
    an H x W x C uint8 array of `shape`: a file of another size is resized (shorter side) and centre-cropped."""
    height, width, channels = shape
    if isinstance(value, bytes | str | Path):
        array = decode_image(
            value if isinstance(value, bytes) else Path(value), source, height if height == width else None, max_pixels
        )
        if channels == 1:
            array = array.mean(axis=2, keepdims=True).round().astype(np.uint8)
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.shape == tuple(shape):
        return value  # already what the model takes (a server's decoded upload)
    else:
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: expected an image file, its bytes or an array of pixels, got {type(value).__name__}"
            ) from None
        if array.ndim == 2:
            array = array[:, :, None]
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise DataError(f"{source}: pixel values must lie in 0..255")
        array = array.round().astype(np.uint8)
    if array.shape != tuple(shape):
        raise DataError(
            f"{source}: image of shape {array.shape}, the model takes {tuple(shape)} (height, width, channels)"
        )
    return array


def pixels(dataset: Dataset, shape: tuple[int, ...], source: str) -> np.ndarray:
    """The `image` column as one N x C x H x W uint8 array; every image must have `shape` (H, W, C)."""
    shapes = column(dataset, SHAPE_COLUMN)
    for row, found in enumerate(shapes):
        if tuple(found) != tuple(shape):
            raise DataError(
                f"{source}: row {row + 1}: image of shape {tuple(found)}, the model takes {tuple(shape)} "
                "(height, width, channels); set data.image_size to resize"
            )
    raw = b"".join(column(dataset, IMAGE_COLUMN))
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(dataset), *shape).transpose(0, 3, 1, 2).copy()


def _from_npz(path: Path, label: str, split: str, size: int | None) -> Dataset:
    with np.load(path, allow_pickle=False) as archive:
        keys = next(
            ((x.format(split=split), y.format(split=split)) for x, y in NPZ_KEYS if x.format(split=split) in archive),
            None,
        )
        if keys is None or keys[1] not in archive:
            wanted = " or ".join(f"{x.format(split=split)}/{y.format(split=split)}" for x, y in NPZ_KEYS)
            raise DataError(f"{path}: no {wanted} arrays for the {split} split; arrays: {', '.join(archive.files)}")
        images, labels = archive[keys[0]], archive[keys[1]]
        names = [str(n) for n in archive["class_names"]] if "class_names" in archive else None
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise DataError(
            f"{path}: {keys[0]} must be uint8 images N x H x W (x C), got {images.dtype} {tuple(images.shape)}"
        )
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images in {keys[0]} but {len(labels)} labels in {keys[1]}")
    if names is not None:
        out_of_range = [int(v) for v in labels if not 0 <= int(v) < len(names)]
        if out_of_range:
            raise DataError(f"{path}: label {out_of_range[0]} in {keys[1]} has no entry in class_names")
        labels = [names[int(v)] for v in labels]
    else:
        labels = [str(v) for v in labels.tolist()]
    if size is not None and images.shape[1:3] != (size, size):
        from PIL import Image

        images = [np.asarray(_resize_and_crop(Image.fromarray(image), size)) for image in images]
    return to_rows(images, labels, label, [f"{keys[0]}[{index}]" for index in range(len(labels))])


def _from_folder(path: Path, label: str, size: int | None) -> Dataset:
    """ImageFolder convention: path/<class>/<image file>."""
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: a folder of images needs one sub-folder per class; found none")
    files, labels = [], []
    for folder in classes:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in SUFFIXES:
                files.append(file)
                labels.append(folder.name)
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(sorted(SUFFIXES))}) in its class folders")
    return to_rows(_decoded(files, size), labels, label, [str(file) for file in files])


def _from_table(path: Path, label: str, image_column: str, size: int | None) -> Dataset:
    table = read_table(path)
    if image_column not in table.column_names:
        raise DataError(
            f"{path}: no image column {image_column!r} (data.image); columns: {', '.join(table.column_names)}"
        )
    files = [path.parent / str(name) for name in column(table, image_column)]
    labels = column(table, label) if label in table.column_names else None
    return to_rows(_decoded(files, size), labels, label, [str(file) for file in files])


def _decoded(files: list[Path], size: int | None) -> list[np.ndarray]:
    images = [decode_image(file, str(file), size) for file in files]
    reference = images[0].shape
    for file, image in zip(files, images, strict=True):
        if image.shape != reference:
            raise DataError(
                f"{file}: {image.shape[1]} x {image.shape[0]} pixels where {files[0]} has {reference[1]} x "
                f"{reference[0]}; set data.image_size to bring every image to one size"
            )
    return images


def _resize_and_crop(image, size: int):
    """Shorter side to `size` (bilinear), then the centre `size` x `size` (torchvision's Resize + CenterCrop)."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))
