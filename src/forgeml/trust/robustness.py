"""Robustness: does the model keep its answers when the input is slightly wrong?

Three probes, each returning a JSON-serialisable report:

- `text_robustness`: natural noise (typos, dropped or inserted letters, case, punctuation) applied
  to a share of the words; accuracy (or RMSE) under noise and how many predictions flip.
- `word_substitution_attack`: a greedy word-substitution attack in the style of TextFooler (Jin et
  al., 2020, "Is BERT Really Robust?"). Words are ranked by how much deleting them lowers the
  true class's probability, then replaced by their nearest neighbours in the model's own input
  embedding space until the prediction flips or the word budget runs out. TextFooler uses separate
  counter-fitted word vectors and a sentence-similarity filter; the model's own embeddings keep this
  offline and dependency-free, at the price of candidates that are not always synonyms, so the
  success rate is an upper bound on what a meaning-preserving attacker achieves.
- `tabular_robustness`: Gaussian noise on the standardised numeric features.

Libraries such as TextAttack and nlpaug do this, but pin old transformers/torch versions and
download word vectors at run time; the few functions needed here are short enough to own.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from forgeml.data.io import column
from forgeml.evaluate.outputs import model_outputs
from forgeml.evaluate.plots import plt, save_figure
from forgeml.tasks.base import TensorSplit

Perturbation = Callable[[str, float, random.Random], str]

MIN_EDIT_LENGTH = 3  # shorter words ("a", "is") lose their meaning entirely under a character edit
INSERTED_PUNCTUATION = ",.!"
MAX_ATTACK_EXAMPLES_SHOWN = 5
_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _qwerty_neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard (same row and the rows above and below)."""
    position = {c: (r, i) for r, row in enumerate(_QWERTY_ROWS) for i, c in enumerate(row)}
    neighbours = {}
    for letter, (r, i) in position.items():
        near = [
            other for other, (r2, i2) in position.items() if other != letter and abs(r2 - r) <= 1 and abs(i2 - i) <= 1
        ]
        neighbours[letter] = "".join(near)
    return neighbours


QWERTY_NEIGHBOURS = _qwerty_neighbours()


# --- text perturbations ---------------------------------------------------------------------------


def _map_words(text: str, rate: float, rng: random.Random, edit: Callable[[str, random.Random], str]) -> str:
    """Apply `edit` to each word with probability `rate`, keeping the original whitespace."""
    if rate <= 0.0:
        return text
    pieces = re.split(r"(\s+)", text)
    for index, piece in enumerate(pieces):
        if piece and not piece.isspace() and rng.random() < rate:
            pieces[index] = edit(piece, rng)
    return "".join(pieces)


def _editable(word: str) -> bool:
    return len(word) >= MIN_EDIT_LENGTH


def _swap_adjacent(word: str, rng: random.Random) -> str:
    if not _editable(word):
        return word
    # Inner pairs keep the first and last letter, which readers rely on most; 3-letter words have none.
    first, last = (1, len(word) - 2) if len(word) >= 4 else (0, len(word) - 1)
    positions = [i for i in range(first, last) if word[i] != word[i + 1]]  # swapping "oo" changes nothing
    if not positions:
        return word
    i = rng.choice(positions)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _drop_character(word: str, rng: random.Random) -> str:
    if not _editable(word):
        return word
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1 :]


def _insert_character(word: str, rng: random.Random) -> str:
    if not _editable(word):
        return word
    i = rng.randrange(len(word) + 1)
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]


def _typo(word: str, rng: random.Random) -> str:
    if not _editable(word):
        return word
    positions = [i for i, c in enumerate(word) if c.lower() in QWERTY_NEIGHBOURS]
    if not positions:
        return word
    i = rng.choice(positions)
    replacement = rng.choice(QWERTY_NEIGHBOURS[word[i].lower()])
    return word[:i] + (replacement.upper() if word[i].isupper() else replacement) + word[i + 1 :]


def _recase(word: str, rng: random.Random) -> str:
    variants = [v for v in dict.fromkeys((word.upper(), word.lower(), word.title())) if v != word]
    return rng.choice(variants) if variants else word


def _repunctuate(word: str, rng: random.Random) -> str:
    stripped = "".join(c for c in word if c not in string.punctuation)
    if stripped != word:
        return stripped
    return word + rng.choice(INSERTED_PUNCTUATION)


def char_swap(text: str, rate: float, rng: random.Random) -> str:
    """Swap two adjacent inner characters in a share `rate` of the words ("film" -> "flim")."""
    return _map_words(text, rate, rng, _swap_adjacent)


def char_drop(text: str, rate: float, rng: random.Random) -> str:
    """Delete one character from a share `rate` of the words."""
    return _map_words(text, rate, rng, _drop_character)


def char_insert(text: str, rate: float, rng: random.Random) -> str:
    """Insert one random lowercase letter into a share `rate` of the words."""
    return _map_words(text, rate, rng, _insert_character)


def keyboard_typo(text: str, rate: float, rng: random.Random) -> str:
    """Replace one letter by a QWERTY neighbour in a share `rate` of the words ("good" -> "giod")."""
    return _map_words(text, rate, rng, _typo)


def case_change(text: str, rate: float, rng: random.Random) -> str:
    """Upper-, lower- or title-case a share `rate` of the words (always to a different casing)."""
    return _map_words(text, rate, rng, _recase)


def punctuation(text: str, rate: float, rng: random.Random) -> str:
    """In a share `rate` of the words, remove their punctuation or, where they have none, append , . or !"""
    return _map_words(text, rate, rng, _repunctuate)


TEXT_PERTURBATIONS: dict[str, Perturbation] = {
    "char_swap": char_swap,
    "char_drop": char_drop,
    "char_insert": char_insert,
    "keyboard_typo": keyboard_typo,
    "case_change": case_change,
    "punctuation": punctuation,
}


# --- shared scoring -------------------------------------------------------------------------------


def _kind(task: Any) -> str:
    kind = getattr(task.target, "kind", None)
    if kind not in ("classification", "regression"):
        raise ValueError(f"robustness: tasks with a classification or regression target only, not {kind!r}")
    return kind


def _truth(task: Any, values: list) -> list:
    """Labels as class names (classification) or floats (regression), comparable with the answers."""
    if task.target.kind == "classification":
        return [str(v) for v in values]
    return [float(v) for v in values]


def _answers(task: Any, answers: dict[str, Any]) -> np.ndarray:
    if task.target.kind == "classification":
        return np.asarray(answers["label"], dtype=object)
    return np.asarray(answers["value"], dtype=np.float64)


def _score(kind: str, predicted: np.ndarray, truth: np.ndarray) -> float:
    if kind == "classification":
        return float(np.mean(predicted == truth))
    return float(np.sqrt(np.mean((predicted - truth) ** 2)))


def _change(kind: str, predicted: np.ndarray, clean: np.ndarray) -> float:
    if kind == "classification":
        return float(np.mean(predicted != clean))
    return float(np.mean(np.abs(predicted - clean)))


def _names(kind: str) -> tuple[str, str, str]:
    """(metric, how much worse it got, how much the answers moved) for a target kind."""
    if kind == "classification":
        return "accuracy", "accuracy_drop", "flip_rate"
    return "rmse", "rmse_increase", "mean_abs_change"


def _worsening(kind: str, clean: float, perturbed: float) -> float:
    return clean - perturbed if kind == "classification" else perturbed - clean


def _scorer(kind: str, truth: list | None) -> Callable[[np.ndarray], float | None]:
    """answers -> accuracy (or RMSE) against `truth`; None for every answer set when there is no truth."""
    if truth is None:
        return lambda answers: None
    truth_array = np.asarray(truth, dtype=object if kind == "classification" else np.float64)
    return lambda answers: _score(kind, answers, truth_array)


def sample_rows(count: int, max_examples: int, seed: int) -> list[int]:
    """A seeded subset of at most `max_examples` of `count` row positions, in their original order."""
    return _sample(count, max_examples, seed)


def _sample(count: int, max_examples: int, seed: int) -> list[int]:
    """A seeded subset of row positions, kept in their original order."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if count <= max_examples:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), max_examples))


def _labelled_rows(task: Any, dataset: Dataset, max_examples: int, seed: int) -> tuple[Dataset, list]:
    if task.target.column not in dataset.column_names:
        raise ValueError(f"robustness: the rows have no label column {task.target.column!r}")
    labels = column(dataset, task.target.column)
    labelled = [i for i, value in enumerate(labels) if value is not None and str(value).strip() != ""]
    if not labelled:
        raise ValueError(f"robustness: no labelled rows (column {task.target.column!r} is empty)")
    chosen = [labelled[i] for i in _sample(len(labelled), max_examples, seed)]
    return dataset.select(chosen), _truth(task, [labels[i] for i in chosen])


def _rows(task: Any, dataset: Dataset, max_examples: int, seed: int) -> tuple[Dataset, list | None]:
    """(sampled rows, their true answers); the answers are None for a dataset without a label column,
    where only how much the predictions move can be measured."""
    if task.target.column in dataset.column_names:
        return _labelled_rows(task, dataset, max_examples, seed)
    if not len(dataset):
        raise ValueError("robustness: no rows to perturb")
    return dataset.select(_sample(len(dataset), max_examples, seed)), None


def _unlabelled_note(task: Any, metric: str) -> str:
    return (
        f"no label column {task.target.column!r}: {metric} needs the true labels, so only the changes of the answers "
        "were measured"
    )


# --- text robustness ------------------------------------------------------------------------------


def _text_predictor(task: Any, model: nn.Module, dataset: Dataset, batch_size: int) -> Callable:
    """predict(perturbed texts) -> answers, with the other text column (pairs) held fixed."""
    columns = {name: [t or "" for t in column(dataset, name)] for name in task.text_columns}
    perturbed = task.text_columns[-1]

    def predict(texts: list[str]) -> dict[str, Any]:
        # The pair's first text repeats when `texts` holds several variants of one row (the attack).
        repeat = len(texts) // max(1, len(dataset))
        rows = {name: values * repeat for name, values in columns.items()}
        rows[perturbed] = texts
        encoded = task.encode(Dataset.from_dict(rows), "robustness", with_targets=False)
        outputs, _ = model_outputs(model, encoded, batch_size)
        return task.predictions(outputs)

    return predict


def _check_text_task(task: Any) -> list[str]:
    text_columns = list(getattr(task, "text_columns", None) or [])
    if len(text_columns) not in (1, 2):
        raise ValueError("robustness: text tasks with one text column (or a pair of them) only")
    return text_columns


def text_robustness(
    task: Any,
    model: nn.Module,
    dataset: Dataset,
    perturbations: Sequence[str] | None = None,
    rates: Sequence[float] = (0.1, 0.3),
    max_examples: int = 500,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Accuracy (or RMSE) and prediction changes under each text perturbation at each word rate.

    Classification reports accuracy, its drop and the flip rate (share of predictions that differ
    from the clean prediction); regression reports RMSE, its increase and the mean absolute change
    of the predicted value. For text pairs only the second text is perturbed. Rows without a label column
    get the changes only (flip rate or mean absolute change); the metric and its worsening are None.
    """
    text_columns = _check_text_task(task)
    kind = _kind(task)
    names = list(perturbations or TEXT_PERTURBATIONS)
    unknown = [name for name in names if name not in TEXT_PERTURBATIONS]
    if unknown:
        raise ValueError(f"perturbations: unknown {unknown}; choose from {', '.join(TEXT_PERTURBATIONS)}")
    bad_rates = [rate for rate in rates if not 0.0 <= rate <= 1.0]
    if bad_rates or not rates:
        raise ValueError(f"rates: each must be between 0 and 1, got {list(rates)}")
    rows, truth = _rows(task, dataset, max_examples, seed)
    predict = _text_predictor(task, model, rows, batch_size)
    texts = [t or "" for t in column(rows, text_columns[-1])]
    metric, worse, moved = _names(kind)
    score_of = _scorer(kind, truth)
    clean = _answers(task, predict(texts))
    clean_score = score_of(clean)
    results = []
    for name in names:
        for rate in rates:
            rng = random.Random(f"{seed}:{name}:{rate}")  # str seeds are stable across processes
            perturbed = [TEXT_PERTURBATIONS[name](text, rate, rng) for text in texts]
            answers = _answers(task, predict(perturbed))
            score = score_of(answers)
            changed = [i for i, (a, b) in enumerate(zip(texts, perturbed, strict=True)) if a != b]
            results.append(
                {
                    "perturbation": name,
                    "rate": float(rate),
                    metric: score,
                    worse: None if score is None else _worsening(kind, clean_score, score),
                    moved: _change(kind, answers, clean),
                    "texts_changed": len(changed) / len(texts),
                    "example": {"original": texts[changed[0]], "perturbed": perturbed[changed[0]]} if changed else None,
                }
            )
    notes = [f"text pairs: only {text_columns[-1]!r} was perturbed"] if len(text_columns) == 2 else []
    if truth is None:
        notes.append(_unlabelled_note(task, metric))
    return {
        "kind": kind,
        "metric": metric,
        "labelled": truth is not None,
        "examples": len(texts),
        "seed": seed,
        "perturbed_column": text_columns[-1],
        "note": "; ".join(notes) or None,
        "clean": {metric: clean_score},
        "results": results,
    }


# --- word substitution attack ---------------------------------------------------------------------


class _EmbeddingNeighbours:
    """Nearest whole-word tokens by cosine similarity in the model's input embedding matrix."""

    def __init__(self, tokenizer: Any, model: nn.Module, count: int):
        special = set(tokenizer.all_special_tokens)
        vocabulary = tokenizer.get_vocab()
        # Whole alphabetic words only: "##ing" pieces, punctuation and [CLS] are not words to swap in.
        words = sorted((i, t) for t, i in vocabulary.items() if t.isalpha() and t not in special)
        self.ids = {token: position for position, (_, token) in enumerate(words)}
        self.tokens = [token for _, token in words]
        weights = model.encoder.get_input_embeddings().weight.detach().float().cpu()
        matrix = weights[torch.as_tensor([i for i, _ in words], dtype=torch.long)]
        self.unit = torch.nn.functional.normalize(matrix, dim=1)  # once: every lookup is one matmul
        self.tokenizer = tokenizer
        self.count = count
        self.cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        if word not in self.cache:
            pieces = self.tokenizer.tokenize(word)
            position = self.ids.get(pieces[0]) if len(pieces) == 1 else None
            if position is None:  # out-of-vocabulary words have no single embedding to search around
                self.cache[word] = []
            else:
                similarity = self.unit @ self.unit[position]
                similarity[position] = -math.inf
                top = torch.topk(similarity, min(self.count, len(self.tokens) - 1)).indices.tolist()
                self.cache[word] = [self.tokens[i] for i in top]
        return self.cache[word]


def _split_word(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation): "great!" -> ("", "great", "!")."""
    match = re.fullmatch(r"(\W*)(.*?)(\W*)", word, flags=re.DOTALL)
    return match.group(1), match.group(2), match.group(3)


def _same_case(candidate: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


def _attack_one(
    words: list[str],
    true_index: int,
    true_label: str,
    predict: Callable,
    neighbours: _EmbeddingNeighbours,
    budget: float,
) -> dict[str, Any]:
    """Greedy substitution on one correctly classified text; returns the outcome and query count."""
    max_changes = int(budget * len(words) + 1e-9)
    deletions = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
    queries = len(deletions) + 1
    base = predict([" ".join(words)])["probabilities"][0, true_index]
    dropped = predict(deletions)["probabilities"][:, true_index] if len(words) > 1 else np.array([base])
    order = np.argsort(-(base - dropped), kind="stable")  # most important word first
    current, probability, changed, label = list(words), base, 0, true_label
    for i in order.tolist():
        if changed + 1 > max_changes:
            break
        lead, core, trail = _split_word(current[i])
        candidates = [c for c in (_same_case(c, core) for c in neighbours(core)) if c != core] if core else []
        if not candidates:
            continue
        variants = [[*current[:i], lead + c + trail, *current[i + 1 :]] for c in candidates]
        answers = predict([" ".join(v) for v in variants])
        queries += len(variants)
        scores = answers["probabilities"][:, true_index]
        best = int(np.argmin(scores))
        if scores[best] >= probability:
            continue  # no candidate helps the attacker: leave the word alone
        current, probability, changed = variants[best], float(scores[best]), changed + 1
        label = answers["label"][best]
        if label != true_label:
            break
    return {
        "success": label != true_label,
        "adversarial": " ".join(current),
        "adversarial_label": label,
        "words_changed": changed / len(words),
        "queries": queries,
    }


def word_substitution_attack(
    task: Any,
    model: nn.Module,
    dataset: Dataset,
    max_examples: int = 50,
    budget: float = 0.2,
    neighbours: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """A greedy, TextFooler-style word substitution attack on a text classifier.

    Only rows the model classifies correctly are attacked. A success is a flipped prediction with
    at most `budget` (a share) of the words replaced; candidates are the `neighbours` nearest
    whole-word tokens in the model's input embeddings. For text pairs the second text is attacked.
    """
    text_columns = _check_text_task(task)
    if _kind(task) != "classification":
        raise ValueError("word_substitution_attack: needs a classification task (a flip is a changed label)")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget: a share of the words between 0 (exclusive) and 1, got {budget}")
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    rows, truth = _labelled_rows(task, dataset, max_examples, seed)
    texts = [t or "" for t in column(rows, text_columns[-1])]
    clean = task.predictions(model_outputs(model, task.encode(rows, "robustness", with_targets=False))[0])
    search = _EmbeddingNeighbours(task.tokenizer, model, neighbours)
    classes = task.target.classes
    outcomes, skipped = [], 0
    for row, (text, label, predicted) in enumerate(zip(texts, truth, clean["label"], strict=True)):
        words = text.split()
        if predicted != label or not words:
            skipped += 1
            continue
        predict = _text_predictor(task, model, rows.select([row]), batch_size=64)
        outcome = _attack_one(words, classes.index(label), label, predict, search, budget)
        outcomes.append({"original": text, "label": label, **outcome})
    successes = [o for o in outcomes if o["success"]]
    return {
        "method": "greedy word substitution, model input-embedding neighbours (TextFooler-style)",
        "attacked_column": text_columns[-1],
        "budget": budget,
        "neighbours": neighbours,
        "seed": seed,
        "examples": len(texts),
        "examples_attacked": len(outcomes),
        "skipped_misclassified": skipped,
        "successes": len(successes),
        "success_rate": len(successes) / len(outcomes) if outcomes else None,
        "mean_words_changed": float(np.mean([o["words_changed"] for o in successes])) if successes else None,
        "mean_queries": float(np.mean([o["queries"] for o in outcomes])) if outcomes else None,
        "words_changed": [o["words_changed"] for o in successes],
        "pairs": [
            {k: o[k] for k in ("original", "adversarial", "label", "adversarial_label")}
            for o in successes[:MAX_ATTACK_EXAMPLES_SHOWN]
        ],
    }


# --- tabular robustness ---------------------------------------------------------------------------


def tabular_robustness(
    task: Any,
    model: nn.Module,
    dataset: Dataset,
    sigmas: Sequence[float] = (0.1, 0.3, 0.5),
    max_examples: int = 2000,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Accuracy (or RMSE) when every numeric feature gets Gaussian noise of `sigma` training stds.

    The model sees standardised numbers, so noise of `sigma` training standard deviations is
    `sigma` standard-normal noise added to the standardised inputs. Categorical columns are kept. Rows
    without a label column get the changes of the answers only, as in `text_robustness`.
    """
    kind = _kind(task)
    numeric = list(task.preprocessor.numeric)
    if not numeric:
        raise ValueError("tabular_robustness: the model has no numeric features to add noise to")
    if not sigmas or any(s < 0 for s in sigmas):
        raise ValueError(f"sigmas: non-negative noise scales expected, got {list(sigmas)}")
    rows, truth = _rows(task, dataset, max_examples, seed)
    inputs = task.preprocessor.transform(rows, "robustness")
    score_of = _scorer(kind, truth)

    def predict(numbers: torch.Tensor) -> np.ndarray:
        split = TensorSplit({**inputs, "numeric": numbers}, None)
        return _answers(task, task.predictions(model_outputs(model, split, batch_size)[0]))

    # One noise draw scaled by each sigma (common random numbers): the curve then shows the effect
    # of the noise size rather than of different draws.
    noise = torch.randn(inputs["numeric"].shape, generator=torch.Generator().manual_seed(seed))
    metric, worse, moved = _names(kind)
    clean = predict(inputs["numeric"])
    clean_score = score_of(clean)
    results = []
    for sigma in sigmas:
        answers = predict(inputs["numeric"] + float(sigma) * noise)
        score = score_of(answers)
        results.append(
            {
                "sigma": float(sigma),
                metric: score,
                worse: None if score is None else _worsening(kind, clean_score, score),
                moved: _change(kind, answers, clean),
            }
        )
    return {
        "kind": kind,
        "metric": metric,
        "labelled": truth is not None,
        "examples": len(rows),
        "seed": seed,
        "note": None if truth is not None else _unlabelled_note(task, metric),
        "noisy_features": numeric,
        "clean": {metric: clean_score},
        "results": results,
    }


# --- plot and card section ------------------------------------------------------------------------


def plot_robustness(report: dict[str, Any], path: Path) -> Path:
    """Bars per perturbation and rate (text) or a line over sigma (tabular); clean value dashed.

    Without labels there is no metric to plot: the share of changed answers is plotted instead.
    """
    metric = report["metric"]
    clean = report["clean"][metric]
    if clean is None:
        metric = _names(report["kind"])[2]
    results = report["results"]
    if results and "sigma" in results[0]:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([r["sigma"] for r in results], [r[metric] for r in results], marker="o", label="with noise")
        axis.set_xlabel("noise (training standard deviations)")
    else:
        perturbations = list(dict.fromkeys(r["perturbation"] for r in results))
        rates = list(dict.fromkeys(r["rate"] for r in results))
        figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(perturbations) + 2), 3.8))
        width = 0.8 / max(1, len(rates))
        positions = np.arange(len(perturbations))
        for offset, rate in enumerate(rates):
            values = {r["perturbation"]: r[metric] for r in results if r["rate"] == rate}
            heights = [values.get(name, np.nan) for name in perturbations]
            axis.bar(positions + offset * width, heights, width, label=f"{rate:g} of words")
        axis.set_xticks(positions + width * (len(rates) - 1) / 2, perturbations, rotation=20)
    if clean is not None:
        axis.axhline(clean, color="black", linestyle="--", linewidth=1, label=f"clean ({clean:.3f})")
    axis.set_ylabel(metric.replace("_", " "))
    if metric in ("accuracy", "flip_rate"):
        axis.set_ylim(0, 1.05)
    axis.set_title("Robustness to input noise")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def robustness_section(
    report_text: dict[str, Any] | None,
    attack: dict[str, Any] | None,
    report_tabular: dict[str, Any] | None,
    plot_path_relative: str | None,
) -> dict[str, Any]:
    """The model card's "Robustness" section from whichever reports were made."""
    paragraphs, facts, tables = [], [], []
    for report, what in ((report_text, "text"), (report_tabular, "tabular")):
        if report is None:
            continue
        metric = report["metric"]
        _, worse, moved = _names(report["kind"])
        labelled = report["clean"][metric] is not None
        # Without labels only the answers' changes were measured: the metric columns would be all "undefined".
        measured = [metric, worse, moved] if labelled else [moved]
        note = f" {report['note'][:1].upper()}{report['note'][1:]}." if report.get("note") else ""
        if labelled:
            facts.append([f"clean {metric} ({what}, {report['examples']:,} rows)", _fmt(report["clean"][metric])])
        else:
            facts.append([f"rows perturbed ({what})", f"{report['examples']:,}"])
        if what == "text":
            paragraphs.append(
                "Natural noise was applied to a share of the words of each text (typos, dropped or inserted "
                f"letters, case, punctuation); a robust model keeps its {metric} and its answers." + note
            )
            header = ["perturbation", "share of words", *(name.replace("_", " ") for name in measured)]
            rows = [[r["perturbation"], r["rate"], *(_fmt(r[name]) for name in measured)] for r in report["results"]]
            caption = "Text perturbations."
        else:
            paragraphs.append(
                "Gaussian noise of the given number of training standard deviations was added to every numeric "
                f"feature ({', '.join(report['noisy_features'])})." + note
            )
            header = ["noise (stds)", *(name.replace("_", " ") for name in measured)]
            rows = [[r["sigma"], *(_fmt(r[name]) for name in measured)] for r in report["results"]]
            caption = "Gaussian noise on numeric features."
        tables.append({"header": header, "rows": rows, "caption": caption})
    if attack is not None:
        paragraphs.append(
            "A greedy word-substitution attack (TextFooler-style) replaced the most important words by their "
            "nearest neighbours in the model's own embeddings, changing at most "
            f"{attack['budget']:.0%} of the words, on the rows the model got right. Neighbours in the embedding "
            "space are not always synonyms, so the success rate overstates what a meaning-preserving attacker gets."
        )
        facts += [
            ["attack: examples attacked", attack["examples_attacked"]],
            ["attack: success rate", _fmt(attack["success_rate"])],
            ["attack: mean share of words changed (successes)", _fmt(attack["mean_words_changed"])],
            ["attack: mean model queries per example", _fmt(attack["mean_queries"])],
        ]
        if attack["pairs"]:
            tables.append(
                {
                    "header": ["original", "adversarial", "label", "new label"],
                    "rows": [
                        [p["original"], p["adversarial"], p["label"], p["adversarial_label"]] for p in attack["pairs"]
                    ],
                    "caption": "Successful adversarial examples.",
                }
            )
    section: dict[str, Any] = {"title": "Robustness", "paragraphs": paragraphs, "facts": facts, "tables": tables}
    unlabelled = any(r is not None and r["clean"][r["metric"]] is None for r in (report_text, report_tabular))
    caption = (
        "Share of changed answers under each perturbation (no labels, so no metric)."
        if unlabelled
        else "Metric under each perturbation; the dashed line is the clean value."
    )
    section["plots"] = [{"path": plot_path_relative, "caption": caption}] if plot_path_relative else []
    return section


def comparison_table(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A before/after table: the baseline model and this one under the same perturbations of the same rows."""
    metric = before["metric"]
    _, _, moved = _names(before["kind"])
    shown = [metric, moved] if before["clean"][metric] is not None else [moved]
    header = ["probe", *(f"{name.replace('_', ' ')} {when}" for name in shown for when in ("before", "after"))]

    def row(label: str, old: dict[str, Any], new: dict[str, Any]) -> list[Any]:
        # The clean row has no flips (nothing to compare with): a dash, not "undefined".
        return [label, *(_fmt(values[name]) if name in values else "—" for name in shown for values in (old, new))]

    rows = [row("clean", before["clean"], after["clean"])]
    first = before["results"][0]
    key = ("perturbation", "rate") if "rate" in first else ("attack", "epsilon") if "epsilon" in first else ("sigma",)
    matched = {tuple(r[k] for k in key): r for r in after["results"]}

    def label(result: dict[str, Any]) -> str:
        return " at ".join(result.get("epsilon_label", result[k]) if k == "epsilon" else str(result[k]) for k in key)

    for result in before["results"]:
        probe = tuple(result[k] for k in key)
        if probe in matched:
            rows.append(row(label(result), result, matched[probe]))
    return {"header": header, "rows": rows, "caption": "Before (the baseline run) and after (this run), same rows."}
