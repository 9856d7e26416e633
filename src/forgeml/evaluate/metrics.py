"""Metrics, computed with scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def classification_metrics(targets: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1, ROC-AUC and log-loss, confusion matrix."""
    targets = np.asarray(targets, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        targets, predicted, labels=labels, zero_division=0
    )
    result: dict[str, Any] = {
        "accuracy": float(skm.accuracy_score(targets, predicted)),
        "f1": float(np.mean(f1)),
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "log_loss": float(skm.log_loss(targets, np.clip(probabilities, 1e-12, 1.0), labels=labels)),
    }
    present = np.unique(targets)
    if len(present) == len(classes):
        if len(classes) == 2:
            result["roc_auc"] = float(skm.roc_auc_score(targets, probabilities[:, 1]))
        else:
            result["roc_auc"] = float(skm.roc_auc_score(targets, probabilities, multi_class="ovr", labels=labels))
    result["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    result["confusion_matrix"] = skm.confusion_matrix(targets, predicted, labels=labels).tolist()
    result["classes"] = list(classes)
    return result


def regression_metrics(targets: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE, R^2 (and MSE)."""
    targets, predicted = np.asarray(targets, dtype=float), np.asarray(predicted, dtype=float)
    mse = float(skm.mean_squared_error(targets, predicted))
    return {
        "mae": float(skm.mean_absolute_error(targets, predicted)),
        "rmse": float(np.sqrt(mse)),
        "mse": mse,
        "r2": float(skm.r2_score(targets, predicted)) if len(targets) > 1 else float("nan"),
    }


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Just the single-number metrics (for tables, logs and the run store)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
