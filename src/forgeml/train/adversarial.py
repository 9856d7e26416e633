"""Adversarial training on word embeddings: the fast gradient method (FGM) of Miyato et al. (2017).

Each step first takes the ordinary loss. Its gradient with respect to the word embeddings of each
input says which small change to them hurts the model most; the step then also trains on the
embeddings moved by that change, scaled to L2 norm `epsilon` per input. The model learns to keep
its answer when an input's words shift towards their neighbours, which is what typos and synonym
swaps do. A step costs about two ordinary ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from forgeml.errors import ConfigError


class EmbeddingAdversary:
    """Hooks a model's word-embedding layer to read its gradient and to add the perturbation."""

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
