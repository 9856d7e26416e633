"""k-fold cross-validation: how much a metric moves when the training data changes."""

from __future__ import annotations

from typing import Any

import numpy as np

from forgeml.config import ForgeConfig
from forgeml.data.io import column
from forgeml.data.prepare import PreparedData
from forgeml.data.split import kfold
from forgeml.errors import DataError
from forgeml.evaluate.metrics import scalar_metrics
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks import build_task
from forgeml.train.loop import seed_everything, train


def cross_validate(config: ForgeConfig, data: PreparedData, show_progress: bool = False) -> dict[str, Any]:
    """Stratified k-fold over the training split: a fresh model per fold, mean ± std per metric.

    Each fold trains for the configured epochs without early stopping, so the held-out fold is
    used only to score, never to pick a checkpoint (which would flatter the estimate).
    """
    pool = data.train
    k = config.evaluate.cross_validation
    if len(pool) < 2 * k:
        raise DataError(f"evaluate.cross_validation: {k} folds need at least {2 * k} training rows, have {len(pool)}")
    labels = [str(v) for v in column(pool, config.data.label)] if config.is_classification else None
    folds: list[dict[str, float]] = []
    for fold, (train_rows, held_rows) in enumerate(kfold(len(pool), k, labels, config.data.split.seed)):
        seed_everything(config.train.seed + fold)
        fold_train, fold_held = pool.select(train_rows), pool.select(held_rows)
        task = build_task(config, data.input_columns)
        task.fit(fold_train)
        try:
            held = task.encode(fold_held, f"fold {fold + 1}")
        except DataError:  # a class absent from this fold's training part: k is too big for the data
            raise DataError(
                f"evaluate.cross_validation: fold {fold + 1} of {k} has labels unseen in its training part; "
                "use a smaller k"
            ) from None
        model = task.build_model()
        train(task, model, task.encode(fold_train, "train"), None, config.train, show_progress=show_progress)
        outputs, targets = model_outputs(model, held, config.evaluate.batch_size)
        folds.append(scalar_metrics(task.metrics(outputs, targets)))
    shared = [name for name in folds[0] if all(name in fold for fold in folds)]  # roc_auc needs every class
    summary = {}
    for name in shared:
        values = np.asarray([fold[name] for fold in folds])
        summary[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)), "folds": values.tolist()}
    return {"k": k, "metrics": summary}
