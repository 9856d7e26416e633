"""A trained model's reference statistics, computed once, and the check of a window of served inputs
against them.

    monitor = DriftMonitor("runs/sst2/latest")
    result = monitor.check(texts)            # {'drift': False, 'text': {...}, 'predictions': {...}, ...}

`check` is `compare(describe(rows))`: `describe` runs the model over the window (embeddings, predicted
labels, lengths) and `compare` is the statistics alone, so a caller that already has described rows
(a benchmark drawing many windows from one pool) only pays for the tests. Both are safe to call from a
background thread: the reference is built once, under a lock, and never changed afterwards.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

from forgeml.data.io import column
from forgeml.errors import ConfigError, ForgeError
from forgeml.monitor import stats
from forgeml.monitor.embeddings import TextPass, text_pass

if TYPE_CHECKING:
    from forgeml.api import Predictor

MIN_ROWS = 20  # below this a window says nothing; `check` refuses it
MODEL_SOURCES = ("auto", "validation", "train")
WORD = re.compile(r"\w+")


@dataclass
class Window:
    """The facts about a set of inputs that the tests compare (raw columns, or what the model made of
    texts), plus the model's predictions for them. `take` selects rows without recomputing anything."""

    size: int
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # tabular: floats (NaN missing) or strings
    vectors: np.ndarray | None = None  # text: pooled encoder vectors
    words: np.ndarray | None = None  # text: words per row
    unknown: np.ndarray | None = None  # text: [UNK] tokens per row
    tokens: np.ndarray | None = None  # text: tokens per row (special tokens excluded)
    unseen_words: np.ndarray | None = None  # text: words per row not in the training texts' vocabulary
    labels: np.ndarray | None = None  # predicted classes
    values: np.ndarray | None = None  # predicted numbers

    def take(self, rows: np.ndarray | list[int] | range) -> Window:
        rows = np.asarray(rows, dtype=np.int64)
        picked = {
            name: None if values is None else values[rows]
            for name, values in vars(self).items()
            if name not in ("size", "columns")
        }
        return Window(size=len(rows), columns={name: v[rows] for name, v in self.columns.items()}, **picked)


@dataclass
class Reference:
    """What windows are compared with: training rows (inputs) and held-out rows (what the model makes of
    them), with the bins and projections fitted on them once."""

    kind: str  # "tabular" | "text"
    inputs: Window  # the training split's rows (subsampled)
    model: Window  # the rows the model-based statistics come from (vectors, predictions)
    sources: dict[str, Any]
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    category_counts: dict[str, Counter] = field(default_factory=dict)
    edges: dict[str, np.ndarray] = field(default_factory=dict)
    label_counts: Counter | None = None
    projection: tuple[np.ndarray, np.ndarray] | None = None  # (mean, components scaled to unit variance)
    projected: np.ndarray | None = None  # the model rows' vectors, projected
    vocabulary: frozenset[str] = frozenset()  # the words of every training text (lower-cased)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        mean, components = self.projection
        return (vectors - mean) @ components


class DriftMonitor:
    """Drift of served inputs from a run's training data.

    `model`: a run directory (or `runs/NAME/latest`, `NAME@champion`) or a loaded `Predictor`.
    `alpha`: the family-wise false-alarm rate of the overall decision (Holm over every test combined).
    `reference_rows`: training rows (and held-out rows for the model's own statistics) kept, seeded.
    `permutations`: shuffles of the domain labels for the domain classifier's p-value (text models).
    `model_reference`: where the reference's embeddings and predicted labels come from. "validation":
    rows the model was not fitted on, so they get the vectors and labels that new rows from the training
    distribution get (a model that memorised its training rows embeds and labels them more confidently
    than anything it will serve). "train": the training rows. "auto" (default): the validation split
    when it was carved out of the training file (same distribution), else the train split.
    """

    def __init__(
        self,
        model: str | Path | Predictor,
        alpha: float = 0.05,
        reference_rows: int = 5000,
        permutations: int = 199,
        model_reference: str = "auto",
        components: int = 32,
        seed: int = 0,
    ):
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"alpha: {alpha} is not between 0 and 1 (e.g. 0.05)")
        if model_reference not in MODEL_SOURCES:
            raise ConfigError(f"model_reference: {model_reference!r} is not one of {', '.join(MODEL_SOURCES)}")
        if reference_rows < MIN_ROWS:
            raise ConfigError(f"reference_rows: {reference_rows} is fewer than {MIN_ROWS}")
        self.model = model
        self.alpha = alpha
        self.reference_rows = reference_rows
        self.permutations = permutations
        self.model_reference = model_reference
        self.components = components
        self.seed = seed
        self._predictor: Predictor | None = None
        self._reference: Reference | None = None
        self._lock = threading.RLock()

    @property
    def predictor(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                from forgeml.api import Predictor

                predictor = self.model if isinstance(self.model, Predictor) else Predictor(self.model)
                predictor._require_predictions()
                if getattr(predictor.task, "image_shape", None) is not None:
                    raise ForgeError(
                        f"drift monitoring: compares texts or table columns; {predictor.run.path} is an image model"
                    )
                self._predictor = predictor
        return self._predictor

    @property
    def kind(self) -> str:
        return "text" if getattr(self.predictor.task, "text_columns", None) else "tabular"

    @property
    def reference(self) -> Reference:
        """Built on first use from the run's own prepared splits, then kept."""
        with self._lock:
            if self._reference is None:
                self._reference = self._build_reference()
        return self._reference

    def check(self, rows: list[Any] | Dataset, predictions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Drift of one window of raw inputs (texts, pairs or dicts of columns, as served). `predictions`:
        the answers served for them ({'label'} or {'value'}); computed with the model when not given."""
        if len(rows) < MIN_ROWS:  # before the model runs
            raise ForgeError(f"window: {len(rows)} rows; a drift check needs at least {MIN_ROWS}")
        return self.compare(self.describe(rows, predictions))

    def describe(self, rows: list[Any] | Dataset, predictions: list[dict[str, Any]] | None = None) -> Window:
        """The window's facts the tests compare (the model runs here for texts, or for missing predictions)."""
        rows = rows if isinstance(rows, Dataset) else list(rows)
        if predictions is not None and len(predictions) != len(rows):
            raise ForgeError(f"predictions: {len(predictions)} answers for {len(rows)} rows; give one per row")
        vocabulary = self.reference.vocabulary if self.kind == "text" else frozenset()
        window = self._describe(rows, prepared=False, vocabulary=vocabulary)
        if predictions is not None:
            window = replace(window, **_answers(predictions))
        elif window.labels is None and window.values is None:  # tabular: the model has not run yet
            window = replace(window, **_answers(self.predictor.predict(rows, batch_size=512)))
        return window

    def compare(self, window: Window) -> dict[str, Any]:
        """Every test of a described window against the reference, Holm-corrected, and the decision."""
        if window.size < MIN_ROWS:
            raise ForgeError(f"window: {window.size} rows; a drift check needs at least {MIN_ROWS}")
        reference = self.reference
        seed = self.seed
        result: dict[str, Any] = {"kind": reference.kind, "rows": window.size}
        tests: dict[str, dict[str, Any]] = {}
        if reference.kind == "tabular":
            features: dict[str, Any] = {}
            for name in reference.numeric:
                features[name] = stats.numeric_drift(
                    reference.inputs.columns[name], window.columns[name], reference.edges[name]
                )
            for name in reference.categorical:
                features[name] = stats.categorical_drift(reference.category_counts[name], window.columns[name], seed)
            result["features"] = features
            tests |= {f"feature:{name}": test for name, test in features.items()}
        else:
            text = {
                "domain": stats.domain_classifier(
                    reference.projected,
                    reference.project(window.vectors),
                    self._permutations(),
                    seed=seed,
                ),
                "length": stats.numeric_drift(reference.inputs.words, window.words, reference.edges["words"])
                | {"unit": "words"},
                "unknown_tokens": stats.presence_drift(reference.inputs.unknown > 0, window.unknown > 0)
                | {
                    "rate": {
                        "reference": _share(reference.inputs.unknown, reference.inputs.tokens),
                        "window": _share(window.unknown, window.tokens),
                    },
                    # A magnitude beside the test: on the held-out reference rows this is the share of new
                    # in-distribution text's words that training never had (0 when the reference is train).
                    "unseen_words": {
                        "reference": _share(reference.model.unseen_words, reference.model.words),
                        "window": _share(window.unseen_words, window.words),
                    },
                },
            }
            result["text"] = text
            tests |= {f"text:{name}": test for name, test in text.items()}
        predictions = self._prediction_drift(window)
        if predictions is not None:
            result["predictions"] = predictions
            tests["predictions"] = predictions
        adjusted = stats.holm([test["p_value"] for test in tests.values()])
        for test, p in zip(tests.values(), adjusted, strict=True):
            test["p_adjusted"] = p
            test["drift"] = bool(p <= self.alpha)
        ranked = sorted(tests, key=lambda name: (tests[name]["p_adjusted"], -(tests[name].get("psi") or 0.0)))
        result |= {
            "drift": any(test["drift"] for test in tests.values()),
            "alpha": self.alpha,
            "correction": "holm",
            "tests": len(tests),
            "drifted": [name for name in ranked if tests[name]["drift"]],
            "ranking": ranked,
        }
        return result

    def _permutations(self) -> int:
        """Enough shuffles that the domain test can reject after Holm's correction (p >= 1 / (runs + 1))."""
        family = 4 if self.predictor.task.target is not None else 3
        return max(self.permutations, math.ceil(family / self.alpha))

    def _prediction_drift(self, window: Window) -> dict[str, Any] | None:
        reference = self.reference
        if reference.label_counts is not None and window.labels is not None:
            counts = reference.label_counts
            return stats.categorical_drift(counts, window.labels, self.seed, closed=True) | {"of": "label"}
        if reference.model.values is not None and window.values is not None:
            return stats.numeric_drift(reference.model.values, window.values) | {"of": "value"}
        return None

    def _describe(self, rows: list[Any] | Dataset, prepared: bool, vocabulary: frozenset[str] = frozenset()) -> Window:
        predictor = self.predictor
        if self.kind == "text":
            return _text_window(predictor, text_pass(predictor, rows, prepared=prepared), vocabulary)
        tabular = self.predictor.task.preprocessor
        columns: dict[str, np.ndarray] = {}
        for name in tabular.numeric:
            columns[name] = _numbers(_values(rows, name, predictor.input_columns))
        for name in tabular.categorical:
            columns[name] = np.array([stats.category_value(v) for v in _values(rows, name, predictor.input_columns)])
        return Window(size=len(rows), columns=columns)

    def _build_reference(self) -> Reference:
        from forgeml.data.prepare import prepare

        predictor = self.predictor
        splits = prepare(predictor.config).splits
        train = _subsample(splits["train"], self.reference_rows, self.seed)
        sources = {"inputs": {"split": "train", "rows": len(train)}}
        validation = splits.get("validation")
        source = self.model_reference
        if source == "auto":
            carved = predictor.config.data.validation is None
            source = "validation" if carved and validation is not None and len(validation) >= MIN_ROWS else "train"
        elif source == "validation" and (validation is None or len(validation) < MIN_ROWS):
            raise ConfigError(f"model_reference: {predictor.run.path} has no validation split of {MIN_ROWS}+ rows")
        held = train if source == "train" else _subsample(validation, self.reference_rows, self.seed)
        sources["model"] = {"split": source, "rows": len(held)}
        if self.kind == "text":
            vocabulary = _vocabulary(splits["train"], predictor.task.text_columns)
            inputs = self._describe(train, prepared=True, vocabulary=vocabulary)
            model = inputs if held is train else self._describe(held, prepared=True, vocabulary=vocabulary)
            reference = Reference("text", inputs, model, sources, vocabulary=vocabulary)
            reference.edges["words"] = stats.quantile_edges(inputs.words.astype(float))
            reference.projection = _projection(model.vectors, self.components, self.seed)
            reference.projected = reference.project(model.vectors)
        else:
            inputs = self._describe(train, prepared=True)
            task = predictor.task
            reference = Reference(
                "tabular", inputs, inputs, sources, list(task.preprocessor.numeric), list(task.preprocessor.categorical)
            )
            for name in reference.numeric:
                reference.edges[name] = stats.quantile_edges(inputs.columns[name])
            # Counting is cheap: categories come from every training row, so "unseen" means unseen in training.
            for name in reference.categorical:
                reference.category_counts[name] = stats.category_counts(column(splits["train"], name))
            sources["categories"] = {"split": "train", "rows": len(splits["train"])}
            answers = predictor.predict(held, batch_size=512)
            reference.model = replace(self._describe(held, prepared=True), **_answers(answers))
        if reference.model.labels is not None:
            reference.label_counts = Counter(reference.model.labels.tolist())
        return reference


def _text_window(predictor: Predictor, passed: TextPass, vocabulary: frozenset[str]) -> Window:
    answers = predictor.task.predictions(passed.outputs)
    unseen = [sum(word not in vocabulary for word in _words(text)) for text in passed.texts]
    window = Window(
        size=len(passed.words),
        vectors=passed.vectors,
        words=passed.words,
        unknown=passed.unknown,
        tokens=passed.tokens,
        unseen_words=np.asarray(unseen, dtype=np.int64),
    )
    if "label" in answers:
        return replace(window, labels=np.asarray([str(label) for label in answers["label"]]))
    return replace(window, values=np.asarray(answers["value"], dtype=float).reshape(-1))


def _answers(answers: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Served answers as predicted labels or values."""
    if all("label" in answer for answer in answers):
        return {"labels": np.asarray([str(answer["label"]) for answer in answers])}
    if all("value" in answer for answer in answers):
        return {"values": np.asarray([float(answer["value"]) for answer in answers])}
    raise ForgeError("predictions: each answer needs a 'label' (classification) or a 'value' (regression)")


def _share(part: np.ndarray, whole: np.ndarray) -> float | None:
    """sum(part) / sum(whole) over rows (e.g. [UNK] tokens of all tokens)."""
    total = int(whole.sum())
    return round(int(part.sum()) / total, 6) if total else None


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _vocabulary(train: Dataset, columns: list[str]) -> frozenset[str]:
    """Every word of the training texts (lower-cased, as `_words` splits them)."""
    return frozenset(word for name in columns for text in column(train, name) for word in _words(str(text or "")))


def _projection(vectors: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the reference vectors, whitened: the domain classifier fits on a few dozen directions that
    carry most of the variance instead of hundreds, which keeps each of its many fits cheap. Fitted on the
    reference alone, it is a fixed map for every window, so the test stays exact."""
    from sklearn.decomposition import PCA

    count = max(1, min(components, vectors.shape[1], len(vectors) - 1))
    pca = PCA(n_components=count, whiten=True, random_state=seed).fit(vectors)
    scale = np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    return pca.mean_, (pca.components_ / scale[:, None]).T


def _subsample(dataset: Dataset, rows: int, seed: int) -> Dataset:
    if len(dataset) <= rows:
        return dataset
    chosen = np.random.default_rng(seed).choice(len(dataset), rows, replace=False)
    return dataset.select(np.sort(chosen).tolist())


def _values(rows: list[Any] | Dataset, name: str, columns: list[str]) -> list[Any]:
    """One input column of served rows (dicts of columns, or values in the model's column order)."""
    if isinstance(rows, Dataset):
        return column(rows, name)
    position = columns.index(name)
    values = []
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            values.append(row.get(name))
        elif isinstance(row, list | tuple) and len(row) == len(columns):
            values.append(row[position])
        else:
            raise ForgeError(f"rows[{index}]: expected a dict of the input columns ({', '.join(columns)})")
    return values


def _numbers(values: list[Any]) -> np.ndarray:
    """Floats, NaN for missing or unreadable values (the drift report counts them as missing)."""
    numbers = np.empty(len(values), dtype=float)
    for index, value in enumerate(values):
        try:
            numbers[index] = float(value) if value is not None and str(value).strip() != "" else np.nan
        except (TypeError, ValueError):
            numbers[index] = np.nan
    return numbers
