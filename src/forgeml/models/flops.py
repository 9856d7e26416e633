"""Small helpers the image models share: their FLOP count, and the generators' noise and number of stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from forgeml.errors import DataError


def upsampling_stages(side: int) -> int:
    """Halvings from `side` down to 4 x 4: the models work on square images of side 4 x 2^k (8, 16, 32, 64...)."""
    stages = 0
    while side > 4 and side % 2 == 0:
        side //= 2
        stages += 1
    if side != 4 or stages == 0:
        raise DataError(f"image-generation: images of side {side * 2**stages} are not 4 x a power of two")
    return stages


def gaussian_noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise: from torch's global generator (saved in checkpoints) when `generator` is None,
    else from `generator` (a CPU one: the same numbers on every device)."""
    if generator is None:
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, generator=generator).to(device)


def forward_flops(model: nn.Module, forward: Callable[[], Any]) -> float:
    """Multiply-adds x 2 of what `forward()` runs through `model` (one image's pass), counted by hooks on its
    convolutions and linear layers (in eval mode: nothing is updated)."""
    total = 0.0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2.0 * output.numel() * kernel
        elif isinstance(module, nn.ConvTranspose2d):  # every input value meets every kernel weight once
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            total += 2.0 * inputs[0].numel() * kernel
        elif isinstance(module, nn.Linear):
            total += 2.0 * module.in_features * module.out_features

    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward()
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
