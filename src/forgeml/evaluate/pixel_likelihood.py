"""Likelihoods of 8-bit pixels, in bits per dimension, and the per-pixel Gaussian baseline.

A pixel is one of 256 values, so a density model of images must give each value a probability: a
continuous density is integrated over the value's bin (width 1 of 0..255; the end bins take the tails).
The result is a probability mass, so -log2 of it per sub-pixel is a code length in bits per dimension,
comparable across models of the same data (8 bits/dim is what storing raw bytes costs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional

NATS_PER_BIT = math.log(2.0)
ELBO_NOTE = (
    "bits_per_dim is the VAE's negative ELBO in bits per sub-pixel (8 bits/dim stores raw bytes): an upper bound on "
    "its negative log-likelihood, since the ELBO bounds the log-likelihood from below; each image's ELBO is "
    "estimated with one posterior sample. The per-pixel Gaussian baseline is scored with the same discretization."
)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 -> -1..1 (the scale the VAE's decoder and the GAN's generator work in)."""
    return pixels.float() / 127.5 - 1.0


def discretized_logistic_log_prob(pixels: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(pixel) per sub-pixel (nats) under a logistic of `mean` and `log_scale` (both on the -1..1 scale)
    integrated over the pixel's bin of width 2/255 (PixelCNN++, Salimans et al. 2017; the IAF VAE, Kingma et
    al. 2016). Values 0 and 255 take the whole tail beyond their bin edge."""
    x = to_unit_range(pixels)
    inverse_scale = torch.exp(-log_scale)
    centered = x - mean
    upper = inverse_scale * (centered + 1.0 / 255.0)
    lower = inverse_scale * (centered - 1.0 / 255.0)
    log_cdf_upper = functional.logsigmoid(upper)  # the bin of 0: everything below its upper edge
    log_survival_lower = functional.logsigmoid(-lower)  # the bin of 255: everything above its lower edge
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    # Where the bin's mass underflows in float32, the density at its centre times its width takes over.
    middle = inverse_scale * centered
    log_density_middle = middle - log_scale - 2.0 * functional.softplus(middle)
    inner = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_density_middle - math.log(127.5))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, inner))


def discretized_gaussian_log_prob(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(pixel) per sub-pixel (nats) under a Gaussian of `mean` and `std` (on the 0..255 scale) integrated
    over the pixel's bin [k - 0.5, k + 0.5]; 0 and 255 take the tails. Computed from log-CDFs (and on the
    mirrored side above the mean) so that bins far in a tail keep their precision."""
    x = pixels.double()
    mean, std = mean.double(), std.double()
    lower = torch.where(x <= 0, torch.full_like(x, -math.inf), (x - 0.5 - mean) / std)
    upper = torch.where(x >= 255, torch.full_like(x, math.inf), (x + 0.5 - mean) / std)
    # P = Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): use the side where both CDFs are small.
    mirrored = lower > 0
    high = torch.where(mirrored, -lower, upper)
    low = torch.where(mirrored, -upper, lower)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    return log_high + torch.log1p(-torch.exp(log_low - log_high).clamp(max=1.0 - 1e-15))


def bits_per_dim(nats_per_image: np.ndarray | torch.Tensor | float, dimensions: int) -> float:
    """Mean negative log-likelihood per image (nats) -> bits per sub-pixel."""
    return float(np.mean(np.asarray(nats_per_image, dtype=np.float64))) / (dimensions * NATS_PER_BIT)


def gaussian_pixel_baseline(train: np.ndarray, evaluated: np.ndarray, chunk: int = 512) -> dict[str, Any]:
    """The per-pixel independent Gaussian: each sub-pixel's mean and variance fitted on `train` (N x C x H x W
    uint8), scored on `evaluated` with the same discretization as the VAE. Returns bits/dim and the fit."""
    count = len(train)
    total = np.zeros(train.shape[1:], dtype=np.float64)
    squares = np.zeros(train.shape[1:], dtype=np.float64)
    for start in range(0, count, chunk):  # float64 copies of every image at once would not fit in memory
        block = train[start : start + chunk].astype(np.float64)
        total += block.sum(axis=0)
        squares += (block**2).sum(axis=0)
    mean = total / count
    # A constant pixel in training would give a zero-width Gaussian; a floor of one level keeps it a density.
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0)).clip(min=1.0)
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    nats = []
    for start in range(0, len(evaluated), chunk):
        block = torch.from_numpy(evaluated[start : start + chunk])
        nats.append(-discretized_gaussian_log_prob(block, mean_t, std_t).flatten(1).sum(dim=1))
    dimensions = int(np.prod(train.shape[1:]))
    return {
        "bits_per_dim": bits_per_dim(torch.cat(nats).numpy(), dimensions),
        "mean_pixel_std": float(std.mean()),
    }
