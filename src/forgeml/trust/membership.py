"""Membership inference: can an attacker tell the rows a model was trained on from rows it never saw?

The attack is the loss-threshold attack of Yeom et al. (2018, "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting"). A model that memorises its training rows has a lower
loss on them than on fresh rows from the same distribution, so an attacker who can query the model
and knows a row's true label calls the row a "member" when its loss is below a threshold. Sweeping
the threshold gives a ROC curve of members (training rows) against non-members (held-out rows):

- AUC 0.5: the attacker does no better than a coin flip; losses on training and unseen rows look
  alike and the model leaks nothing this attack can see.
- AUC 1.0: every training row has a lower loss than every unseen row; membership is fully exposed.
- TPR at a low FPR (1 %, 10 %): how many training rows the attacker identifies with confidence,
  the number that matters for individual privacy (Carlini et al., 2022, "Membership Inference
  Attacks From First Principles").

Caveat: this is the simplest attack there is. Shadow-model and per-example calibrated attacks
(LiRA) find more, so the numbers here are a lower bound on leakage: a high AUC proves the model
leaks, an AUC near 0.5 does not prove that it is private. Only training with differential privacy
(DP-SGD) gives a guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional

from forgeml.evaluate import plots
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks.base import EncodedSplit

ATTACK = "loss threshold (Yeom et al., 2018)"
MAX_CURVE_POINTS = 200


def example_losses(task: Any, model: nn.Module, split: EncodedSplit, batch_size: int = 64) -> np.ndarray:
    """The loss of every row of a labelled split, in row order (float64, >= 0).

    Classification: cross-entropy of the logits against the class id. Regression: squared error
    on the standardised target (the quantity the model was trained to make small). The Task's own
    `loss` averages over a batch, so the per-row values are computed here from the raw outputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    outputs, targets = model_outputs(model, split, batch_size, device=device)
    if targets is None:
        raise ValueError("example_losses needs a labelled split (encode it with with_targets=True)")
    if outputs.ndim != 2:
        raise ValueError(
            f"example_losses supports one output row per example (classification or regression); "
            f"got outputs of shape {outputs.shape}"
        )
    if _is_classification(task, targets):
        losses = functional.cross_entropy(
            torch.from_numpy(outputs).double(), torch.from_numpy(targets).long(), reduction="none"
        )
        return losses.numpy()
    errors = outputs.astype(np.float64).reshape(-1) - targets.astype(np.float64).reshape(-1)
    return errors**2


def membership_inference(
    task: Any,
    model: nn.Module,
    members: EncodedSplit,
    non_members: EncodedSplit,
    batch_size: int = 64,
    max_examples: int = 2000,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the loss-threshold attack on training rows (`members`) against held-out rows (`non_members`).

    Both sides are sampled to the same size (at most `max_examples` each, seeded) so that AUC and
    advantage are not skewed by class imbalance. The attack score is -loss: the lower the loss, the
    surer the attacker is that the row was trained on. Returns a JSON-serialisable report:

    - auc, auc_ci95 ([lo, hi] from `bootstrap` seeded resamples of each side; None when 0)
    - tpr_at_1pct_fpr, tpr_at_10pct_fpr: members found while wrongly flagging at most 1 % / 10 % of
      non-members (with fewer than 100 non-members, 1 % FPR means no false positive at all)
    - advantage: max(TPR - FPR) over thresholds (Yeom et al.'s membership advantage)
    - members / non_members: count, mean_loss, median_loss
    - roc: {fpr, tpr} with at most 200 points, for plotting

    AUC 0.5 means no leakage this attack can measure; it is a lower bound, not a privacy guarantee.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 (0 disables the interval), got {bootstrap}")
    for name, split in (("members", members), ("non_members", non_members)):
        if len(split) == 0:
            raise ValueError(f"membership_inference: {name} is empty; it needs labelled rows")

    rng = np.random.default_rng(seed)
    count = min(len(members), len(non_members), max_examples)
    member_losses = example_losses(task, model, _sample(members, count, rng), batch_size)
    non_member_losses = example_losses(task, model, _sample(non_members, count, rng), batch_size)
    # The same generator goes on to the bootstrap, so a seed gives the same report as before this was split out.
    return loss_threshold_attack(member_losses, non_member_losses, bootstrap, seed, rng=rng)


def loss_threshold_attack(
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    bootstrap: int = 200,
    seed: int = 0,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """The loss-threshold attack (Yeom et al., 2018) on losses already computed, one per member / non-member.

    Whatever the unit (a table row, a window of text), a lower loss is taken as evidence of membership.
    Returns the report `membership_inference` documents; `seed` is recorded and seeds the bootstrap
    unless `rng` (a generator already in use by the caller) is given.
    """
    member_losses = np.asarray(member_losses, dtype=np.float64).reshape(-1)
    non_member_losses = np.asarray(non_member_losses, dtype=np.float64).reshape(-1)
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 (0 disables the interval), got {bootstrap}")
    for name, losses in (("member_losses", member_losses), ("non_member_losses", non_member_losses)):
        if len(losses) == 0 or not np.isfinite(losses).all():
            raise ValueError(f"loss_threshold_attack: {name} must be a non-empty array of finite losses")
    rng = np.random.default_rng(seed) if rng is None else rng
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(non_member_losses))])
    scores = -np.concatenate([member_losses, non_member_losses])
    fpr, tpr, _ = roc_curve(labels, scores)
    curve = _downsample(fpr, tpr, MAX_CURVE_POINTS)
    return {
        "attack": ATTACK,
        "auc": float(roc_auc_score(labels, scores)),
        "auc_ci95": _bootstrap_auc(member_losses, non_member_losses, bootstrap, rng),
        "tpr_at_1pct_fpr": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_10pct_fpr": _tpr_at(fpr, tpr, 0.10),
        "advantage": float(np.max(tpr - fpr)),
        "members": _summary(member_losses),
        "non_members": _summary(non_member_losses),
        "bootstrap": bootstrap,
        "seed": seed,
        "roc": {"fpr": [float(v) for v in fpr[curve]], "tpr": [float(v) for v in tpr[curve]]},
    }


def verdict(report: dict[str, Any]) -> str:
    """One line a person can read: the AUC, its interval, and what it says about memorisation."""
    auc, interval = report["auc"], report.get("auc_ci95")
    low, high = interval if interval else (auc, auc)
    head = f"AUC {auc:.2f} [{low:.2f}, {high:.2f}]" if interval else f"AUC {auc:.2f}"
    # A side counts only when the interval excludes 0.5 and the AUC is at least 0.05 away from it.
    if high < 0.5 and auc <= 0.45:
        return f"{head}: unseen rows get lower losses than training rows; no leakage, but check the splits"
    if low <= 0.5 or auc < 0.55:
        return f"{head}: no measurable leakage (a loss-threshold attack is only a lower bound)"
    found = f"TPR {100 * report['tpr_at_1pct_fpr']:.0f} % at 1 % FPR"
    if auc < 0.6:
        return f"{head}, {found}: slight leakage; training rows are a little more familiar to the model"
    if auc < 0.7:
        return f"{head}, {found}: moderate leakage; the model partly memorises its training rows"
    return f"{head}, {found}: strong leakage; the model memorises its training rows"


def plot_membership_roc(report: dict[str, Any], path: Path) -> Path:
    """The attack's ROC curve (linear) beside its low-FPR part (log-log), each with the chance diagonal."""
    fpr, tpr = np.asarray(report["roc"]["fpr"]), np.asarray(report["roc"]["tpr"])
    interval = report.get("auc_ci95")
    label = f"loss attack, AUC {report['auc']:.3f}"
    if interval:
        label += f" (95 % CI {interval[0]:.3f}-{interval[1]:.3f})"
    figure, (linear, logarithmic) = plots.plt.subplots(1, 2, figsize=(10, 4.2))
    linear.plot(fpr, tpr, label=label, color="tab:red")
    linear.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC 0.5)")
    linear.set_xlim(0, 1)
    linear.set_ylim(0, 1)
    linear.set_title("Membership inference ROC")

    # Log axes show what matters for privacy: members found at very few false alarms.
    smallest = 1.0 / max(1, report["non_members"]["count"])
    shown = fpr > 0
    logarithmic.loglog(fpr[shown], np.maximum(tpr[shown], smallest / 10), color="tab:red")
    logarithmic.loglog([smallest, 1], [smallest, 1], "--", color="grey")
    for level in (0.01, 0.1):
        logarithmic.axvline(level, color="lightgrey", linewidth=0.8)
    logarithmic.set_xlim(smallest, 1)
    logarithmic.set_ylim(smallest / 10, 1)
    logarithmic.set_title(
        f"Low FPR: TPR {100 * report['tpr_at_1pct_fpr']:.1f} % at 1 %, {100 * report['tpr_at_10pct_fpr']:.1f} % at 10 %"
    )
    for axis in (linear, logarithmic):
        axis.set_xlabel("false positive rate (non-members flagged)")
        axis.set_ylabel("true positive rate (members found)")
    linear.legend(loc="lower right", fontsize=8)
    return plots.save_figure(figure, Path(path))


class _Rows:
    """Some rows of an EncodedSplit, seen as an EncodedSplit of their own."""

    def __init__(self, split: EncodedSplit, rows: np.ndarray):
        self.split, self.rows = split, rows
        self.lengths = np.asarray(split.lengths)[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return self.split.batch(self.rows[np.asarray(rows, dtype=np.int64)].tolist())


def _sample(split: EncodedSplit, count: int, rng: np.random.Generator) -> EncodedSplit:
    if count >= len(split):
        return split
    return _Rows(split, np.sort(rng.choice(len(split), size=count, replace=False)))


def _is_classification(task: Any, targets: np.ndarray) -> bool:
    kind = getattr(getattr(task, "target", None), "kind", None)
    if kind is not None:
        return kind == "classification"
    return np.issubdtype(targets.dtype, np.integer)  # class ids; regression targets are floats


def _bootstrap_auc(
    member_losses: np.ndarray, non_member_losses: np.ndarray, rounds: int, rng: np.random.Generator
) -> list[float] | None:
    """Percentile 95 % interval of the AUC, resampling members and non-members separately."""
    if rounds == 0:
        return None
    count = len(member_losses)
    labels = np.concatenate([np.ones(count), np.zeros(len(non_member_losses))])
    aucs = np.empty(rounds)
    for round_ in range(rounds):
        members = rng.choice(member_losses, size=count, replace=True)
        non_members = rng.choice(non_member_losses, size=len(non_member_losses), replace=True)
        aucs[round_] = roc_auc_score(labels, -np.concatenate([members, non_members]))
    low, high = np.percentile(aucs, [2.5, 97.5])
    return [float(low), float(high)]


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The best TPR among thresholds whose FPR stays at or below `level`."""
    allowed = fpr <= level + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def _downsample(fpr: np.ndarray, tpr: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` curve points: half even along the curve, half log-spaced in FPR."""
    if len(fpr) <= limit:
        return np.arange(len(fpr))
    half = (limit - 2) // 2  # the two ends are always kept
    even = np.linspace(0, len(fpr) - 1, half).round().astype(np.int64)
    positive = fpr[fpr > 0]
    levels = np.geomspace(positive.min(), 1.0, half) if len(positive) else np.array([1.0])
    low = np.clip(np.searchsorted(fpr, levels, side="right") - 1, 0, len(fpr) - 1)
    return np.unique(np.concatenate([even, low, [0, len(fpr) - 1]]))


def _summary(losses: np.ndarray) -> dict[str, Any]:
    return {"count": len(losses), "mean_loss": float(losses.mean()), "median_loss": float(np.median(losses))}
