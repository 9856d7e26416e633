"""Simple baselines beside every run: the first thing a practitioner would try, on the same splits.

So that a card shows what the fine-tuned model adds, each classification or regression run also fits,
with scikit-learn and in seconds, on the run's cleaned training split:

- `majority` (classification): the training class shares as probabilities, so it always answers the
  most frequent class; `mean` (regression): the training mean.
- text tasks, `tfidf_logreg` / `tfidf_ridge`: TF-IDF of word 1-2-grams and character 2-4-grams
  (sublinear term frequency, capped vocabularies, each text cut to its first 2,000 characters), then
  logistic or ridge regression. A text pair gets separate features for each of its two columns
  (premise, hypothesis), so the linear model can tell which side a word is on; a concatenation with a
  separator would mix the two vocabularies. Training splits above 50,000 rows are sampled down.
- tabular tasks, `logreg` / `ridge`: the columns the task treats as numbers (median-imputed and
  standardised) and as categories (one-hot, unseen values ignored), then logistic or ridge regression.

Each baseline is scored on the test split (the validation split when there is no test split) by the
task's own `metrics`, fed outputs in the model's output space (log-probabilities in the task's class
order, or the standardised target), so its numbers are exactly comparable with the model's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from forgeml.evaluate.metrics import scalar_metrics

MAX_TRAIN_ROWS = 50_000  # a larger training split is sampled down: the baseline must stay a matter of seconds
WORD_FEATURES = 50_000  # most frequent word 1-2-grams kept, per text column
CHAR_FEATURES = 50_000  # most frequent character 2-4-grams kept, per text column
MAX_TEXT_CHARS = 2_000  # a text's first characters are enough for a bag-of-n-grams yardstick
MAX_CATEGORIES = 50  # one-hot columns per categorical feature; rarer values share one "infrequent" column
LABELS = {
    "majority": "majority class",
    "mean": "training mean",
    "tfidf_logreg": "TF-IDF + logistic regression",
    "tfidf_ridge": "TF-IDF + ridge regression",
    "logreg": "logistic regression",
    "ridge": "ridge regression",
    "pixels_logreg": "pixels + logistic regression",
}
POOLED = 8  # images: pixels average-pooled to 8 x 8 per channel, a plain linear yardstick


def fit_baselines(task: Any, splits: dict[str, Dataset | None], seed: int = 0) -> dict[str, Any]:
    """Fit the task's baselines on `splits['train']`, score them on the test (or validation) split.

    Returns `{"split", "train_rows", "seconds", "models": {name: {"label", "description", "seconds",
    "metrics"}}}`, or `{"skipped": reason}` when there is nothing labelled to score on. A baseline that
    cannot be fitted (say, a text column with no words at all) is recorded as `{"skipped": reason}` in
    `models`: it is a yardstick, never a reason to lose the run.
    """
    started = time.perf_counter()
    name = next((name for name in ("test", "validation") if splits.get(name) is not None), None)
    if name is None:
        return {"skipped": "no labelled validation or test split to score baselines on"}
    train, held_out = splits["train"], splits[name]
    if len(held_out) == 0:
        return {"skipped": f"the {name} split is empty"}
    if len(train) > MAX_TRAIN_ROWS:
        train = train.shuffle(seed=seed).select(range(MAX_TRAIN_ROWS))
    target = task.target
    text_columns = getattr(task, "text_columns", None)
    image_shape = getattr(task, "image_shape", None)
    if text_columns:
        needed = [*text_columns, target.column]
    elif image_shape:
        needed = ["image", target.column]
    else:
        needed = [*task.preprocessor.columns, target.column]
    # One gather per split: a split carved from train reads through an index, slow column by column.
    train, held_out = (data.select_columns(list(dict.fromkeys(needed))).to_dict() for data in (train, held_out))
    y_train = target.encode(train[target.column], "train")
    y_held_out = target.encode(held_out[target.column], name)
    classification = target.kind == "classification"

    if classification:
        candidates = {
            "majority": (
                DummyClassifier(strategy="prior"),
                "predicts the training class shares, so always answers the most frequent class",
            )
        }
    else:
        candidates = {"mean": (DummyRegressor(strategy="mean"), "always answers the training mean")}
    head = LogisticRegression(max_iter=1000) if classification else Ridge(alpha=1.0)
    head_name = "logistic regression" if classification else "ridge regression"
    if text_columns:
        features = _text_features(len(text_columns))
        sides = " (one set per text column)" if len(text_columns) > 1 else ""
        description = f"TF-IDF of word 1-2-grams and character 2-4-grams{sides}, {head_name}"
        candidates["tfidf_logreg" if classification else "tfidf_ridge"] = (
            Pipeline([("features", features), ("model", head)]),
            description,
        )
        inputs = {split: _texts(data, text_columns) for split, data in (("train", train), (name, held_out))}
    elif image_shape:
        description = f"pixels average-pooled to {POOLED} x {POOLED} per channel, standardised, {head_name}"
        candidates["pixels_logreg"] = (make_pipeline(StandardScaler(), head), description)
        inputs = {
            split: _pooled_pixels(data["image"], image_shape) for split, data in (("train", train), (name, held_out))
        }
    else:
        numeric = list(task.preprocessor.numeric)
        categorical = list(task.preprocessor.categorical)
        description = f"median-imputed, standardised numbers and one-hot categories, {head_name}"
        pipeline = Pipeline([("features", _tabular_features(numeric, categorical)), ("model", head)])
        candidates["logreg" if classification else "ridge"] = (pipeline, description)
        inputs = {split: _table(data, numeric, categorical) for split, data in (("train", train), (name, held_out))}

    models: dict[str, Any] = {}
    for key, (estimator, description) in candidates.items():
        clock = time.perf_counter()
        try:
            # One thread: OpenMP threads spinning against the other work on a busy CPU made the solver
            # 10x slower in our measurements, and these models are small enough for one core.
            with threadpool_limits(limits=1):
                estimator.fit(inputs["train"], y_train)
                outputs = _outputs(estimator, inputs[name], classification, target.num_outputs)
        except ValueError as error:  # e.g. "empty vocabulary" when no text column holds a word
            models[key] = {"label": LABELS[key], "description": description, "skipped": str(error)}
            continue
        models[key] = {
            "label": LABELS[key],
            "description": description,
            "seconds": time.perf_counter() - clock,
            "metrics": scalar_metrics(task.metrics(outputs, y_held_out)),
        }
    return {"split": name, "train_rows": len(y_train), "seconds": time.perf_counter() - started, "models": models}


def _outputs(estimator: Any, inputs: Any, classification: bool, num_classes: int) -> np.ndarray:
    """Predictions in the model's output space: log-probabilities over every class, or standardised values."""
    if not classification:
        return np.asarray(estimator.predict(inputs), dtype=np.float64).reshape(-1, 1)
    probabilities = np.full((inputs.shape[0], num_classes), 1e-12)
    # Columns follow the class ids the estimator saw; a class missing from a sampled train split keeps ~0.
    probabilities[:, estimator.classes_] = np.maximum(estimator.predict_proba(inputs), 1e-12)  # no log(0)
    return np.log(probabilities / probabilities.sum(axis=1, keepdims=True))


def _pooled_pixels(images: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """Raw H x W x C images -> (rows, POOLED * POOLED * C) means of equal blocks of pixels."""
    height, width, channels = shape
    pixels = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(len(images), height, width, channels)
    rows = np.array_split(np.arange(height), min(POOLED, height))
    cols = np.array_split(np.arange(width), min(POOLED, width))
    pooled = [pixels[:, r][:, :, c].mean(axis=(1, 2)) for r in rows for c in cols]
    return np.stack(pooled, axis=1).reshape(len(images), -1).astype(np.float32)


def _texts(rows: dict[str, list], text_columns: list[str]) -> np.ndarray:
    """Texts as a (rows, columns) object array; missing texts become empty strings."""
    values = [["" if text is None else str(text)[:MAX_TEXT_CHARS] for text in rows[name]] for name in text_columns]
    return np.array(values, dtype=object).T.reshape(len(values[0]), len(text_columns))


def _text_features(columns: int) -> ColumnTransformer:
    def one_column() -> FeatureUnion:
        return FeatureUnion(
            [
                ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=WORD_FEATURES)),
                (
                    "chars",
                    TfidfVectorizer(
                        analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, max_features=CHAR_FEATURES
                    ),
                ),
            ]
        )

    # A scalar column index hands each vectorizer a 1-D array of strings.
    return ColumnTransformer([(f"text_{index}", one_column(), index) for index in range(columns)])


def _table(rows: dict[str, list], numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """The task's numeric columns as floats (missing: NaN) and categorical ones as strings (missing: "")."""
    frame: dict[str, Any] = {name: _floats(rows[name]) for name in numeric}
    frame |= {name: [_category(value) for value in rows[name]] for name in categorical}
    return pd.DataFrame(frame)


def _tabular_features(numeric: list[str], categorical: list[str]) -> ColumnTransformer:
    numbers = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
    categories = OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=MAX_CATEGORIES)
    return ColumnTransformer([("numbers", numbers, numeric), ("categories", categories, categorical)])


def _floats(values: list) -> np.ndarray:
    numbers = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):
        try:
            numbers[row] = np.nan if value is None or value == "" else float(value)
        except (TypeError, ValueError):
            numbers[row] = np.nan
    return numbers


def _category(value: Any) -> str:
    return "" if value is None else str(value).strip()
