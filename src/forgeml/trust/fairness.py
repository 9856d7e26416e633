"""Fairness audit: group metrics with bootstrap intervals, per-group threshold mitigation, identity swaps.

Three independent tools, all returning plain JSON-ready dicts:

- `group_report` compares accuracy, selection rate, TPR and FPR across the groups of each sensitive
  column and measures the gaps (Fairlearn's demographic parity and equalized odds). Without true labels
  it reports what needs none: selection rates, mean predicted probabilities and demographic parity.
- `fit_thresholds` / `apply_thresholds` post-process scores with per-group thresholds found by
  Fairlearn's `ThresholdOptimizer`; the fitted rule is stored as JSON, never pickled.
- `counterfactual_flips` swaps identity terms in texts, or consistently in both texts of a pair
  ("he" -> "she", "christian" -> "muslim"), and counts how often the prediction changes.

Labels are class names (strings). For a multi-class task, selection rate, TPR and FPR are computed for
`positive_label` against all other classes (one-vs-rest); accuracy uses every class.
"""

from __future__ import annotations

import functools
import json
import math
import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from fairlearn.postprocessing import ThresholdOptimizer
from sklearn.base import BaseEstimator

from forgeml.errors import ArtifactError, DataError
from forgeml.evaluate.plots import plt, save_figure  # plots sets the file-only Agg backend first

UNKNOWN = "unknown"  # the group of rows whose sensitive value is missing
GROUP_METRICS = ("accuracy", "selection_rate", "tpr", "fpr")
DISPARITIES = ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference")
NEEDS_LABELS = ("accuracy", "tpr", "fpr", "equalized_odds_difference")  # left out when there are no true labels
CONSTRAINTS = ("demographic_parity", "equalized_odds")
RULE_FORMAT = "forgeml.fairness.thresholds/1"
IDENTITY_TERMS = Path(__file__).with_name("identity_terms.json")


# ---------------------------------------------------------------------------------------------------
# Group report
# ---------------------------------------------------------------------------------------------------


def group_report(
    y_true: Sequence[str] | None,
    y_pred: Sequence[str],
    sensitive: dict[str, Sequence],
    positive_label: str,
    bins: int = 4,
    bootstrap: int = 200,
    seed: int = 0,
    scores: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Per-group metrics and disparity measures for every sensitive column.

    Numeric columns (with more distinct values than `bins`) are cut into `bins` quantile bins labelled by
    the smallest and largest value inside ("17–28"); other columns are used as they are. Missing values
    (None, NaN, empty text) form the group "unknown". Selection rate, TPR and FPR are for
    `positive_label` one-vs-rest. Disparities get 95 % percentile bootstrap intervals from `bootstrap`
    seeded resamples of the rows (0 skips them). Undefined values (a TPR for a group without positives,
    a ratio of zeros) are None, so the result is valid JSON.

    `scores` (P(positive_label) per row) add each group's mean as `mean_probability`. With `y_true=None`
    (a file without labels) only what needs no labels is reported: count, selection rate, mean probability
    and the demographic-parity gaps; the measures in `NEEDS_LABELS` are left out and listed under
    `needs_labels`. The caller then vouches that `positive_label` is one of the model's classes.
    """
    labelled = y_true is not None
    y_pred = _labels(y_pred)
    y_true = _labels(y_true) if labelled else None
    if labelled and len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if scores is not None:
        scores = np.asarray(scores, dtype=float).reshape(-1)
        if len(scores) != len(y_pred):
            raise ValueError(f"scores has {len(scores)} values but y_pred has {len(y_pred)}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}")
    positive_label = str(positive_label)
    if labelled and positive_label not in set(y_true) | set(y_pred):
        raise DataError(
            f"positive label {positive_label!r} occurs in neither the true nor the predicted labels "
            f"(seen: {', '.join(sorted(set(y_true) | set(y_pred))[:10])})"
        )
    truth = y_true == positive_label if labelled else None
    decision = y_pred == positive_label
    columns = {}
    for name, values in sensitive.items():
        if len(values) != len(y_pred):
            raise DataError(f"sensitive column {name!r} has {len(values)} values but there are {len(y_pred)} rows")
        groups, order, kind = sensitive_groups(values, bins)
        columns[name] = _column_report(y_true, y_pred, truth, decision, scores, groups, order, kind, bootstrap, seed)
    report: dict[str, Any] = {
        "positive_label": positive_label,
        "rows": len(y_pred),
        "labelled": labelled,
        "note": "selection_rate, tpr and fpr are for positive_label against all other classes"
        if labelled
        else "no true labels: selection_rate (share predicted positive_label), mean_probability and demographic "
        "parity only; accuracy, tpr, fpr and equalized_odds_difference need the true labels and were not computed",
        "overall": _overall(y_true, y_pred, truth, decision, scores),
        "columns": columns,
        "bootstrap": {"resamples": bootstrap, "seed": seed, "confidence": 0.95},
    }
    if not labelled:
        report["needs_labels"] = list(NEEDS_LABELS)
    return report


def sensitive_groups(values: Sequence, bins: int | None = 4) -> tuple[np.ndarray, list[str], str]:
    """Values -> (group label per row, groups in display order, "numeric" | "categorical").

    Numbers with more than `bins` distinct values become quantile bins; `bins=None` never bins.
    """
    binning = numeric_binning(values, bins)
    labels = group_labels(values, binning)
    present = set(labels) - {UNKNOWN}
    order = [label for label in binning["labels"] if label in present] if binning else sorted(present, key=_natural_key)
    if UNKNOWN in set(labels):
        order.append(UNKNOWN)
    return labels, order, "numeric" if binning else "categorical"


def numeric_binning(values: Sequence, bins: int | None) -> dict[str, list] | None:
    """Quantile cut points and bin labels ("17–28": smallest and largest value inside) for a numeric
    column with more than `bins` distinct values; None for anything else. JSON-ready, so a fitted
    threshold rule can bin new rows the same way."""
    present = [v for v in values if not _is_missing(v)]
    if bins is None or not present or not all(_is_number(v) for v in present):
        return None
    numbers = np.asarray(present, dtype=float)
    if len(np.unique(numbers)) <= bins:
        return None
    cuts = np.unique(np.quantile(numbers, np.linspace(0, 1, bins + 1)[1:-1]))
    which = np.searchsorted(cuts, numbers, side="right")
    edges = [-math.inf, *cuts, math.inf]
    labels = []
    for b in range(len(cuts) + 1):
        inside = numbers[which == b]
        low, high = (inside.min(), inside.max()) if inside.size else (edges[b], edges[b + 1])
        low, high = _format_number(low), _format_number(high)
        labels.append(low if low == high else f"{low}–{high}")
    return {"cuts": [float(c) for c in cuts], "labels": labels}


def group_labels(values: Sequence, binning: dict[str, list] | None = None) -> np.ndarray:
    """Group label per row: the bin label under `binning`, else the value as text; missing -> "unknown"."""
    labels = np.full(len(values), UNKNOWN, dtype=object)
    for row, value in enumerate(values):
        if _is_missing(value):
            continue
        number = _as_float(value)
        if binning and number is not None:
            labels[row] = binning["labels"][int(np.searchsorted(binning["cuts"], number, side="right"))]
        else:
            labels[row] = _format_number(value) if _is_number(value) else str(value)
    return labels


def _column_report(
    y_true: np.ndarray | None,
    y_pred: np.ndarray,
    truth: np.ndarray | None,
    decision: np.ndarray,
    scores: np.ndarray | None,
    groups: np.ndarray,
    order: list[str],
    kind: str,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    frame = _metric_frame(y_true, y_pred, truth, decision, scores, groups)
    by_group = {}
    for group in order:
        row = frame.by_group.loc[group]
        values: dict[str, Any] = {"count": int(row["count"])}
        if truth is not None:
            positives, negatives = int(truth[groups == group].sum()), int((~truth[groups == group]).sum())
            values["accuracy"] = _number(row["accuracy"])
            values["selection_rate"] = _number(row["selection_rate"])
            # Fairlearn reports 0 for a rate with an empty denominator; "undefined" is the honest answer.
            values["tpr"] = _number(row["tpr"]) if positives else None
            values["fpr"] = _number(row["fpr"]) if negatives else None
        else:
            values["selection_rate"] = _number(row["selection_rate"])
        if scores is not None:
            values["mean_probability"] = _number(row["mean_probability"])
        by_group[group] = values
    values = _point_disparities(truth, decision, groups, by_group)
    intervals = _bootstrap_intervals(truth, decision, groups, bootstrap, seed)
    return {
        "kind": kind,
        "groups": by_group,
        "disparities": {name: {"value": values[name], "ci95": intervals[name]} for name in values},
    }


def _metric_frame(
    y_true: np.ndarray | None,
    y_pred: np.ndarray,
    truth: np.ndarray | None,
    decision: np.ndarray,
    scores: np.ndarray | None,
    groups: np.ndarray,
) -> MetricFrame:
    # MetricFrame passes one y_true/y_pred pair to every metric; accuracy needs the class names and the
    # rates need the one-vs-rest booleans, so both travel as row indices and each metric picks its own.
    # Selection rate ignores y_true, so without labels the decisions stand in for it.
    reference = decision if truth is None else truth

    def on_labels(metric: Callable) -> Callable:
        return lambda rows, _: metric(y_true[rows], y_pred[rows])

    def on_positive(metric: Callable) -> Callable:
        return lambda rows, _: metric(reference[rows].astype(int), decision[rows].astype(int))

    rows = np.arange(len(y_pred))
    metrics: dict[str, Callable] = {"count": lambda rows, _: count(rows, rows)}
    if truth is not None:
        metrics["accuracy"] = on_labels(lambda t, p: float(np.mean(t == p)))
    metrics["selection_rate"] = on_positive(selection_rate)
    if truth is not None:
        metrics["tpr"] = on_positive(true_positive_rate)
        metrics["fpr"] = on_positive(false_positive_rate)
    if scores is not None:
        metrics["mean_probability"] = lambda rows, _: float(np.mean(scores[rows]))
    return MetricFrame(metrics=metrics, y_true=rows, y_pred=rows, sensitive_features=list(groups))


def _overall(
    y_true: np.ndarray | None,
    y_pred: np.ndarray,
    truth: np.ndarray | None,
    decision: np.ndarray,
    scores: np.ndarray | None,
) -> dict[str, Any]:
    overall: dict[str, Any] = {"count": len(y_pred)}
    if truth is not None:
        overall["accuracy"] = _number(np.mean(y_true == y_pred)) if len(y_true) else None
    overall["selection_rate"] = _number(np.mean(decision)) if len(decision) else None
    if truth is not None:
        overall["tpr"] = _number(decision[truth].mean()) if truth.any() else None
        overall["fpr"] = _number(decision[~truth].mean()) if (~truth).any() else None
    if scores is not None:
        overall["mean_probability"] = _number(np.mean(scores)) if len(scores) else None
    return overall


def _point_disparities(
    truth: np.ndarray | None, decision: np.ndarray, groups: np.ndarray, by_group: dict[str, dict]
) -> dict[str, float | None]:
    features = list(groups)
    decided = decision.astype(int)
    reference = decided if truth is None else truth.astype(int)  # demographic parity ignores y_true
    values = {
        "demographic_parity_difference": demographic_parity_difference(reference, decided, sensitive_features=features),
        "demographic_parity_ratio": demographic_parity_ratio(reference, decided, sensitive_features=features),
    }
    if truth is not None:
        values["equalized_odds_difference"] = equalized_odds_difference(reference, decided, sensitive_features=features)
        if any(g["tpr"] is None or g["fpr"] is None for g in by_group.values()):
            # Fairlearn would count a group's undefined TPR/FPR as 0 and invent a gap; use the defined ones.
            values["equalized_odds_difference"] = _largest_gap(
                [g["tpr"] for g in by_group.values()], [g["fpr"] for g in by_group.values()]
            )
    return {name: _number(value) for name, value in values.items()}


def _largest_gap(*rates: list[float | None]) -> float | None:
    gaps = [max(r) - min(r) for r in ([v for v in rate if v is not None] for rate in rates) if r]
    return max(gaps) if gaps else None


def _bootstrap_intervals(
    truth: np.ndarray | None, decision: np.ndarray, groups: np.ndarray, resamples: int, seed: int
) -> dict[str, list[float] | None]:
    """95 % percentile intervals of the disparities over `resamples` row resamples (no equalized odds
    without labels)."""
    names = DISPARITIES if truth is not None else tuple(d for d in DISPARITIES if d not in NEEDS_LABELS)
    if resamples == 0:
        return dict.fromkeys(names)
    if truth is None:  # demographic parity needs no labels; the equalized-odds column is computed and dropped
        truth = np.zeros(len(decision), dtype=bool)
    # One MetricFrame costs ~150 ms, so 200 of them per column would take half a minute: the resamples
    # use bincount arithmetic with the same definitions (checked against Fairlearn in the tests).
    group_names, group_ids = np.unique(groups.astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    samples = np.array(
        [
            _fast_disparities(truth[rows], decision[rows], group_ids[rows], len(group_names))
            for rows in rng.integers(0, len(truth), size=(resamples, len(truth)))
        ]
    )
    intervals = {}
    for column, name in enumerate(DISPARITIES):
        if name not in names:
            continue
        finite = samples[:, column][np.isfinite(samples[:, column])]
        intervals[name] = (
            [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None
        )
    return intervals


def _fast_disparities(truth: np.ndarray, decision: np.ndarray, group_ids: np.ndarray, n_groups: int) -> list[float]:
    """DP difference, DP ratio, EO difference (NaN where undefined) from per-group counts."""
    rows = np.bincount(group_ids, minlength=n_groups)
    positives = np.bincount(group_ids, weights=truth, minlength=n_groups)
    selected = np.bincount(group_ids, weights=decision, minlength=n_groups)
    true_positives = np.bincount(group_ids, weights=truth & decision, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = (selected / rows)[rows > 0]
        tpr = (true_positives / positives)[positives > 0]
        fpr = ((selected - true_positives) / (rows - positives))[rows - positives > 0]
        ratio = rate.min() / rate.max() if rate.max() > 0 else math.nan
    gaps = [r.max() - r.min() for r in (tpr, fpr) if r.size]
    return [float(rate.max() - rate.min()), float(ratio), max(gaps) if gaps else math.nan]


# ---------------------------------------------------------------------------------------------------
# Group plots
# ---------------------------------------------------------------------------------------------------


def plot_group_metrics(report: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per sensitive column: accuracy, selection rate, TPR, FPR and mean probability (those the
    report has: no labels, no accuracy) side by side for each group."""
    paths = []
    for column, result in report["columns"].items():
        groups = list(result["groups"])
        present = next(iter(result["groups"].values()), {})
        metrics = [m for m in (*GROUP_METRICS, "mean_probability") if m in present]
        figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4))
        width = 0.8 / len(metrics)
        positions = np.arange(len(groups))
        for offset, metric in enumerate(metrics):
            heights = [_nan_if_none(result["groups"][g][metric]) for g in groups]
            label = f"mean P({report['positive_label']})" if metric == "mean_probability" else metric.replace("_", " ")
            axis.bar(positions + offset * width, heights, width, label=label)
        labels = [f"{textwrap.fill(g, 14)}\n(n={result['groups'][g]['count']})" for g in groups]
        crowded = len(groups) > 5 or max(len(g) for g in groups) > 14
        axis.set_xticks(positions + width * (len(metrics) - 1) / 2, labels)
        if crowded:
            axis.tick_params(axis="x", labelrotation=30)
            plt.setp(axis.get_xticklabels(), ha="right", rotation_mode="anchor")
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("rate")
        gap = result["disparities"]["demographic_parity_difference"]["value"]
        axis.set_title(f"{column}: metrics by group (DP difference {_fmt(gap)})")
        axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        paths.append(save_figure(figure, Path(folder) / f"fairness_{_slug(column)}.png"))
    return paths


# ---------------------------------------------------------------------------------------------------
# Threshold mitigation
# ---------------------------------------------------------------------------------------------------


class _ScoreAsProbability(BaseEstimator):
    """A fitted "model" whose positive-class probability is its single input column.

    ThresholdOptimizer post-processes an estimator; our scores come from any model (torch, ONNX), so the
    scores themselves are the input and this stand-in hands them back unchanged.
    """

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _ScoreAsProbability:
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        scores = np.asarray(X, dtype=float)[:, 0]
        return np.column_stack([1.0 - scores, scores])

    def __sklearn_is_fitted__(self) -> bool:
        return True


def fit_thresholds(
    scores: Sequence[float],
    y_true: Sequence[str],
    sensitive_values: Sequence,
    constraint: Literal["demographic_parity", "equalized_odds"],
    positive_label: str,
    seed: int = 0,
    bins: int | None = 4,
) -> dict[str, Any]:
    """Fit per-group thresholds (Fairlearn ThresholdOptimizer, accuracy objective) on validation data.

    `scores` are P(positive_label) per row; `sensitive_values` are group values (missing -> "unknown").
    A numeric column is cut into `bins` quantile bins as in `group_report`; the cut points are kept in the
    rule (`bins`; None for a categorical column) so new rows are binned the same way.

    Returns the decision rule as a JSON-ready dict: per group, with probability p0 apply operation0 and
    with probability p1 operation1 (each a `score > threshold` or `score < threshold` test; infinite
    thresholds are the strings "inf"/"-inf"), plus `p_ignore`/`prediction_constant` for equalized odds.
    Groups not seen here get `default`: the single threshold that maximises accuracy over all rows.
    `validation` records the rule's accuracy and selection rate per group on these rows (draws seeded).
    """
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {constraint!r}")
    scores_array = np.asarray(scores, dtype=float)
    truth = _labels(y_true) == str(positive_label)
    binning = numeric_binning(list(sensitive_values), bins)
    groups = group_labels(list(sensitive_values), binning)
    if not len(scores_array) == len(truth) == len(groups):
        raise ValueError(f"scores ({len(scores_array)}), y_true ({len(truth)}) and sensitive_values differ in length")
    _require_both_outcomes(truth, groups, str(positive_label))
    optimizer = ThresholdOptimizer(
        estimator=_ScoreAsProbability(),
        constraints=constraint,
        objective="accuracy_score",
        prefit=True,
        predict_method="predict_proba",
    )
    optimizer.fit(scores_array[:, None], truth.astype(int), sensitive_features=list(groups))
    rule = {
        "format": RULE_FORMAT,
        "method": "fairlearn.postprocessing.ThresholdOptimizer",
        "constraint": constraint,
        "objective": "accuracy_score",
        "positive_label": str(positive_label),
        "bins": binning,
        "groups": {
            str(group): _interpolation_to_json(interpolation)
            for group, interpolation in optimizer.interpolated_thresholder_.interpolation_dict.items()
        },
        "default": _single_threshold(_best_accuracy_threshold(scores_array, truth)),
    }
    rule["validation"] = _rule_summary(rule, scores_array, truth, groups, seed)
    return rule


def apply_thresholds(
    rule: dict[str, Any], scores: Sequence[float], sensitive_values: Sequence, seed: int = 0
) -> np.ndarray:
    """Decisions (True = positive_label) from a rule made by `fit_thresholds`.

    Rows whose group mixes two thresholds are decided by a draw from `np.random.RandomState(seed)`,
    the same draws Fairlearn's `predict(random_state=seed)` makes, so decisions are reproducible and
    equal Fairlearn's own.
    """
    _check_rule(rule)
    scores_array = np.asarray(scores, dtype=float)
    groups = group_labels(list(sensitive_values), rule.get("bins"))
    if len(groups) != len(scores_array):
        raise ValueError(f"scores ({len(scores_array)}) and sensitive_values ({len(groups)}) differ in length")
    probability = np.zeros(len(scores_array))
    for group in set(groups):
        rows = groups == group
        probability[rows] = _positive_probability(rule["groups"].get(group, rule["default"]), scores_array[rows])
    return probability >= np.random.RandomState(seed).rand(len(scores_array))


def _interpolation_to_json(interpolation: Any) -> dict[str, Any]:
    entry = {
        "p0": float(interpolation.p0),
        "operation0": _operation_to_json(interpolation.operation0),
        "p1": float(interpolation.p1),
        "operation1": _operation_to_json(interpolation.operation1),
    }
    if "p_ignore" in interpolation:  # equalized odds mixes in a constant prediction to meet the common ROC point
        entry["p_ignore"] = float(interpolation.p_ignore)
        entry["prediction_constant"] = float(interpolation.prediction_constant)
    return entry


def _operation_to_json(operation: Any) -> dict[str, Any]:
    threshold = float(operation.threshold)
    return {"operator": operation.operator, "threshold": threshold if math.isfinite(threshold) else str(threshold)}


def _single_threshold(threshold: float) -> dict[str, Any]:
    operation = {"operator": ">", "threshold": threshold}
    return {"p0": 1.0, "operation0": operation, "p1": 0.0, "operation1": dict(operation)}


def _positive_probability(entry: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    # Same arithmetic, in the same order, as fairlearn's InterpolatedThresholder._pmf_predict.
    probability = entry["p0"] * _operate(entry["operation0"], scores) + entry["p1"] * _operate(
        entry["operation1"], scores
    )
    if "p_ignore" in entry:
        probability = entry["p_ignore"] * entry["prediction_constant"] + (1 - entry["p_ignore"]) * probability
    return probability


def _operate(operation: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    threshold = float(operation["threshold"])  # float("inf") reads the stored "inf"
    return scores > threshold if operation["operator"] == ">" else scores < threshold


def _best_accuracy_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold t maximising accuracy of `score > t` over all rows (midpoint between scores)."""
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1]]])
    positives, negatives = np.sort(scores[truth]), np.sort(scores[~truth])
    true_positives = len(positives) - np.searchsorted(positives, candidates, side="right")
    true_negatives = np.searchsorted(negatives, candidates, side="right")
    return float(candidates[np.argmax(true_positives + true_negatives)])


def _require_both_outcomes(truth: np.ndarray, groups: np.ndarray, positive_label: str) -> None:
    # ThresholdOptimizer needs both outcomes in every group to trace its ROC curve.
    for group in sorted(set(groups)):
        outcomes = truth[groups == group]
        if outcomes.all() or not outcomes.any():
            which = "only" if outcomes.all() else "no"
            raise DataError(
                f"group {group!r} has {which} {positive_label!r} rows in the data the thresholds are fitted on; "
                "each group needs both outcomes (merge small groups or use more validation data)"
            )


def _rule_summary(
    rule: dict[str, Any], scores: np.ndarray, truth: np.ndarray, groups: np.ndarray, seed: int
) -> dict[str, Any]:
    decision = apply_thresholds(rule, scores, groups, seed=seed)
    rates = {str(g): float(decision[groups == g].mean()) for g in sorted(set(groups))}
    return {
        "rows": len(scores),
        "seed": seed,
        "accuracy": float(np.mean(decision == truth)),
        "selection_rate": rates,
        "demographic_parity_difference": max(rates.values()) - min(rates.values()),
    }


def _check_rule(rule: dict[str, Any]) -> None:
    if rule.get("format") != RULE_FORMAT:
        raise ArtifactError(f"not a fairness threshold rule (format {rule.get('format')!r}, expected {RULE_FORMAT!r})")
    if not isinstance(rule.get("groups"), dict) or not isinstance(rule.get("default"), dict):
        raise ArtifactError("fairness threshold rule: 'groups' and 'default' must both be objects")
    for name, entry in [*rule["groups"].items(), ("default", rule["default"])]:
        for key in ("p0", "operation0", "p1", "operation1"):
            if key not in entry:
                raise ArtifactError(f"fairness threshold rule: group {name!r} lacks {key!r}")
        for key in ("operation0", "operation1"):
            if entry[key].get("operator") not in (">", "<"):
                raise ArtifactError(f"fairness threshold rule: group {name!r} {key} operator must be '>' or '<'")


# ---------------------------------------------------------------------------------------------------
# Counterfactual identity swaps
# ---------------------------------------------------------------------------------------------------


def load_identity_terms(path: Path = IDENTITY_TERMS) -> dict[str, list[list[str]]]:
    """Dimension (gender, religion, ...) -> sets of interchangeable terms."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["dimensions"]


def counterfactual_flips(
    texts: Sequence[str] | Sequence[Sequence[str]],
    predict: Callable[[list], tuple[list[str], np.ndarray]],
    positive_label: str | None = None,
    terms: dict[str, list[list[str]]] | None = None,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Swap identity terms and measure how predictions move.

    `texts` are single texts, or tuples of texts (premise, hypothesis) for pair models: a tuple gets the
    same substitution in each of its texts (`swap_term`) and counts as mentioning a term when any of them
    does. For each dimension, every input containing one of its terms (whole word, case-insensitive)
    yields one variant per other term of the same set, keeping the capitalisation ("He" -> "She").

    `predict(inputs)` returns (labels, probabilities). With one probability per input, P(positive_label),
    shifts are measured in it. With a row of class probabilities per input (the label being the most
    probable class), shifts are measured in the probability of the class predicted for the original
    input: pair and multi-class tasks have no single favourable class. Per dimension and per
    substituted-in term: variants, flip rate (label differs from the original input's), mean and max
    |shift|. `max_examples` caps the original inputs used per dimension (the first ones found).
    """
    terms = load_identity_terms() if terms is None else terms
    pairs = bool(texts) and not isinstance(texts[0], str)
    items = [tuple(t) if pairs else (t,) for t in texts]
    swaps = {dimension: _variants(items, term_sets, max_examples) for dimension, term_sets in terms.items()}

    def as_input(item: tuple[str, ...]) -> str | tuple[str, ...]:
        return item if pairs else item[0]

    # Score only the inputs that have variants, and every variant in one call: batched models are faster.
    used = sorted({source for sources, _, _ in swaps.values() for source in sources})
    original_labels, original_probability = _predict(predict, [as_input(items[i]) for i in used])
    position = {source: i for i, source in enumerate(used)}
    all_variants = [as_input(variant) for _, variants, _ in swaps.values() for variant in variants]
    variant_labels, variant_probability = _predict(predict, all_variants)
    by_class = original_probability.ndim == 2
    dimensions, start = {}, 0
    for dimension, (sources, variants, replacements) in swaps.items():
        where = [position[source] for source in sources]
        labels = variant_labels[start : start + len(variants)]
        flipped = np.array([label != original_labels[w] for label, w in zip(labels, where, strict=True)], dtype=bool)
        before, after = original_probability[where], variant_probability[start : start + len(variants)]
        if by_class:  # the probability of the class the original input was given, before and after the swap
            rows, predicted = np.arange(len(where)), before.argmax(axis=1)
            before, after = before[rows, predicted], after[rows, predicted]
        shift = np.abs(after - before)
        start += len(variants)
        summary = {"texts": len(set(sources)), **_flip_summary(flipped, shift)}
        summary["terms"] = {
            term: _flip_summary(flipped[rows], shift[rows])
            for term in sorted(set(replacements))
            for rows in [np.array([r == term for r in replacements])]
        }
        summary["largest_shifts"] = [
            {
                "text": _plain(items[sources[i]]),
                "variant": _plain(variants[i]),
                "label": original_labels[where[i]],
                "variant_label": labels[i],
                "shift": float(shift[i]),
            }
            for i in np.argsort(-shift, kind="stable")[:3]
        ]
        dimensions[dimension] = summary
    measured = "the originally predicted class" if by_class or positive_label is None else repr(str(positive_label))
    return {
        "positive_label": None if positive_label is None else str(positive_label),
        "shift_in": f"P({measured})",
        "pairs": pairs,
        "texts": len(texts),
        "texts_with_terms": len(used),
        "dimensions": dimensions,
    }


def swap_term(texts: str | Sequence[str], term: str, replacement: str) -> str | tuple[str, ...]:
    """`term` (whole words, any case) replaced by `replacement` in a text, or in every text of a pair.

    The capitalisation of each occurrence is kept ("He" -> "She"). A pair gets the same substitution in
    both texts, so premise and hypothesis still speak of the same person.
    """
    pattern = _term_pattern(term)

    def swap(text: str) -> str:
        return pattern.sub(lambda match: _same_case(match.group(0), replacement), text)

    return swap(texts) if isinstance(texts, str) else tuple(swap(text) for text in texts)


def plot_counterfactual(report: dict[str, Any], path: Path) -> Path:
    """Bars per dimension: prediction flip rate and mean |change in probability| after identity swaps."""
    dimensions = list(report["dimensions"])
    results = [report["dimensions"][d] for d in dimensions]
    # Horizontal bars keep long dimension names readable; "no examples" is written out so it is not
    # mistaken for a flip rate of zero.
    names = [f"{d.replace('_', ' ')}\n({r['variants']} swaps)" for d, r in zip(dimensions, results, strict=True)]
    positions = np.arange(len(dimensions))
    figure, axes = plt.subplots(1, 2, figsize=(10, 0.55 * len(dimensions) + 1.8), sharey=True)
    shift_in = report.get("shift_in") or f"P({report['positive_label']})"
    panels = [
        ("flip_rate", "share of swaps that flip the label", "Prediction flips", "C3"),
        ("mean_abs_shift", f"mean |Δ {shift_in}|", "Probability shift", "C0"),
    ]
    for axis, (key, xlabel, title, color) in zip(axes, panels, strict=True):
        values = [_nan_if_none(r[key]) for r in results]
        axis.barh(positions, values, color=color)
        for y, value in zip(positions, values, strict=True):
            axis.text(
                0 if math.isnan(value) else value,
                y,
                " no examples" if math.isnan(value) else f" {value:.2f}",
                va="center",
                fontsize="small",
                color="grey" if math.isnan(value) else "black",
            )
        axis.set_xlim(0, max(0.1, np.nanmax([*values, 0.0]) * 1.25))
        axis.set_xlabel(xlabel)
        axis.set_title(title)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    return save_figure(figure, Path(path))


def _variants(
    items: list[tuple[str, ...]], term_sets: list[list[str]], max_examples: int | None
) -> tuple[list[int], list[tuple[str, ...]], list[str]]:
    """(index of the original input, variant input, term substituted in) for every swap of a dimension."""
    sources, variants, replacements = [], [], []
    used = 0
    for index, item in enumerate(items):
        if max_examples is not None and used >= max_examples:
            break
        seen = {item}
        for term_set in term_sets:
            for term in term_set:
                if not any(_term_pattern(term).search(text) for text in item):
                    continue
                for other in term_set:
                    variant = swap_term(item, term, other)
                    if variant not in seen:  # "her" sits in two sets; one variant input is scored once
                        seen.add(variant)
                        sources.append(index)
                        variants.append(variant)
                        replacements.append(other)
        used += len(seen) > 1
    return sources, variants, replacements


@functools.lru_cache(maxsize=1024)  # the same few hundred terms are searched in every text
def _term_pattern(term: str) -> re.Pattern:
    words = [re.escape(word) for word in term.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def _same_case(found: str, replacement: str) -> str:
    if found.isupper() and len(found) > 1:
        return replacement.upper()
    capitalise = lambda word: word[:1].upper() + word[1:]  # noqa: E731
    if all(word[:1].isupper() for word in found.split()):  # "African American" -> "Native American"
        return " ".join(capitalise(word) for word in replacement.split(" "))
    if found[:1].isupper():
        return capitalise(replacement)
    return replacement


def _plain(item: tuple[str, ...]) -> str | list[str]:
    """An input as it goes into the JSON report: the text, or the pair's texts as a list."""
    return item[0] if len(item) == 1 else list(item)


def _predict(predict: Callable, inputs: list) -> tuple[list[str], np.ndarray]:
    """(labels, probabilities): one probability per input, or one row of class probabilities per input."""
    if not inputs:
        return [], np.zeros(0)
    labels, probability = predict(inputs)
    labels, probability = [str(label) for label in labels], np.asarray(probability, dtype=float)
    if probability.ndim != 2:
        probability = probability.reshape(-1)
    if len(labels) != len(inputs) or len(probability) != len(inputs):
        raise ValueError(
            f"predict returned {len(labels)} labels and {len(probability)} probabilities for {len(inputs)} inputs"
        )
    return labels, probability


def _flip_summary(flipped: np.ndarray, shift: np.ndarray) -> dict[str, Any]:
    if not len(flipped):
        return {"variants": 0, "flips": 0, "flip_rate": None, "mean_abs_shift": None, "max_abs_shift": None}
    return {
        "variants": len(flipped),
        "flips": int(flipped.sum()),
        "flip_rate": float(flipped.mean()),
        "mean_abs_shift": float(shift.mean()),
        "max_abs_shift": float(shift.max()),
    }


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def _labels(values: Sequence) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _as_float(value: Any) -> float | None:
    """A number, or text that reads as one ("35" from a JSON request); None otherwise."""
    if _is_number(value):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _natural_key(label: str) -> tuple:
    """Numbers in numeric order before text in alphabetical order."""
    number = _as_float(label)
    return (0, number, label) if number is not None else (1, 0.0, label)


def _format_number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "column"
