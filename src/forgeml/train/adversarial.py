"""Adversarial training: every step also (or only) trains on inputs pushed against the model.

The loop talks to one small interface, `Adversary`: `craft(inputs, targets)` may replace a batch before
its forward pass, and `perturbed()` may run a second, perturbed forward pass after the clean backward pass.
`passes` says how many forward+backward passes a step costs, for the loop's FLOPs count.

- `EmbeddingAdversary` (method fgm, text): the fast gradient method (FGM) of Miyato et al. (2017). Each step
  first takes the ordinary loss. Its gradient with respect to the word embeddings of each input says which
  small change to them hurts the model most; the step then also trains on the embeddings moved by that
  change, scaled to L2 norm `epsilon` per input. The model learns to keep its answer when an input's words
  shift towards their neighbours, which is what typos and synonym swaps do. A step costs about two ordinary
  ones.
- `PixelAdversary` (method pgd, images): Madry et al. (2018). Each batch is replaced by its PGD attack
  (L-infinity ball of `epsilon` x 255 grey levels, random start, `steps` steps) and the step trains on the
  attacked images only: the min-max objective. A step costs `steps + 1` ordinary ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from forgeml.errors import ConfigError


class Adversary:
    """What the training loop asks of an adversarial-training method; the base does nothing."""

    passes: int = 1  # forward+backward passes a training step costs, relative to an ordinary step
    second_pass: bool = False  # whether the loop runs `perturbed()` after the clean backward pass

    def craft(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs the step trains on (the batch itself unless the method replaces it)."""
        return inputs

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """Forward passes inside run on perturbed inputs (methods with `second_pass`)."""
        yield

    def remove(self) -> None:
        """Undo whatever the adversary attached to the model."""


def make_adversary(
    options: Any, model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Adversary:
    """The adversary `train.adversarial` names; `loss(outputs, targets)` is the task's training loss."""
    if options.method == "pgd":
        return PixelAdversary(model, options.epsilon, options.steps, options.step_size, loss)
    return EmbeddingAdversary(model, options.epsilon)


class PixelAdversary(Adversary):
    """Trains on each batch's PGD attack (Madry et al. 2018) for models that take raw pixels."""

    def __init__(
        self,
        model: nn.Module,
        epsilon: float,
        steps: int,
        step_size: float,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ):
        self.model, self.epsilon, self.steps, self.step_size, self.loss = model, epsilon, steps, step_size, loss
        self.passes = steps + 1

    def craft(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's pixels replaced by their PGD attack against the current weights.

        The attack is crafted with the model in evaluation mode (`image_attacks.evaluation_mode`): its
        augmentation would otherwise draw a different crop and flip at every attack step, and batch norm would
        fold every attack step's batch into its running statistics. The training step that follows runs in
        training mode on the attacked pixels, so augmentation moves the perturbation with the image content and
        batch norm learns the statistics of the adversarial images it trains on. The random start draws from
        torch's global generator, which checkpoints save: a resumed run crafts the same attacks.
        """
        from forgeml.trust.image_attacks import evaluation_mode, pgd

        if "pixels" not in inputs:
            raise ConfigError("train.adversarial.method: 'pgd' attacks pixels; the model's inputs have none")
        with evaluation_mode(self.model):
            attacked = pgd(
                self.model, inputs["pixels"], targets, self.epsilon, self.steps, self.step_size, loss=self.loss
            )
        return {**inputs, "pixels": attacked}


class EmbeddingAdversary(Adversary):
    """Hooks a model's word-embedding layer to read its gradient and to add the perturbation."""

    passes = 2
    second_pass = True

    def __init__(self, model: nn.Module, epsilon: float):
        encoder = getattr(model, "encoder", None)
        if encoder is None or not hasattr(encoder, "get_input_embeddings"):
            raise ConfigError("train.adversarial: the model has no word-embedding layer to perturb")
        self.epsilon = epsilon
        self._embeddings: torch.Tensor | None = None  # the clean pass's output, holding its gradient
        self._perturbation: torch.Tensor | None = None
        self._hook = encoder.get_input_embeddings().register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._perturbation is not None:
            return output + self._perturbation
        if output.requires_grad:  # training; evaluation runs without gradients and is left alone
            output.retain_grad()
            self._embeddings = output
        return None

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """After the clean loss's backward pass: forward passes inside run at the worst-case embeddings."""
        if self._embeddings is None or self._embeddings.grad is None:
            raise RuntimeError("perturbed() needs the clean forward and backward pass of the same batch first")
        gradient = self._embeddings.grad.detach()
        norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (gradient.ndim - 1)))
        self._perturbation = self.epsilon * gradient / norms
        try:
            yield
        finally:
            self._perturbation = None
            self._embeddings = None

    def remove(self) -> None:
        self._hook.remove()
