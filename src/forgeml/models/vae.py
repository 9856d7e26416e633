"""A convolutional variational autoencoder (Kingma and Welling 2014) for 8-bit images.

The encoder maps an image to a diagonal Gaussian posterior over `latent_size` numbers; the decoder maps a
latent to a mean and a log-scale per sub-pixel of a discretized logistic (PixelCNN++, Salimans et al. 2017).
A logistic integrated over each of the 256 pixel bins gives every pixel value a probability, so the negative
ELBO is a code length and bits/dim is meaningful; unlike a Bernoulli (binary pixels only) or a 256-way
softmax per sub-pixel (256 outputs per sub-pixel, 128x the decoder's output), it costs two numbers per
sub-pixel, and its learned scale lets the model say how sure it is about each pixel.

`forward(pixels)` returns per image [negative ELBO, reconstruction term, KL term] in nats, so the training
loop's one step minimises the negative ELBO; in eval mode it appends one sample from the prior per row
(the decoder's mean image, 0..255), drawn from a private generator reset by `.eval()`, so every evaluation
scores the same noise. Training noise comes from torch's global generator, which checkpoints save.
"""

from __future__ import annotations

import torch
from torch import nn

from forgeml.evaluate.pixel_likelihood import discretized_logistic_log_prob, to_unit_range
from forgeml.models.flops import forward_flops, gaussian_noise, upsampling_stages

LOG_SCALE_MIN = -7.0  # a logistic narrower than e^-7 of the -1..1 range is far inside one pixel bin


class ConvVAE(nn.Module):
    """Encoder: strided 4x4 convolutions halving the image down to 4 x 4 (widths width, 2 x width, ...), a
    linear layer to the posterior's mean and log-variance. Decoder: the mirror image with transposed
    convolutions, then a 3 x 3 convolution to the likelihood's mean and log-scale per sub-pixel."""

    stat_names = ("nll", "reconstruction", "kl")  # per-image nats, the first columns of every output

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32, latent_size: int = 64, eval_seed: int = 0):
        super().__init__()
        channels, height, _ = image_shape
        self.image_shape, self.latent_size, self.eval_seed = tuple(image_shape), latent_size, eval_seed
        stages = upsampling_stages(height)
        widths = [width * 2**stage for stage in range(stages)]  # encoder order: widest at 4 x 4
        encoder: list[nn.Module] = []
        channels_in = channels
        for channels_out in widths:
            encoder += [nn.Conv2d(channels_in, channels_out, 4, 2, 1), nn.SiLU()]
            channels_in = channels_out
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.bottom = widths[-1]
        self.posterior = nn.Linear(widths[-1] * 16, 2 * latent_size)
        self.expand = nn.Sequential(nn.Linear(latent_size, widths[-1] * 16), nn.SiLU())
        decoder: list[nn.Module] = []
        for channels_in, channels_out in zip(widths[::-1], [*widths[::-1][1:], width], strict=True):
            decoder += [nn.ConvTranspose2d(channels_in, channels_out, 4, 2, 1), nn.SiLU()]
        self.decoder = nn.Sequential(*decoder, nn.Conv2d(width, 2 * channels, 3, 1, 1))
        self.eval_generator = torch.Generator()
        blank = torch.zeros(1, *self.image_shape)
        self.forward_flops = forward_flops(self, lambda: self.decode(self.encode(blank)[0]))

    def train(self, mode: bool = True) -> ConvVAE:
        if not mode:  # every evaluation draws the same noise: comparable scores, a fixed-noise sample grid
            self.eval_generator.manual_seed(self.eval_seed)
        return super().train(mode)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance."""
        mean, log_variance = self.posterior(self.encoder(to_unit_range(pixels))).chunk(2, dim=1)
        return mean, log_variance.clamp(-30.0, 20.0)

    def decode(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The likelihood's mean (-1..1) and log-scale per sub-pixel."""
        hidden = self.expand(latent).view(len(latent), self.bottom, 4, 4)
        mean, log_scale = self.decoder(hidden).chunk(2, dim=1)
        return torch.tanh(mean), log_scale.clamp_min(LOG_SCALE_MIN)

    def decode_pixels(self, latent: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image, 0..255 floats (what reconstructions and samples show)."""
        return ((self.decode(latent)[0] + 1.0) * 127.5).clamp(0.0, 255.0)

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`count` images (0..255 floats) decoded from latents drawn from the prior."""
        latent = gaussian_noise((count, self.latent_size), generator, self.posterior.weight.device)
        return self.decode_pixels(latent)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        generator = None if self.training else self.eval_generator
        mean, log_variance = self.encode(pixels)
        noise = gaussian_noise(mean.shape, generator, mean.device)
        latent = mean + torch.exp(0.5 * log_variance) * noise  # reparameterised: gradients reach the encoder
        pixel_mean, log_scale = self.decode(latent)
        reconstruction = -discretized_logistic_log_prob(pixels, pixel_mean, log_scale).flatten(1).sum(dim=1)
        kl = 0.5 * (mean**2 + log_variance.exp() - 1.0 - log_variance).sum(dim=1)
        stats = torch.stack([reconstruction + kl, reconstruction, kl], dim=1)
        if self.training:
            return stats
        return torch.cat([stats, self.sample(len(pixels), generator).flatten(1)], dim=1)

    def training_flops(self, rows: torch.Tensor | list[int], padded_length: int) -> float:
        return 3.0 * self.forward_flops * len(rows)  # backward ~ twice the forward
