"""The drift tests: pure functions of reference and window values (numpy in, JSON-ready dicts out).

Each test returns its statistic and a p-value that is valid for the window size at hand, so that the
decision over all of them (`holm`) keeps false alarms at the family-wise level asked for:

- numbers: the two-sample Kolmogorov-Smirnov test (scipy), missing values counted as the lowest value.
  On discrete columns (ages, counts) its p-value is conservative, never too small.
- categories (and predicted labels): a chi-squared test of the 2 x k table (reference counts, window
  counts). Reference categories too rare to expect 5 rows in the window are pooled; values the
  reference never had get a bin of their own, whose reference count is the number of values seen
  once (Good-Turing), so a long-tailed column is not flagged for bringing new values at its usual
  rate. When an expected count is still below 5, the p-value is a Monte Carlo exact one over tables
  with the same margins (scipy): the chi-squared approximation would make one new value look like
  near-certain drift.
- embeddings: a domain classifier (logistic regression) tells reference rows from window rows; its
  cross-validated ROC AUC is compared with the AUCs of the same procedure on shuffled domain labels
  (a permutation test), which is exact whatever the window size.
- PSI (population stability index) is reported beside the tests as a magnitude; it is not a test.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special, stats

RARE = "(rare)"
UNSEEN = "(unseen)"
MIN_EXPECTED = 5.0  # Cochran's rule for the chi-squared approximation
PSI_FLOOR = 1e-4  # a share of zero would make PSI infinite


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (reject where adjusted <= alpha).

    Holm controls the family-wise error rate under any dependence between the tests (features of one
    row are correlated: education and education_num, sex and relationship), which is what a false
    alarm is: any test rejecting on a window from the training distribution. Written here because
    scipy only has Benjamini-Hochberg (`false_discovery_control`) and statsmodels is not a dependency.
    """
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted.tolist()


def psi(reference_shares: np.ndarray, window_shares: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins.

    A magnitude: by rule of thumb < 0.1 is stable, 0.1-0.25 a moderate and > 0.25 a major shift. It
    grows with chance alone in small windows (about (bins - 1) / window rows), so it is no test.
    """
    r = np.maximum(np.asarray(reference_shares, dtype=float), PSI_FLOOR)
    w = np.maximum(np.asarray(window_shares, dtype=float), PSI_FLOOR)
    return float(np.sum((w - r) * np.log(w / r)))


def quantile_edges(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (repeated edges of discrete columns merged)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return np.array([])
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def binned_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shares of rows missing (first) and in each bin between `edges` (after)."""
    missing = np.isnan(values)
    counts = np.bincount(np.searchsorted(edges, values[~missing], side="right"), minlength=len(edges) + 1)
    return np.r_[missing.sum(), counts] / max(1, len(values))


def numeric_drift(reference: np.ndarray, window: np.ndarray, edges: np.ndarray | None = None) -> dict[str, Any]:
    """KS test of a numeric column, plus PSI over the reference's quantile bins.

    Missing values (NaN) count as a value below every number, so a column that goes missing more or
    less often moves the statistic too (its share is also reported, and is a PSI bin of its own).
    """
    reference = np.asarray(reference, dtype=float)
    window = np.asarray(window, dtype=float)
    ref, win = reference[~np.isnan(reference)], window[~np.isnan(window)]
    result: dict[str, Any] = {
        "kind": "numeric",
        "test": "ks",
        "missing_share": {
            "reference": _share(reference.size - ref.size, reference.size),
            "window": _share(window.size - win.size, window.size),
        },
        "mean": {"reference": _mean(ref), "window": _mean(win)},
    }
    if reference.size == 0 or window.size == 0 or (ref.size == 0 and win.size == 0):
        return result | {"statistic": None, "p_value": 1.0, "psi": None}
    test = stats.ks_2samp(np.nan_to_num(reference, nan=-np.inf), np.nan_to_num(window, nan=-np.inf))
    edges = quantile_edges(ref) if edges is None else edges
    return result | {
        "statistic": float(test.statistic),
        "p_value": float(test.pvalue),
        "psi": psi(binned_shares(reference, edges), binned_shares(window, edges)),
    }


def category_bins(reference_counts: Counter, window_size: int, closed: bool = False) -> list[str]:
    """The reference categories common enough to expect `MIN_EXPECTED` rows in a window of this size
    (never a value seen once, unless the values are a `closed` set)."""
    total = sum(reference_counts.values())
    return [
        value
        for value, count in reference_counts.most_common()
        if (closed or count > 1) and count / total * window_size >= MIN_EXPECTED
    ]


def category_counts(values: Sequence[Any]) -> Counter:
    """Counts of a column's values as the categorical test reads them (missing values as '')."""
    return Counter(category_value(v) for v in values)


def categorical_drift(
    reference_counts: Counter,
    window: Sequence[Any],
    seed: int = 0,
    resamples: int = 1999,
    closed: bool = False,
) -> dict[str, Any]:
    """Chi-squared test of category counts, reference against window, plus PSI over the same bins.

    `reference_counts`: the reference's counts (`category_counts` of the whole training column);
    `window`: the window's raw values. Bins: the categories common enough to expect 5 window rows each;
    the other known categories pooled as "(rare)" (or into the least common bin when even together they
    are too rare); values the reference never had as "(unseen)". The
    reference's share of "(unseen)" is its share of values seen only once (Good-Turing: the chance
    that a new row brings a value not seen before), so a column with a long tail (cities, products)
    does not alarm on every window; its singletons count there and not in "(rare)". `closed`: the
    values are a fixed set (predicted classes); no value is unseen by chance, so no Good-Turing bin.
    """
    window_counts = category_counts(window)
    size = sum(window_counts.values())
    bins = category_bins(reference_counts, size, closed)
    kept = set(bins)
    singletons = 0 if closed else sum(1 for count in reference_counts.values() if count == 1)
    ref_row = [reference_counts[b] for b in bins]
    win_row = [window_counts[b] for b in bins]
    rare_ref = sum(c for v, c in reference_counts.items() if v not in kept) - singletons
    rare_win = sum(c for v, c in window_counts.items() if v not in kept and v in reference_counts)
    unseen = {v: c for v, c in window_counts.items() if v not in reference_counts}
    labels = list(bins)
    total = sum(reference_counts.values())
    if (rare_ref or rare_win) and bins and rare_ref / max(1, total) * size < MIN_EXPECTED:
        # Too rare even together to expect 5 window rows: they join the least common bin instead, so the
        # chi-squared approximation holds and needs no Monte Carlo test.
        labels[-1] = f"{labels[-1]} + {RARE}"
        ref_row[-1] += rare_ref
        win_row[-1] += rare_win
    elif rare_ref or rare_win:
        labels.append(RARE)
        ref_row.append(rare_ref)
        win_row.append(rare_win)
    if singletons or unseen:
        labels.append(UNSEEN)
        ref_row.append(singletons)
        win_row.append(sum(unseen.values()))
    table = np.array([ref_row, win_row], dtype=np.int64)
    ref_shares, win_shares = table[0] / max(1, table[0].sum()), table[1] / max(1, table[1].sum())
    result: dict[str, Any] = {
        "kind": "categorical",
        "test": "chi2",
        "bins": labels,
        "shares": {
            "reference": [round(float(s), 6) for s in ref_shares],
            "window": [round(float(s), 6) for s in win_shares],
        },
        "unseen": dict(Counter(unseen).most_common(10)),
        "unseen_share": _share(sum(unseen.values()), size),
        "psi": psi(ref_shares, win_shares),
    }
    if table.shape[1] < 2 or size == 0:
        return result | {"statistic": 0.0, "p_value": 1.0, "method": "none (one bin)"}
    expected = stats.contingency.expected_freq(table)
    if expected.min() >= MIN_EXPECTED:
        test = stats.chi2_contingency(table, correction=False)
        method = "asymptotic"
    else:
        monte_carlo = stats.MonteCarloMethod(n_resamples=resamples, rng=np.random.default_rng(seed))
        test = stats.chi2_contingency(table, correction=False, method=monte_carlo)
        method = f"monte-carlo ({resamples} tables)"
    return result | {"statistic": float(test.statistic), "p_value": float(test.pvalue), "method": method}


def domain_classifier(
    reference: np.ndarray,
    window: np.ndarray,
    permutations: int = 199,
    folds: int = 5,
    max_rows: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Can a classifier tell the window's vectors from the reference's? Cross-validated ROC AUC of an
    L2 logistic regression (C=1) and its permutation p-value.

    Both sides are subsampled (seeded) to the same number of rows, at most `max_rows` each, so the
    classes are balanced and the cost bounded. The null distribution is the cross-validated AUC of the
    same procedure (same folds) on `permutations` shufflings of the domain labels: the test is exact at
    any window size, and its smallest p-value is 1 / (permutations + 1). All the fits of a fold are made
    together (`logistic_scores`), so a few hundred shufflings cost about a second for 1,000 rows a side.
    """
    rng = np.random.default_rng(seed)
    rows = min(len(window), len(reference), max_rows)
    if rows < folds:
        return {"test": "domain-classifier", "auc": None, "p_value": 1.0, "rows": rows, "permutations": 0}
    ref = reference[rng.choice(len(reference), rows, replace=False)]
    win = window[rng.choice(len(window), rows, replace=False)]
    x = np.vstack([ref, win]).astype(np.float64)
    y = np.r_[np.zeros(rows), np.ones(rows)]
    # Stratified folds, and shuffles within each fold: every fit sees balanced classes, so pooled
    # out-of-fold scores are not biased below 0.5 by folds' differing class shares. Under no drift the
    # rows of a fold are exchangeable, so shuffling within folds is a valid (restricted) permutation test.
    ref_folds = np.array_split(rng.permutation(rows), folds)
    win_folds = np.array_split(rows + rng.permutation(rows), folds)
    splits = [np.r_[ref_rows, win_rows] for ref_rows, win_rows in zip(ref_folds, win_folds, strict=True)]
    labels = np.tile(y, (permutations + 1, 1))
    for labelling in labels[1:]:
        for rows_of_fold in splits:
            labelling[rows_of_fold] = rng.permutation(labelling[rows_of_fold])
    aucs = cross_validated_auc(x, labels, splits)
    observed, null = float(aucs[0]), aucs[1:]
    return {
        "test": "domain-classifier",
        "auc": round(observed, 6),
        "p_value": float((1 + np.sum(null >= observed)) / (1 + permutations)),
        "null_auc": {"mean": round(float(null.mean()), 6), "q95": round(float(np.quantile(null, 0.95)), 6)}
        if permutations
        else None,
        "rows": int(rows),
        "permutations": permutations,
    }


def cross_validated_auc(x: np.ndarray, labels: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """ROC AUC of out-of-fold logistic-regression scores, for each row of `labels` (0/1, one labelling of
    the rows of `x` per row); `folds` are the held-out rows of each fit."""
    labels = np.atleast_2d(labels)
    scores = np.empty(labels.shape)
    every = np.arange(len(x))
    for test in folds:
        train = np.setdiff1d(every, test)
        scores[:, test] = logistic_scores(x[train], labels[:, train], x[test])
    ranks = stats.rankdata(scores, axis=1)
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    return ((ranks * labels).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def logistic_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 1.0, iterations: int = 25
) -> np.ndarray:
    """Decision values on `x_test` of L2 logistic regressions fitted on `x_train`, one per row of `y_train`.

    The model of scikit-learn's `LogisticRegression(C=c)` (intercept not penalised), fitted by Newton's
    method for all labellings at once: a permutation test fits it hundreds of times per window, and
    scikit-learn's fixed cost per fit (~8 ms) would make that the whole cost of monitoring.
    """
    design = np.hstack([x_train, np.ones((len(x_train), 1))])
    width = design.shape[1]
    penalty = np.ones(width)
    penalty[-1] = 1e-8  # the intercept is not penalised; a tiny term keeps the Hessian invertible
    # Each row's outer product, once: every model's Hessian is then one matrix product with its weights.
    outer = (design[:, :, None] * design[:, None, :]).reshape(len(design), width * width)
    theta = np.zeros((len(y_train), width))
    for _ in range(iterations):
        p = special.expit(theta @ design.T)
        gradient = c * (p - y_train) @ design + penalty * theta
        hessian = ((c * p * (1 - p)) @ outer).reshape(-1, width, width) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        theta -= step
        if np.abs(step).max() < 1e-6:
            break
    return theta @ np.hstack([x_test, np.ones((len(x_test), 1))]).T


def presence_drift(reference: np.ndarray, window: np.ndarray) -> dict[str, Any]:
    """Fisher's exact test of the share of rows where something is present (e.g. an [UNK] token)."""
    ref, win = np.asarray(reference, dtype=bool), np.asarray(window, dtype=bool)
    table = [[int(ref.sum()), int((~ref).sum())], [int(win.sum()), int((~win).sum())]]
    p_value = stats.fisher_exact(table).pvalue if ref.size and win.size else 1.0
    return {
        "test": "fisher",
        "share": {"reference": _share(table[0][0], ref.size), "window": _share(table[1][0], win.size)},
        "p_value": float(p_value),
    }


def category_value(value: Any) -> str:
    """A value as the categorical test counts it: text, stripped; missing as the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 6) if values.size else None
