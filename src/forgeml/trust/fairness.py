"""Fairness audit: group metrics with bootstrap intervals, per-group threshold mitigation, identity swaps.

Three independent tools, all returning plain JSON-ready dicts:

- `group_report` compares accuracy, selection rate, TPR and FPR across the groups of each sensitive
  column and measures the gaps (Fairlearn's demographic parity and equalized odds).
- `fit_thresholds` / `apply_thresholds` post-process scores with per-group thresholds found by
  Fairlearn's `ThresholdOptimizer`; the fitted rule is stored as JSON, never pickled.
- `counterfactual_flips` swaps identity terms in texts ("he" -> "she", "christian" -> "muslim") and
  counts how often the prediction changes.

Labels are class names (strings). For a multi-class task, selection rate, TPR and FPR are computed for
`positive_label` against all other classes (one-vs-rest); accuracy uses every class.
"""

from __future__ import annotations

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
CONSTRAINTS = ("demographic_parity", "equalized_odds")
RULE_FORMAT = "forgeml.fairness.thresholds/1"
IDENTITY_TERMS = Path(__file__).with_name("identity_terms.json")


# ---------------------------------------------------------------------------------------------------
# Group report
# ---------------------------------------------------------------------------------------------------


def group_report(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    sensitive: dict[str, Sequence],
    positive_label: str,
    bins: int = 4,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-group metrics and disparity measures for every sensitive column.

    Numeric columns (with more distinct values than `bins`) are cut into `bins` quantile bins labelled by
    the smallest and largest value inside ("17–28"); other columns are used as they are. Missing values
    (None, NaN, empty text) form the group "unknown". Selection rate, TPR and FPR are for
    `positive_label` one-vs-rest. Disparities get 95 % percentile bootstrap intervals from `bootstrap`
    seeded resamples of the rows (0 skips them). Undefined values (a TPR for a group without positives,
    a ratio of zeros) are None, so the result is valid JSON.
    """
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (off) or a number of resamples, got {bootstrap}")
    positive_label = str(positive_label)
    if positive_label not in set(y_true) | set(y_pred):
        raise DataError(
            f"positive label {positive_label!r} occurs in neither the true nor the predicted labels "
            f"(seen: {', '.join(sorted(set(y_true) | set(y_pred))[:10])})"
        )
    truth, decision = y_true == positive_label, y_pred == positive_label
    columns = {}
    for name, values in sensitive.items():
        if len(values) != len(y_true):
            raise DataError(f"sensitive column {name!r} has {len(values)} values but there are {len(y_true)} labels")
        groups, order, kind = sensitive_groups(values, bins)
        columns[name] = _column_report(y_true, y_pred, truth, decision, groups, order, kind, bootstrap, seed)
    return {
        "positive_label": positive_label,
        "rows": len(y_true),
        "note": "selection_rate, tpr and fpr are for positive_label against all other classes",
        "overall": _overall(y_true, y_pred, truth, decision),
        "columns": columns,
        "bootstrap": {"resamples": bootstrap, "seed": seed, "confidence": 0.95},
    }


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
    y_true: np.ndarray,
    y_pred: np.ndarray,
    truth: np.ndarray,
    decision: np.ndarray,
    groups: np.ndarray,
    order: list[str],
    kind: str,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    frame = _metric_frame(y_true, y_pred, truth, decision, groups)
    by_group = {}
    for group in order:
        row = frame.by_group.loc[group]
        positives, negatives = int(truth[groups == group].sum()), int((~truth[groups == group]).sum())
        by_group[group] = {
            "count": int(row["count"]),
            "accuracy": _number(row["accuracy"]),
            "selection_rate": _number(row["selection_rate"]),
            # Fairlearn reports 0 for a rate with an empty denominator; "undefined" is the honest answer.
            "tpr": _number(row["tpr"]) if positives else None,
            "fpr": _number(row["fpr"]) if negatives else None,
        }
    values = _point_disparities(truth.astype(int), decision.astype(int), groups, by_group)
    intervals = _bootstrap_intervals(truth, decision, groups, bootstrap, seed)
    return {
        "kind": kind,
        "groups": by_group,
        "disparities": {name: {"value": values[name], "ci95": intervals[name]} for name in DISPARITIES},
    }


def _metric_frame(
    y_true: np.ndarray, y_pred: np.ndarray, truth: np.ndarray, decision: np.ndarray, groups: np.ndarray
) -> MetricFrame:
    # MetricFrame passes one y_true/y_pred pair to every metric; accuracy needs the class names and the
    # rates need the one-vs-rest booleans, so both travel as row indices and each metric picks its own.
    def on_labels(metric: Callable) -> Callable:
        return lambda rows, _: metric(y_true[rows], y_pred[rows])

    def on_positive(metric: Callable) -> Callable:
        return lambda rows, _: metric(truth[rows].astype(int), decision[rows].astype(int))

    rows = np.arange(len(y_true))
    metrics = {
        "count": lambda rows, _: count(rows, rows),
        "accuracy": on_labels(lambda t, p: float(np.mean(t == p))),
        "selection_rate": on_positive(selection_rate),
        "tpr": on_positive(true_positive_rate),
        "fpr": on_positive(false_positive_rate),
    }
    return MetricFrame(metrics=metrics, y_true=rows, y_pred=rows, sensitive_features=list(groups))


def _overall(y_true: np.ndarray, y_pred: np.ndarray, truth: np.ndarray, decision: np.ndarray) -> dict[str, Any]:
    return {
        "count": len(y_true),
        "accuracy": _number(np.mean(y_true == y_pred)) if len(y_true) else None,
        "selection_rate": _number(np.mean(decision)) if len(decision) else None,
        "tpr": _number(decision[truth].mean()) if truth.any() else None,
        "fpr": _number(decision[~truth].mean()) if (~truth).any() else None,
    }


def _point_disparities(
    truth: np.ndarray, decision: np.ndarray, groups: np.ndarray, by_group: dict[str, dict]
) -> dict[str, float | None]:
    features = list(groups)
    values = {
        "demographic_parity_difference": demographic_parity_difference(truth, decision, sensitive_features=features),
        "demographic_parity_ratio": demographic_parity_ratio(truth, decision, sensitive_features=features),
        "equalized_odds_difference": equalized_odds_difference(truth, decision, sensitive_features=features),
    }
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
    truth: np.ndarray, decision: np.ndarray, groups: np.ndarray, resamples: int, seed: int
) -> dict[str, list[float] | None]:
    """95 % percentile intervals of the three disparities over `resamples` row resamples."""
    if resamples == 0:
        return dict.fromkeys(DISPARITIES)
    # One MetricFrame costs ~150 ms, so 200 of them per column would take half a minute: the resamples
    # use bincount arithmetic with the same definitions (checked against Fairlearn in the tests).
    names, group_ids = np.unique(groups.astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    samples = np.array(
        [
            _fast_disparities(truth[rows], decision[rows], group_ids[rows], len(names))
            for rows in rng.integers(0, len(truth), size=(resamples, len(truth)))
        ]
    )
    intervals = {}
    for column, name in enumerate(DISPARITIES):
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
    """One PNG per sensitive column: accuracy, selection rate, TPR and FPR side by side for each group."""
    paths = []
    for column, result in report["columns"].items():
        groups = list(result["groups"])
        figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4))
        width = 0.8 / len(GROUP_METRICS)
        positions = np.arange(len(groups))
        for offset, metric in enumerate(GROUP_METRICS):
            heights = [_nan_if_none(result["groups"][g][metric]) for g in groups]
            axis.bar(positions + offset * width, heights, width, label=metric.replace("_", " "))
        labels = [f"{textwrap.fill(g, 14)}\n(n={result['groups'][g]['count']})" for g in groups]
        crowded = len(groups) > 5 or max(len(g) for g in groups) > 14
        axis.set_xticks(positions + width * (len(GROUP_METRICS) - 1) / 2, labels)
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
    texts: list[str],
    predict: Callable[[list[str]], tuple[list[str], np.ndarray]],
    positive_label: str,
    terms: dict[str, list[list[str]]] | None = None,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Swap identity terms and measure how predictions move.

    For each dimension, every text containing one of its terms (whole word, case-insensitive) yields one
    variant per other term of the same set, keeping the capitalisation ("He" -> "She"). `predict(texts)`
    returns (labels, P(positive_label) per text). Per dimension and per substituted-in term: variants,
    flip rate (label differs from the original text's), mean and max |change in P(positive_label)|.
    `max_examples` caps the original texts used per dimension (the first ones found).
    """
    terms = load_identity_terms() if terms is None else terms
    swaps = {dimension: _variants(texts, term_sets, max_examples) for dimension, term_sets in terms.items()}
    # Score only the texts that have variants, and every variant in one call: batched models are faster.
    used = sorted({source for sources, _, _ in swaps.values() for source in sources})
    original_labels, original_probability = _predict(predict, [texts[i] for i in used])
    position = {source: i for i, source in enumerate(used)}
    all_variants = [variant for _, variants, _ in swaps.values() for variant in variants]
    variant_labels, variant_probability = _predict(predict, all_variants)
    dimensions, start = {}, 0
    for dimension, (sources, variants, replacements) in swaps.items():
        where = [position[source] for source in sources]
        labels = variant_labels[start : start + len(variants)]
        flipped = np.array([label != original_labels[w] for label, w in zip(labels, where, strict=True)], dtype=bool)
        shift = np.abs(variant_probability[start : start + len(variants)] - original_probability[where])
        start += len(variants)
        summary = {"texts": len(set(sources)), **_flip_summary(flipped, shift)}
        summary["terms"] = {
            term: _flip_summary(flipped[rows], shift[rows])
            for term in sorted(set(replacements))
            for rows in [np.array([r == term for r in replacements])]
        }
        summary["largest_shifts"] = [
            {
                "text": texts[sources[i]],
                "variant": variants[i],
                "label": original_labels[where[i]],
                "variant_label": labels[i],
                "shift": float(shift[i]),
            }
            for i in np.argsort(-shift, kind="stable")[:3]
        ]
        dimensions[dimension] = summary
    return {
        "positive_label": str(positive_label),
        "texts": len(texts),
        "texts_with_terms": len(used),
        "dimensions": dimensions,
    }


def plot_counterfactual(report: dict[str, Any], path: Path) -> Path:
    """Bars per dimension: prediction flip rate and mean |change in P(positive)| after identity swaps."""
    dimensions = list(report["dimensions"])
    results = [report["dimensions"][d] for d in dimensions]
    # Horizontal bars keep long dimension names readable; "no examples" is written out so it is not
    # mistaken for a flip rate of zero.
    names = [f"{d.replace('_', ' ')}\n({r['variants']} swaps)" for d, r in zip(dimensions, results, strict=True)]
    positions = np.arange(len(dimensions))
    figure, axes = plt.subplots(1, 2, figsize=(10, 0.55 * len(dimensions) + 1.8), sharey=True)
    panels = [
        ("flip_rate", "share of swaps that flip the label", "Prediction flips", "C3"),
        ("mean_abs_shift", f"mean |Δ P({report['positive_label']})|", "Probability shift", "C0"),
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
    texts: list[str], term_sets: list[list[str]], max_examples: int | None
) -> tuple[list[int], list[str], list[str]]:
    """(index of the original text, variant text, term substituted in) for every swap of a dimension."""
    sources, variants, replacements = [], [], []
    used = 0
    for index, text in enumerate(texts):
        if max_examples is not None and used >= max_examples:
            break
        seen = {text}
        for term_set in term_sets:
            for term in term_set:
                pattern = _term_pattern(term)
                if not pattern.search(text):
                    continue
                for other in term_set:
                    variant = pattern.sub(lambda match, other=other: _same_case(match.group(0), other), text)
                    if variant not in seen:  # "her" sits in two sets; one variant text is scored once
                        seen.add(variant)
                        sources.append(index)
                        variants.append(variant)
                        replacements.append(other)
        used += len(seen) > 1
    return sources, variants, replacements


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


def _predict(predict: Callable, texts: list[str]) -> tuple[list[str], np.ndarray]:
    if not texts:
        return [], np.zeros(0)
    labels, probability = predict(texts)
    labels, probability = [str(label) for label in labels], np.asarray(probability, dtype=float).reshape(-1)
    if len(labels) != len(texts) or len(probability) != len(texts):
        raise ValueError(
            f"predict returned {len(labels)} labels and {len(probability)} probabilities for {len(texts)} texts"
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
