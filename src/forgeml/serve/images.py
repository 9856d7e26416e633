"""Images in prediction requests: base64 strings in JSON, or uploaded files.

Each image is decoded, checked and brought to the model's input shape in the request's own handler,
before it reaches the micro-batcher: an image that is not one is that caller's 422 (and one too large
its 413), never a failed batch shared with other callers' requests.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

from forgeml.data.images import IMAGE_COLUMN, as_image
from forgeml.errors import DataError


def request_images(records: list[Any], shape: tuple[int, ...], max_pixels: int) -> list[np.ndarray]:
    """Each record (the bytes of an image file, its base64 text or data: URL, or {"image": that}) as an
    H x W x C uint8 array of `shape`. Raises DataError naming the record (`ImageTooLarge` when too large)."""
    images = []
    for index, record in enumerate(records):
        source = f"inputs[{index}]"
        if isinstance(record, dict):
            unknown = sorted(set(record) - {IMAGE_COLUMN})
            if unknown or IMAGE_COLUMN not in record:
                raise DataError(f"{source}: an image record is {{{IMAGE_COLUMN!r}: base64}}; got keys {sorted(record)}")
            record = record[IMAGE_COLUMN]
        if isinstance(record, str):
            record = from_base64(record, source)
        if not isinstance(record, bytes):
            raise DataError(f"{source}: send an image file as base64 text, got {type(record).__name__}")
        images.append(as_image(record, source, shape, max_pixels))
    return images


def from_base64(text: str, source: str) -> bytes:
    """The bytes of base64 `text`, which may be a data: URL (what a browser's FileReader gives)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise DataError(f"{source}: a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{source}: not base64; send the image file's bytes base64-encoded") from None


def png_base64(image: np.ndarray) -> str:
    """An H x W x C uint8 image as base64 PNG text: how a served image is kept with its prediction."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
