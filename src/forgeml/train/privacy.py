"""Differentially private training: DP-SGD (Abadi et al. 2016) with Opacus.

Each step samples a batch by Poisson sampling (every training row joins independently with
probability q = batch_size / rows), clips each example's gradient to `max_grad_norm`, and adds
Gaussian noise to their sum. The noise multiplier is solved up front so that the planned number
of steps spends at most the configured epsilon; the accountant then reports what was spent.

Opacus is an optional dependency (`pip install 'forgeml[privacy]'`), imported only here.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import nn

from forgeml.config import DifferentialPrivacyConfig
from forgeml.errors import ConfigError


def _opacus():
    try:
        import opacus
    except ImportError:
        raise ConfigError(
            "train.privacy: DP-SGD needs Opacus, which is not installed; pip install 'forgeml[privacy]'"
        ) from None
    return opacus


@dataclass
class PrivacyPlan:
    """What DP-SGD will do, fixed before the first step (so a resumed run recomputes the same plan)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str
    sample_rate: float
    planned_steps: int
    noise_multiplier: float
    frozen_parameters: int
    trainable_parameters: int

    def spent_epsilon(self, steps: int) -> float:
        """Epsilon spent after `steps` noisy steps at this plan's noise and sampling rate."""
        if steps == 0:
            return 0.0
        from opacus.accountants import create_accountant

        accountant = create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(delta=self.delta))

    def summary(self, steps: int) -> dict[str, Any]:
        return {**asdict(self), "steps": steps, "epsilon": self.spent_epsilon(steps)}


def plan_privacy(
    config: DifferentialPrivacyConfig, model: nn.Module, rows: int, batch_size: int, steps: int
) -> PrivacyPlan:
    """Freeze what the config says, then solve the noise for `steps` Poisson-sampled batches."""
    opacus = _opacus()
    if batch_size >= rows:
        raise ConfigError(
            f"train.batch_size: {batch_size} is not below the {rows} training rows; DP-SGD needs sampled batches"
        )
    frozen = freeze_embedding_tables(model) if config.freeze_embeddings else 0
    errors = opacus.validators.ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"train.privacy: this model has layers DP-SGD cannot train: {errors[0]}")
    sample_rate = batch_size / rows
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        noise = opacus.accountants.utils.get_noise_multiplier(
            target_epsilon=config.epsilon,
            target_delta=config.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=config.accountant,
        )
    return PrivacyPlan(
        target_epsilon=config.epsilon,
        delta=config.delta,
        max_grad_norm=config.max_grad_norm,
        accountant=config.accountant,
        sample_rate=sample_rate,
        planned_steps=steps,
        noise_multiplier=float(noise),
        frozen_parameters=frozen,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def freeze_embedding_tables(model: nn.Module) -> int:
    """Stop training every nn.Embedding; returns how many parameters were frozen.

    A transformer's token table (30k x 384 for MiniLM) would need one gradient copy per example
    and would spread the noise over rows most batches never touch.
    """
    frozen = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen += parameter.numel()
    return frozen


def make_private(model: nn.Module, optimizer, plan: PrivacyPlan, batch_size: int):
    """Wrap the model for per-example gradients and the optimizer for clipping and noise.

    The optimizer draws its noise from torch's global generator, which checkpoints save, so a
    resumed run adds exactly the noise an uninterrupted one would have.
    """
    opacus = _opacus()
    # Opacus's backward hooks sit on layers whose inputs need no gradient (the first one); PyTorch
    # warns about that on every step although the per-example gradients are right.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    private_model = opacus.GradSampleModule(model, loss_reduction="mean")
    private_optimizer = opacus.optimizers.DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
    )
    return private_model, private_optimizer


def release(private_model: nn.Module) -> None:
    """Take Opacus's hooks and per-example gradients off the model so later code sees a plain module."""
    private_model.remove_hooks()
    for parameter in private_model.parameters():
        for name in ("grad_sample", "summed_grad"):
            if hasattr(parameter, name):
                delattr(parameter, name)


def poisson_batches(rows: int, sample_rate: float, count: int, seed: int) -> list[np.ndarray]:
    """`count` batches, each holding every row independently with probability `sample_rate`.

    Poisson sampling is what the accountant's privacy amplification assumes; shuffled fixed-size
    batches would not match the epsilon it reports. Batch sizes vary around rows * sample_rate.
    """
    rng = np.random.default_rng(seed)
    return [np.flatnonzero(rng.random(rows) < sample_rate) for _ in range(count)]
