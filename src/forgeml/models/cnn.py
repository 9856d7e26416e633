"""A small ResNet for images, trained from scratch, with its input normalisation and its training-time
augmentation inside the model.

Inside the model, augmentation follows the model's mode as dropout does: on while training, off for
evaluation, export and serving, so an exported model takes raw pixels and nothing else. It draws from
torch's random generator, which checkpoints save, so a resumed run augments exactly as an uninterrupted
one would. It works on whole batches (one gather for all the crops), on whatever device the model is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from forgeml.models.flops import forward_flops


class Augment(nn.Module):
    """Random crop after padding, horizontal flip, colour jitter and cutout, on pixels in 0..255."""

    def __init__(self, crop_padding: int = 4, flip: bool = True, jitter: float = 0.0, cutout: int = 0):
        super().__init__()
        self.crop_padding, self.flip, self.jitter, self.cutout = crop_padding, flip, jitter, cutout

    def forward(self, pixels: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """`pixels`: N x C x H x W floats; `fill`: the per-channel value cutout paints (the training mean)."""
        if not self.training:
            return pixels
        if self.crop_padding:
            pixels = self._crop(pixels)
        if self.flip:
            flipped = torch.rand(len(pixels), device=pixels.device) < 0.5
            pixels = torch.where(flipped[:, None, None, None], pixels.flip(3), pixels)
        if self.jitter:
            pixels = self._jitter(pixels)
        if self.cutout:
            pixels = self._cutout(pixels, fill)
        return pixels

    def _crop(self, pixels: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixels.shape
        pad = self.crop_padding
        padded = functional.pad(pixels, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), device=pixels.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=pixels.device)
        rows = (dy[:, None] + torch.arange(h, device=pixels.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=pixels.device))[:, None, None, :]
        images = torch.arange(n, device=pixels.device)[:, None, None, None]
        channels = torch.arange(c, device=pixels.device)[None, :, None, None]
        return padded[images, channels, rows, cols]

    def _jitter(self, pixels: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation each scaled by a factor in [1 - jitter, 1 + jitter]."""
        n = len(pixels)

        def factor() -> torch.Tensor:
            return 1.0 + (torch.rand(n, 1, 1, 1, device=pixels.device) * 2 - 1) * self.jitter

        pixels = pixels * factor()
        mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = (pixels - mean) * factor() + mean
        gray = pixels.mean(dim=1, keepdim=True)
        pixels = (pixels - gray) * factor() + gray
        return pixels.clamp(0.0, 255.0)

    def _cutout(self, pixels: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """One square of side `cutout` per image, centred anywhere (DeVries and Taylor 2017), painted `fill`."""
        n, _, h, w = pixels.shape
        cy = torch.randint(0, h, (n, 1, 1), device=pixels.device)
        cx = torch.randint(0, w, (n, 1, 1), device=pixels.device)
        ys = torch.arange(h, device=pixels.device)[None, :, None]
        xs = torch.arange(w, device=pixels.device)[None, None, :]
        half = self.cutout // 2
        hole = ((ys - cy).abs() <= half) & ((xs - cx).abs() <= half)
        return torch.where(hole[:, None], fill.view(1, -1, 1, 1), pixels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (He et al. 2016)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return functional.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem, then `len(depths)` stages of basic blocks (widths width, 2 x width, 4 x width, ...; each stage after
    the first halves the resolution), global average pooling, a linear classifier.

    Takes `pixels`: N x C x H x W in 0..255 (uint8 or float); normalises them with the training split's
    per-channel `mean` and `std` (buffers, saved with the weights).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 32,
        depths: Sequence[int] = (1, 1, 1),
        dropout: float = 0.0,
        augment: dict | None = None,
    ):
        super().__init__()
        channels = image_shape[0]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.augment = Augment(**(augment or {"crop_padding": 0, "flip": False}))
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        channels_in = width
        for stage, depth in enumerate(depths):
            channels_out = width * 2**stage
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels_in, channels_out, stride))
                channels_in = channels_out
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels_in, num_classes)
        # Multiply-adds x 2 of one image's forward pass, counted on a blank image.
        self.forward_flops = forward_flops(self, lambda: self(torch.zeros(1, *image_shape)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.augment(pixels.float(), self.mean)
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        x = self.blocks(self.stem(x))
        return self.head(self.dropout(functional.adaptive_avg_pool2d(x, 1).flatten(1)))

    def training_flops(self, rows: torch.Tensor | list[int], padded_length: int) -> float:
        return 3.0 * self.forward_flops * len(rows)  # backward ~ twice the forward
