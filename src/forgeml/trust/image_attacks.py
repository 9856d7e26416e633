"""L-infinity attacks on image classifiers in pixel space: FGSM and PGD, and accuracy curves over epsilon.

Models take raw pixels (0..255) and normalise inside, so the attacks work on the pixels a user would
send: a budget `epsilon` is a fraction of the pixel range (8/255 moves each pixel by at most 8 grey levels),
and every adversarial image is clamped back into 0..255.

- FGSM (Goodfellow et al. 2015): one step of size epsilon along the sign of the loss gradient.
- PGD (Madry et al. 2018): a random start inside the epsilon ball, then `steps` signed-gradient steps of
  `step_size`, each projected back onto the ball and the valid pixel range. Step size 2.5 * epsilon / steps
  lets the iterate reach the ball's surface from anywhere inside it.

Adversarial Robustness Toolbox, torchattacks and foolbox implement these; each is a large dependency for
the ~40 lines needed here, and none knows that our models take raw pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

PIXEL_RANGE = 255.0
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_step_size(epsilon: float, steps: int) -> float:
    """Madry et al.'s 2.5 * epsilon / steps."""
    return 2.5 * epsilon / steps


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside, its previous mode after (attributions and attacks are computed this way).

    Explanations need it to be deterministic (no dropout). Attacks need it because the model's augmentation
    (on in training mode) would otherwise draw a new crop and flip for every step, so the gradient would be of
    a different image each time, and batch norm would use batch statistics and update its running averages
    with every attacked batch.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_gradient(model: nn.Module, pixels: torch.Tensor, targets: torch.Tensor, loss: Loss) -> torch.Tensor:
    """d loss / d pixels, without touching the parameters' .grad (a training step may be accumulating there)."""
    pixels = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss(model(pixels), targets)
        (gradient,) = torch.autograd.grad(value, pixels)
    return gradient


def fgsm(
    model: nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    epsilon: float,
    loss: Loss = functional.cross_entropy,
) -> torch.Tensor:
    """The fast gradient sign attack: `pixels` (N x C x H x W, 0..255) moved by `epsilon` x 255 per pixel."""
    budget = epsilon * PIXEL_RANGE
    pixels = pixels.float()
    gradient = _input_gradient(model, pixels, targets, loss)
    return (pixels + budget * gradient.sign()).clamp(0.0, PIXEL_RANGE).detach()


def pgd(
    model: nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    epsilon: float,
    steps: int,
    step_size: float | None = None,
    loss: Loss = functional.cross_entropy,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent with a random start; `epsilon` and `step_size` are fractions of the pixel range.

    The random start draws from `generator`, or from torch's global generator when it is None (training:
    checkpoints save that generator, so a resumed run draws the same starts).
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    budget = epsilon * PIXEL_RANGE
    stride = (step_size if step_size is not None else default_step_size(epsilon, steps)) * PIXEL_RANGE
    pixels = pixels.float()
    noise = torch.rand(pixels.shape, generator=generator, dtype=pixels.dtype)
    adversarial = (pixels + (noise.to(pixels.device) * 2 - 1) * budget).clamp(0.0, PIXEL_RANGE)
    for _ in range(steps):
        gradient = _input_gradient(model, adversarial, targets, loss)
        adversarial = adversarial + stride * gradient.sign()
        adversarial = torch.min(torch.max(adversarial, pixels - budget), pixels + budget).clamp(0.0, PIXEL_RANGE)
    return adversarial.detach()


def _predicted(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels).argmax(dim=1)


def epsilon_label(epsilon: float) -> str:
    """0.0314 -> '8/255': budgets read best in grey levels."""
    levels = epsilon * PIXEL_RANGE
    return f"{levels:.0f}/255" if abs(levels - round(levels)) < 1e-6 else f"{levels:.3g}/255"


def robustness_curve(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor | None,
    epsilons: Sequence[float],
    pgd_steps: int = 10,
    seed: int = 0,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Accuracy under FGSM and PGD-`pgd_steps` at every epsilon, on `pixels` (N x C x H x W, uint8 or 0..255).

    Without `labels` the attacks push away from the model's own clean answer and only the share of answers
    that flip is measured. PGD's random starts come from a generator seeded with `seed`, so another model
    (a baseline) scored with the same seed on the same rows gets the same attack. Returns a JSON-serialisable
    report in the shape of the other robustness probes (kind, metric, clean, results).
    """
    if not epsilons or any(e <= 0 or e > 1 for e in epsilons):
        raise ValueError(f"epsilons: fractions of the pixel range in (0, 1] expected, got {list(epsilons)}")
    if len(pixels) == 0:
        raise ValueError("robustness: no images to attack")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    clean_answers, answers = [], {(name, e): [] for name in ("fgsm", "pgd") for e in epsilons}
    with evaluation_mode(model):
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size].to(device).float()
            clean = _predicted(model, batch)
            clean_answers.append(clean)
            targets = labels[start : start + batch_size].to(device) if labels is not None else clean
            for epsilon in epsilons:
                answers["fgsm", epsilon].append(_predicted(model, fgsm(model, batch, targets, epsilon)))
                attacked = pgd(model, batch, targets, epsilon, pgd_steps, generator=generator)
                answers["pgd", epsilon].append(_predicted(model, attacked))
    clean = torch.cat(clean_answers).cpu().numpy()
    truth = labels.cpu().numpy() if labels is not None else None

    def accuracy(predicted: np.ndarray) -> float | None:
        return None if truth is None else float(np.mean(predicted == truth))

    clean_accuracy = accuracy(clean)
    results = []
    for (name, epsilon), parts in answers.items():
        predicted = torch.cat(parts).cpu().numpy()
        score = accuracy(predicted)
        results.append(
            {
                "attack": name if name == "fgsm" else f"pgd-{pgd_steps}",
                "epsilon": float(epsilon),
                "epsilon_label": epsilon_label(epsilon),
                "accuracy": score,
                "accuracy_drop": None if score is None else clean_accuracy - score,
                "flip_rate": float(np.mean(predicted != clean)),
            }
        )
    return {
        "kind": "classification",
        "metric": "accuracy",
        "labelled": truth is not None,
        "examples": len(pixels),
        "seed": seed,
        "pgd_steps": pgd_steps,
        "pgd_step_size": "2.5 * epsilon / steps",
        "norm": "L-infinity, as a fraction of the pixel range 0..255",
        "note": None if truth is not None else "no labels: the attacks push away from the model's own answers",
        "clean": {"accuracy": clean_accuracy},
        "results": results,
    }


def headline_numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """{'pgd_accuracy_at_8_255': ..., 'fgsm_accuracy_at_8_255': ...} (flip rates when there were no labels)."""
    measure = "accuracy" if report["labelled"] else "flip_rate"
    return {
        f"{prefix}{row['attack'].split('-')[0]}_{measure}_at_{row['epsilon_label'].replace('/', '_')}": row[measure]
        for row in report["results"]
    }


def plot_attack_curve(report: dict[str, Any], path: Path, baseline: dict[str, Any] | None = None) -> Path:
    """Accuracy (flip rate without labels) against epsilon for FGSM and PGD; clean dashed; a baseline run faded."""
    from forgeml.evaluate.plots import plt, save_figure

    measure = "accuracy" if report["labelled"] else "flip_rate"
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for shown, faded, who in ((report, False, "this run"), (baseline, True, "baseline")):
        if shown is None:
            continue
        for colour, attack in zip(("C0", "C3"), dict.fromkeys(r["attack"] for r in shown["results"]), strict=False):
            rows = [r for r in shown["results"] if r["attack"] == attack]
            axis.plot(
                [255 * r["epsilon"] for r in rows],
                [r[measure] for r in rows],
                marker="o",
                color=colour,
                alpha=0.35 if faded else 1.0,
                linestyle=":" if faded else "-",
                label=f"{attack.upper()} ({who})" if baseline is not None else attack.upper(),
            )
        clean = shown["clean"]["accuracy"]
        if measure == "accuracy" and clean is not None:
            axis.axhline(
                clean,
                color="black",
                linestyle="--",
                linewidth=1,
                alpha=0.35 if faded else 1.0,
                label=f"clean ({who}, {clean:.3f})" if baseline is not None else f"clean ({clean:.3f})",
            )
    axis.set_xlabel("epsilon (grey levels of 255, L-infinity)")
    axis.set_ylabel(measure.replace("_", " "))
    axis.set_ylim(0, 1.05)
    axis.set_title("Accuracy under attack" if measure == "accuracy" else "Answers flipped by the attack")
    axis.legend(fontsize=7)
    return save_figure(figure, path)


def attack_section(
    report: dict[str, Any], plot_path_relative: str, where: str, baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The model card's "Robustness" section for an image model: the curve, its table, a before/after table."""
    from forgeml.trust.robustness import comparison_table

    labelled = report["labelled"]
    measured = ["accuracy", "accuracy_drop", "flip_rate"] if labelled else ["flip_rate"]
    paragraphs = [
        f"White-box L-infinity attacks on {report['examples']:,} images of {where}: FGSM (one signed-gradient step) "
        f"and PGD with {report['pgd_steps']} steps from a random start (step 2.5 x epsilon / steps). Epsilon is "
        "how many grey levels of 255 each pixel may move; 8/255 is barely visible. An undefended model usually "
        "falls near 0 at 8/255; PGD is the stronger attack, so its curve is the one to trust."
        + (f" {report['note'][:1].upper()}{report['note'][1:]}." if report.get("note") else "")
    ]
    facts = [["images attacked", f"{report['examples']:,}"]]
    if labelled:
        facts.append(["clean accuracy", f"{report['clean']['accuracy']:.4f}"])
    rows = [[row["attack"], row["epsilon_label"], *(_fmt(row[name]) for name in measured)] for row in report["results"]]
    tables = [
        {
            "header": ["attack", "epsilon", *(name.replace("_", " ") for name in measured)],
            "rows": rows,
            "caption": "Attacks over epsilon.",
        }
    ]
    if baseline is not None:
        paragraphs.append(
            f"Before and after: the baseline run {baseline['run']} got the same attacks (same seed) on the same images."
        )
        tables.append(comparison_table(baseline["report"], report))
    caption = "Accuracy under FGSM and PGD against epsilon; the dashed line is clean accuracy."
    if baseline is not None:
        caption += " Faded: the baseline run."
    return {
        "title": "Robustness",
        "paragraphs": paragraphs,
        "facts": facts,
        "tables": tables,
        "plots": [{"path": plot_path_relative, "caption": caption}],
    }


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"
