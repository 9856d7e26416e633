"""The promotion gate: is a candidate better than the model it would replace, on the same rows?

Both models answer the same fixed test split, row by row, so the comparison is paired:
- classification: McNemar's exact test on the rows exactly one of the two gets right (a binomial test of
  the discordant counts). Dietterich (1998) found it the test with acceptable type-I error when each
  model is trained once, where a t-test over resamples of the test set is not. The test is one-sided:
  the gate asks whether the candidate is better, so `alpha` is the chance of promoting one that is not.
- regression: a paired bootstrap of the difference in RMSE over the rows (the p-value is the share of
  resamples in which the candidate is not better).
- language models: a paired bootstrap of the difference in bits per character over the same pieces of
  held-out text (or the same examples' responses): per character, not per token, so models with different
  tokenizers are compared on the same footing.
The gain must also reach `gate.min_gain`. Fairness, robustness and latency may not regress by more than
the gate allows, each checked when both runs measured it (audits, `forgeml compress`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.config import GateConfig
from forgeml.errors import ForgeError
from forgeml.workspace import read_json

COMPARISON = "compress/compression.json"


@dataclass
class Contender:
    """One side of the comparison: what it is called, its run folder and (when registered) its version."""

    label: str
    run_dir: Path
    version: int | None = None


def paired_classification(correct_champion: np.ndarray, correct_candidate: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test (one-sided: is the candidate right more often?) of two models' per-row correctness
    on the same rows."""
    from scipy.stats import binomtest

    champion_only = int(np.sum(correct_champion & ~correct_candidate))
    candidate_only = int(np.sum(~correct_champion & correct_candidate))
    discordant = champion_only + candidate_only
    p_value = binomtest(candidate_only, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    return {
        "name": "McNemar exact (one-sided)",
        "both_right": int(np.sum(correct_champion & correct_candidate)),
        "both_wrong": int(np.sum(~correct_champion & ~correct_candidate)),
        "only_champion_right": champion_only,
        "only_candidate_right": candidate_only,
        "p_value": float(p_value),
    }


def paired_regression(
    errors_champion: np.ndarray, errors_candidate: np.ndarray, resamples: int, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap of RMSE(champion) - RMSE(candidate) over the same rows (positive: candidate better)."""
    rng = np.random.default_rng(seed)
    rows = len(errors_champion)
    draws = rng.integers(0, rows, size=(resamples, rows))
    squared_champion, squared_candidate = errors_champion**2, errors_candidate**2
    gains = np.sqrt(squared_champion[draws].mean(axis=1)) - np.sqrt(squared_candidate[draws].mean(axis=1))
    return {
        "name": "paired bootstrap of the RMSE difference",
        "resamples": resamples,
        "ci95": [float(np.quantile(gains, 0.025)), float(np.quantile(gains, 0.975))],
        "p_value": float(np.mean(gains <= 0)),
    }


def paired_generation(
    nll_champion: np.ndarray, nll_candidate: np.ndarray, characters: np.ndarray, resamples: int, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap of bits per character, champion minus candidate (positive: candidate better), over
    the same pieces of text; each side's 95 % interval comes from the same draws."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(characters), size=(resamples, len(characters)))
    per_character = characters[draws].sum(axis=1) * np.log(2)
    bits = {"champion": nll_champion[draws].sum(axis=1) / per_character}
    bits["candidate"] = nll_candidate[draws].sum(axis=1) / per_character
    gains = bits["champion"] - bits["candidate"]
    return {
        "name": "paired bootstrap of the bits-per-character difference",
        "resamples": resamples,
        "pieces": len(characters),
        "ci95": [float(np.quantile(gains, 0.025)), float(np.quantile(gains, 0.975))],
        "p_value": float(np.mean(gains <= 0)),
        "intervals95": {side: [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))] for side, b in bits.items()},
    }


def bootstrap_interval(values: np.ndarray, resamples: int = 2_000, seed: int = 0, of_mean: Any = None) -> list[float]:
    """95 % bootstrap interval of the mean of `values` (e.g. per-row correctness: accuracy), or of
    `of_mean(mean)` (e.g. the RMSE from squared errors: `np.sqrt`)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    if of_mean is not None:
        means = of_mean(means)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def judge(
    champion: Contender,
    candidate: Contender,
    truth: list[Any] | None,
    answers: dict[str, list[dict[str, Any]]],
    gate: GateConfig,
    split: dict[str, Any],
    facts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The gate's verdict from both models' answers on the same rows (`answers["champion"]`, `["candidate"]`),
    the true values, and each run's audit/compression figures (`facts`). A language model's answers are
    its scores of the same pieces of text (`{"nll", "characters"}` each) and `truth` is unused."""
    classification = "label" in answers["champion"][0]
    if "nll" in answers["champion"][0]:
        nll = {side: np.array([a["nll"] for a in answers[side]]) for side in answers}
        characters = np.array([a["characters"] for a in answers["champion"]], dtype=np.float64)
        test = paired_generation(nll["champion"], nll["candidate"], characters, gate.bootstrap)
        values = {side: float(nll[side].sum() / (characters.sum() * np.log(2))) for side in nll}
        intervals = test.pop("intervals95")
        metric, gain = "bits_per_character", values["champion"] - values["candidate"]
        better = gain > 0
    elif classification:
        expected = np.array([str(value) for value in truth])
        right = {side: np.array([str(a["label"]) for a in answers[side]]) == expected for side in answers}
        test = paired_classification(right["champion"], right["candidate"])
        values = {side: float(right[side].mean()) for side in right}
        intervals = {side: bootstrap_interval(right[side].astype(float), gate.bootstrap) for side in right}
        metric, gain = "accuracy", values["candidate"] - values["champion"]
        better = test["only_candidate_right"] > test["only_champion_right"]
    else:
        expected = np.array([float(value) for value in truth])
        errors = {side: np.array([a["value"] for a in answers[side]]) - expected for side in answers}
        test = paired_regression(errors["champion"], errors["candidate"], gate.bootstrap)
        values = {side: float(np.sqrt(np.mean(errors[side] ** 2))) for side in errors}
        intervals = {side: bootstrap_interval(errors[side] ** 2, gate.bootstrap, of_mean=np.sqrt) for side in errors}
        metric, gain = "rmse", values["champion"] - values["candidate"]
        better = gain > 0
    checks = [
        {
            "check": "significant",
            "passed": bool(better and test["p_value"] < gate.alpha),
            "detail": f"p = {test['p_value']:.4g} (alpha {gate.alpha:g}), candidate "
            + ("better" if better else "not better"),
        },
        {
            "check": "min_gain",
            "passed": gain >= gate.min_gain,
            "detail": f"{metric} {'+' if gain >= 0 else ''}{gain:.4f} (at least {gate.min_gain:g})",
        },
        *_regression_checks(facts, gate),
    ]
    return {
        "champion": _describe(champion),
        "candidate": _describe(candidate),
        "split": split,
        "metric": metric,
        "values": values,
        "intervals95": intervals,
        "gain": gain,
        "test": test,
        "checks": checks,
        "passed": all(check["passed"] is not False for check in checks),
        "gate": gate.model_dump(),
    }


def _regression_checks(facts: dict[str, dict[str, Any]], gate: GateConfig) -> list[dict[str, Any]]:
    """Fairness, robustness and latency of the candidate against the champion's (None: not both measured)."""
    checks = []
    limits = (
        ("fairness", "largest demographic parity difference", gate.max_fairness_regression, False),
        ("robustness", "worst robustness change", gate.max_robustness_regression, False),
        ("latency", "batch-1 latency p50 (ms) of the served variant", gate.max_latency_regression, True),
    )
    for name, what, limit, relative in limits:
        before, after = facts["champion"].get(name), facts["candidate"].get(name)
        if limit is None:
            continue
        if before is None or after is None:
            checks.append({"check": name, "passed": None, "detail": f"{what}: not measured for both; not checked"})
            continue
        rise = (after - before) / before if relative and before > 0 else after - before
        shown = f"{rise:+.1%}" if relative else f"{rise:+.4f}"
        allowed = f"{limit:.0%}" if relative else f"{limit:g}"
        checks.append(
            {
                "check": name,
                "passed": rise <= limit,
                "detail": f"{what}: {before:.4g} -> {after:.4g} ({shown}; at most {allowed})",
            }
        )
    return checks


def run_facts(run_dir: Path) -> dict[str, float | None]:
    """A run's fairness gap, robustness change and served latency, where it measured them."""
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    audit = metrics.get("audit") or {}
    gaps = [value for key, value in audit.items() if key.endswith(".demographic_parity_difference")]
    robustness = [value for key, value in audit.items() if key.startswith("robustness_worst_")]
    latency = None
    if (run_dir / COMPARISON).is_file():
        comparison = read_json(run_dir / COMPARISON)
        selected = next((v for v in comparison.get("variants", []) if v["name"] == comparison.get("selected")), None)
        if selected and isinstance(selected.get("latency_ms"), dict):
            latency = selected["latency_ms"].get("p50")
    return {
        "fairness": max(gaps) if gaps else None,
        "robustness": max(robustness) if robustness else None,
        "latency": latency,
    }


def gate_plot(report: dict[str, Any], path: Path) -> Path:
    """Both models' metric with its 95 % interval, and the rows only one of them gets right."""
    from forgeml.evaluate.plots import plt, save_figure

    classification = report["metric"] == "accuracy"
    figure, axes = plt.subplots(1, 2 if classification else 1, figsize=(9 if classification else 5, 3.6), squeeze=False)
    axis = axes[0][0]
    sides = ["champion", "candidate"]
    values = [report["values"][side] for side in sides]
    lows = [value - report["intervals95"][side][0] for side, value in zip(sides, values, strict=True)]
    highs = [report["intervals95"][side][1] - value for side, value in zip(sides, values, strict=True)]
    colours = ["#8a8a8a", "#2b7bba" if report["passed"] else "#c0392b"]
    labels = [report["champion"]["label"], report["candidate"]["label"]]
    axis.bar(labels, values, yerr=[lows, highs], capsize=6, color=colours)
    low = min(report["intervals95"][side][0] for side in sides)
    high = max(report["intervals95"][side][1] for side in sides)
    margin = max(0.01, (high - low) * 0.5)
    axis.set_ylim(max(0.0, low - margin), high + margin)
    axis.set_ylabel(report["metric"])
    axis.set_title(f"{report['metric']} on the fixed {report['split']['name']} split (95 % CI)")
    axis.tick_params(axis="x", labelsize=8)
    if classification:
        test = report["test"]
        table = np.array(
            [[test["both_right"], test["only_champion_right"]], [test["only_candidate_right"], test["both_wrong"]]]
        )
        grid = axes[0][1]
        grid.imshow(table, cmap="Blues")
        for (row, col), count in np.ndenumerate(table):
            grid.text(col, row, str(count), ha="center", va="center", fontsize=12)
        grid.set_xticks([0, 1], ["candidate right", "candidate wrong"])
        grid.set_yticks([0, 1], ["champion right", "champion wrong"])
        grid.set_title(f"McNemar: p = {test['p_value']:.3g}")
    return save_figure(figure, path)


def refusal(report: dict[str, Any]) -> str:
    """Why the gate said no, in one paragraph."""
    failed = [check for check in report["checks"] if check["passed"] is False]
    reasons = "; ".join(f"{check['check']}: {check['detail']}" for check in failed)
    return (
        f"the gate refuses {report['candidate']['label']} over {report['champion']['label']}: {reasons}. "
        "Promote it anyway with --force (recorded in the promotion log)"
    )


def _describe(contender: Contender) -> dict[str, Any]:
    return {"label": contender.label, "run": str(contender.run_dir), "version": contender.version}


def require_same_split(split: str, digests: dict[str, str | None]) -> None:
    """Refuse a comparison of models whose recorded splits differ from the rows they would be scored on."""
    differing = {who: digest for who, digest in digests.items() if digest != digests["rows"]}
    if differing:
        described = ", ".join(f"{who}: {str(d)[:12]}" for who, d in digests.items())
        raise ForgeError(
            f"the {split} split is not the same for both models ({described}); a paired comparison needs the very "
            "same rows: retrain the candidate with `forgeml retrain`, which keeps the test split fixed"
        )
