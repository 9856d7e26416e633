"""A DCGAN (Radford et al. 2016) whose two players train in forgeml's one training loop.

Why one module and one loss: the loop (train/loop.py) takes one loss, one backward and one optimizer step
for every task, and keeps checkpoints, resume, early stopping and progress in one place. `DCGAN.forward`
returns, per image, the discriminator's loss and the generator's loss, and the task's loss is their sum:

- L_D = softplus(-D(x)) + softplus(D(G(z).detach())): the fake images are detached, so L_D moves D only;
- L_G = softplus(-D'(G(z))), the non-saturating generator loss, where D' is the discriminator evaluated
  with detached copies of its parameters (`torch.func.functional_call`), so L_G moves G only.

One backward therefore leaves each player exactly its own gradient, and the loop's one optimizer step
(Adam, betas 0.5 / 0.999 as DCGAN) updates both at once: simultaneous gradient descent, which works for
DCGAN as well as alternating steps and needs no change to the loop. The price is a third pass of D (on the
fakes, for G's loss), a small one next to the generator's.

The usual tricks: spectral normalisation on every layer of D (Miyato et al. 2018) and no batch norm there;
batch norm and ReLU in G, tanh output; weights drawn from N(0, 0.02). The noise z comes from torch's global
generator while training (checkpoints save it: a resumed run draws the same z) and, in eval mode, from a
private generator reset by `.eval()`, so every evaluation shows the same latent points (a fixed-noise grid).
`steps` counts generator updates; it is saved with the weights.

Samples come from a running average of the generator's weights (Yazici et al. 2019; as in BigGAN and
StyleGAN), updated at every training step: simultaneous updates make the generator's weights oscillate
around a good point, and their average sits nearer to it, so its samples are steadier from one epoch to the
next. The average trains nothing (no gradients); its batch-norm statistics are copied from the generator.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional
from torch.nn.utils.parametrizations import spectral_norm

from forgeml.evaluate.pixel_likelihood import to_unit_range
from forgeml.models.flops import forward_flops, gaussian_noise, upsampling_stages

AVERAGE_DECAY = 0.995  # the weight average's horizon: ~200 steps (1.4 epochs of CIFAR-10's subset at batch 64)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Latent (N x latent_size) -> images on the -1..1 scale: a 4 x 4 map of width 2^(k-1) x width, then k
    transposed convolutions each doubling the side and halving the width, the last to the image's channels."""

    def __init__(self, channels: int, side: int, width: int, latent_size: int):
        super().__init__()
        widths = [width * 2**stage for stage in reversed(range(upsampling_stages(side)))]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_size, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        for channels_in, channels_out in itertools.pairwise(widths):
            layers += [nn.ConvTranspose2d(channels_in, channels_out, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(channels_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.layers = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(latent[:, :, None, None])


class Discriminator(nn.Module):
    """Images (-1..1) -> one logit each ("real"): k strided convolutions halving the side down to 4 x 4, then a
    4 x 4 convolution to one number; spectral norm on every layer, leaky ReLUs, no batch norm."""

    def __init__(self, channels: int, side: int, width: int):
        super().__init__()
        widths = [width * 2**stage for stage in range(upsampling_stages(side))]
        layers: list[nn.Module] = []
        channels_in = channels
        for channels_out in widths:
            layers += [nn.Conv2d(channels_in, channels_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            channels_in = channels_out
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0))
        self.layers = nn.Sequential(*layers)
        self.apply(_dcgan_init)
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                spectral_norm(layer)  # in place: the weight becomes a parametrization of `original`

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).flatten()


class DCGAN(nn.Module):
    """Generator and discriminator; `forward(pixels)` gives per image [L_D, L_G, steps] (see the module doc)."""

    stat_names = ("discriminator_loss", "generator_loss", "training_steps")

    def __init__(self, image_shape: tuple[int, int, int], width: int = 32, latent_size: int = 100, eval_seed: int = 0):
        super().__init__()
        channels, side, _ = image_shape
        self.image_shape, self.latent_size, self.eval_seed = tuple(image_shape), latent_size, eval_seed
        self.generator = Generator(channels, side, width, latent_size)
        self.discriminator = Discriminator(channels, side, width)
        self.average_generator = copy.deepcopy(self.generator).requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.eval_generator = torch.Generator()
        latent, blank = torch.zeros(2, latent_size), torch.zeros(1, *self.image_shape)
        self.generator_flops = forward_flops(self.generator, lambda: self.generator(latent)) / 2
        self.discriminator_flops = forward_flops(self.discriminator, lambda: self.discriminator(blank))

    def train(self, mode: bool = True) -> DCGAN:
        if not mode:  # every evaluation draws the same latent points
            self.eval_generator.manual_seed(self.eval_seed)
        return super().train(mode)

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`count` generated images, 0..255 floats."""
        latent = gaussian_noise((count, self.latent_size), generator, self.steps.device)
        return self.to_pixels(self.average_generator(latent))

    def decode_pixels(self, latent: torch.Tensor) -> torch.Tensor:
        """The generator's images for given latent points (0..255 floats): for interpolations."""
        return self.to_pixels(self.average_generator(latent))

    @staticmethod
    def to_pixels(images: torch.Tensor) -> torch.Tensor:
        return ((images + 1.0) * 127.5).clamp(0.0, 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        real = to_unit_range(pixels)
        generator = None if self.training else self.eval_generator
        if self.training:
            self._update_average()
        player = self.generator if self.training else self.average_generator  # evaluations score the average
        fake = player(gaussian_noise((len(real), self.latent_size), generator, real.device))
        discriminator_loss = functional.softplus(-self.discriminator(real)) + functional.softplus(
            self.discriminator(fake.detach())
        )
        # D with detached copies of its parameters: L_G's gradient reaches G and stops at D's weights.
        frozen = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        generator_loss = functional.softplus(-functional_call(self.discriminator, frozen, (fake,)))
        if self.training:
            self.steps += 1
        steps = self.steps.to(real.dtype).expand(len(real))
        stats = torch.stack([discriminator_loss, generator_loss, steps], dim=1)
        if self.training:
            return stats
        return torch.cat([stats, self.to_pixels(fake).flatten(1)], dim=1)

    @torch.no_grad()
    def _update_average(self) -> None:
        """average <- decay * average + (1 - decay) * weights, with a short warm-up (TensorFlow's
        ExponentialMovingAverage with num_updates) so early steps do not keep the random start."""
        decay = min(AVERAGE_DECAY, (1.0 + float(self.steps)) / (10.0 + float(self.steps)))
        for average, live in zip(self.average_generator.parameters(), self.generator.parameters(), strict=True):
            average.lerp_(live, 1.0 - decay)
        for average, live in zip(self.average_generator.buffers(), self.generator.buffers(), strict=True):
            average.copy_(live)

    def training_flops(self, rows: torch.Tensor | list[int], padded_length: int) -> float:
        # G once, D three times (real, detached fakes, fakes for G's loss); backward ~ twice each forward.
        return 3.0 * (self.generator_flops + 3 * self.discriminator_flops) * len(rows)
