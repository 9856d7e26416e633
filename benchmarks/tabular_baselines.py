"""Tabular defaults: forgeml with only the required config keys against scikit-learn baselines.

For each table, the same train and test rows go to three contenders:

- ``forgeml``: `forgeml.run` with only ``name``, ``task``, ``data.train``, ``data.test`` and
  ``data.label``: every other setting (MLP shape, learning rate, epochs, early stopping, the 10 %
  validation split carved from train) is forgeml's default for the `mlp` family;
- ``logistic``: `LogisticRegression` (L2, C=1, max_iter 5000) after median imputation + `StandardScaler`
  for numbers and `OneHotEncoder` for categories;
- ``hist_gb``: `HistGradientBoostingClassifier` with its defaults (native categorical support,
  early stopping on its own 10 % validation split when there are more than 10,000 rows).

Tables: UCI Adult (``../shared/datasets/adult``: the official train/test files; ``income_gt_50k``,
a copy of the label, is dropped), and two tables scikit-learn ships offline: Wisconsin breast cancer
(569 rows, 30 numbers, binary) and handwritten digits (1,797 rows, 64 pixel counts, 10 classes), each
split 80/20, stratified, once per seed in ``--seeds`` (default 0-4): with 114 test rows one breast-cancer
row is 0.9 points, so a single split says little, and the comparison is made on the mean over splits
(every split is reported too). Accuracy (and ROC-AUC for binary tables) is measured on the test rows;
seconds are the wall time of each contender's whole fit + predict (for forgeml, the whole `forgeml.run`:
data checks, training, evaluation, plots and model card; torch is imported before the clock starts).
The acceptance bar: forgeml's mean accuracy at least logistic regression's minus 1 point on every table.

Run from the repository root (~5 minutes on a 2-core CPU)::

    python benchmarks/tabular_baselines.py
    python benchmarks/tabular_baselines.py --tables breast_cancer --seeds 0 --set train.lr=3e-3  # an experiment

Results: a Markdown table on stdout and JSON in ``benchmarks/out/tabular_baselines.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

import forgeml

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
LABEL = "label"


# --- tables: (train, test) data frames with a `label` column ------------------------------------


def adult(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The official UCI split; empty fields (UCI's `?`) stay missing."""
    frames = []
    for name in ("train", "test"):
        frame = pd.read_csv(DATASETS / "adult" / f"{name}.csv", keep_default_na=False, na_values=[""])
        frames.append(frame.drop(columns=["income_gt_50k"]).rename(columns={"income": LABEL}))
    return frames[0], frames[1]


def _sklearn_table(loader: Callable[..., Any], seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    bunch = loader()
    columns = [str(name).replace(" ", "_") for name in bunch.feature_names]
    frame = pd.DataFrame(bunch.data, columns=columns)
    frame[LABEL] = [str(bunch.target_names[t]) for t in bunch.target]
    train, test = train_test_split(frame, test_size=0.2, stratify=frame[LABEL], random_state=seed)
    return train.reset_index(drop=True), test.reset_index(drop=True)


TABLES: dict[str, Callable[[int], tuple[pd.DataFrame, pd.DataFrame]]] = {
    "adult": adult,
    "breast_cancer": lambda seed: _sklearn_table(load_breast_cancer, seed),
    "digits": lambda seed: _sklearn_table(load_digits, seed),
    "wine": lambda seed: _sklearn_table(load_wine, seed),
}
DEFAULT_TABLES = ("adult", "breast_cancer", "digits")
OFFICIAL_SPLITS = {"adult"}  # one published train/test split; the others are split per seed


# --- contenders ---------------------------------------------------------------------------------


def scores(truth: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray | None, classes: list) -> dict:
    result = {"accuracy": float(accuracy_score(truth, predicted))}
    if probabilities is not None and len(classes) == 2:
        result["roc_auc"] = float(roc_auc_score(truth == classes[1], probabilities[:, 1]))
    return result


def run_forgeml(name: str, train_csv: Path, test_csv: Path, workspace: Path, overrides: list[str]) -> dict:
    config = {
        "name": name,
        "task": "tabular-classification",
        "data": {"train": str(train_csv), "test": str(test_csv), "label": LABEL},
    }
    clock = time.perf_counter()
    result = forgeml.run(config, overrides=overrides, workspace=workspace)
    seconds = time.perf_counter() - clock
    test = result.metrics["test"]
    training = result.metrics.get("training") or {}
    outcome = {"accuracy": test["accuracy"], "seconds": seconds}
    if "roc_auc" in test and len(test.get("classes", [])) == 2:
        outcome["roc_auc"] = test["roc_auc"]
    outcome["training"] = {
        key: training.get(key) for key in ("steps", "best_step", "watched_metric", "best_metric", "stopped_early")
    }
    return outcome


def _split_columns(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    features = frame.drop(columns=[LABEL])
    numeric = [c for c in features.columns if pd.api.types.is_numeric_dtype(features[c])]
    return numeric, [c for c in features.columns if c not in numeric]


def run_logistic(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    numeric, categorical = _split_columns(train)
    prepare = ColumnTransformer(
        [
            ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (
                "categories",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="(missing)"), OneHotEncoder(handle_unknown="ignore")
                ),
                categorical,
            ),
        ]
    )
    model = make_pipeline(prepare, LogisticRegression(max_iter=5000))
    clock = time.perf_counter()
    model.fit(train.drop(columns=[LABEL]), train[LABEL])
    predicted = model.predict(test.drop(columns=[LABEL]))
    probabilities = model.predict_proba(test.drop(columns=[LABEL]))
    seconds = time.perf_counter() - clock
    return scores(test[LABEL].to_numpy(), predicted, probabilities, list(model.classes_)) | {"seconds": seconds}


def run_hist_gb(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> dict:
    _, categorical = _split_columns(train)
    inputs = {}
    for name, frame in (("train", train), ("test", test)):
        features = frame.drop(columns=[LABEL]).copy()
        for column in categorical:  # the training vocabulary; unseen categories become missing
            kinds = sorted(train[column].dropna().unique())
            features[column] = pd.Categorical(features[column], categories=kinds)
        inputs[name] = features
    model = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=seed)
    clock = time.perf_counter()
    model.fit(inputs["train"], train[LABEL])
    predicted = model.predict(inputs["test"])
    probabilities = model.predict_proba(inputs["test"])
    seconds = time.perf_counter() - clock
    return scores(test[LABEL].to_numpy(), predicted, probabilities, list(model.classes_)) | {"seconds": seconds}


# --- report -------------------------------------------------------------------------------------


def summarize(splits: list[dict]) -> dict:
    """Mean (and standard deviation over splits) of each contender's scores and seconds."""
    summary: dict[str, Any] = {}
    for contender in CONTENDERS:
        entry = {}
        for key in ("accuracy", "roc_auc", "seconds"):
            values = [split[contender][key] for split in splits if key in split[contender]]
            if values:
                entry[key] = float(np.mean(values))
                entry[f"{key}_std"] = float(np.std(values))
        summary[contender] = entry
    gaps = [split["forgeml"]["accuracy"] - split["logistic"]["accuracy"] for split in splits]
    summary["gap_mean"], summary["gap_min"] = float(np.mean(gaps)), float(np.min(gaps))
    summary["meets_bar"] = summary["forgeml"]["accuracy"] >= summary["logistic"]["accuracy"] - BAR
    return summary


CONTENDERS = ("forgeml", "logistic", "hist_gb")
BAR = 0.01  # forgeml's accuracy may be at most 1 point below logistic regression's


def _mean(entry: dict, key: str, spread: bool) -> str:
    if key not in entry:
        return "—"
    text = f"{entry[key]:.1f}" if key == "seconds" else f"{entry[key]:.4f}"
    return text + (f" ± {entry[key + '_std']:.4f}" if spread and key != "seconds" else "")


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| table | splits | train / test rows | classes | forgeml acc | logistic acc | hist GB acc | forgeml AUC | "
        "logistic AUC | hist GB AUC | forgeml s | logistic s | hist GB s | forgeml >= logistic - 1 pt |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, result in results.items():
        summary, several = result["summary"], len(result["splits"]) > 1
        cells = [
            _mean(summary[contender], key, several)
            for key in ("accuracy", "roc_auc", "seconds")
            for contender in CONTENDERS
        ]
        verdict = "yes" if summary["meets_bar"] else "**no**"
        splits = f"{len(result['splits'])} seeded 80/20" if several else result["splits"][0]["split"]
        rows = f"{result['rows']['train']:,} / {result['rows']['test']:,}"
        lines.append(f"| {name} | {splits} | {rows} | {result['classes']} | {' | '.join(cells)} | {verdict} |")
    detail = [(name, result) for name, result in results.items() if len(result["splits"]) > 1]
    if detail:
        lines += ["", "| table | split | forgeml acc | logistic acc | hist GB acc | forgeml - logistic |"]
        lines.append("|---|---|---:|---:|---:|---:|")
        for name, result in detail:
            for split in result["splits"]:
                accuracy = [split[contender]["accuracy"] for contender in CONTENDERS]
                cells = " | ".join(f"{value:.4f}" for value in accuracy)
                lines.append(f"| {name} | {split['split']} | {cells} | {100 * (accuracy[0] - accuracy[1]):+.1f} pt |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=list(DEFAULT_TABLES))
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of the 80/20 splits (Adult: first only)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="forgeml config override (experiments only)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "tabular_baselines.json")
    args = parser.parse_args(argv)

    import forgeml.pipeline  # noqa: F401  (torch and friends load here, not inside the first timed run)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="forgeml-tabular-") as folder:
        tmp = Path(folder)
        for name in args.tables:
            splits = []
            for seed in args.seeds[:1] if name in OFFICIAL_SPLITS else args.seeds:
                train, test = TABLES[name](seed)
                train_csv, test_csv = tmp / f"{name}_{seed}_train.csv", tmp / f"{name}_{seed}_test.csv"
                train.to_csv(train_csv, index=False)
                test.to_csv(test_csv, index=False)
                split = {
                    "split": "official" if name in OFFICIAL_SPLITS else f"seed {seed}",
                    "seed": seed,
                    "forgeml": run_forgeml(name, train_csv, test_csv, tmp / "workspace", args.overrides),
                    "logistic": run_logistic(train, test),
                    "hist_gb": run_hist_gb(train, test, seed),
                }
                splits.append(split)
                scores_text = ", ".join(f"{c} {split[c]['accuracy']:.4f}" for c in CONTENDERS)
                print(f"{name} ({split['split']}): {scores_text}", file=sys.stderr)
            results[name] = {
                "rows": {"train": len(train), "test": len(test)},
                "classes": int(train[LABEL].nunique()),
                "summary": summarize(splits),
                "splits": splits,
            }

    print(markdown(results))
    payload = {
        "seeds": args.seeds,
        "overrides": args.overrides,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return 0 if all(result["summary"]["meets_bar"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
