"""Explanations: which words (or columns) pushed a prediction, and whether those attributions are faithful.

Text: Captum's LayerIntegratedGradients on the encoder's word-embedding layer, from a baseline where every
real token is [PAD] (the [CLS]/[SEP] markers and the attention mask stay as in the input), so a word's score
is its share of the change in the target class's log-odds, log(p / (1 - p)), between "no words" and the
sentence (for regression: in the output). Sub-word pieces are summed into the words the user typed.

Tabular: the same method on the input of the MLP's layer stack, so numbers and one-hot or embedded
categories are attributed in one pass and summed back to the original columns. Permutation importance is
model-agnostic: shuffle one column, see how much the metric drops.
"""

from __future__ import annotations

import html
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients
from datasets import Dataset
from rich.text import Text
from torch import nn

from forgeml.config import LOWER_IS_BETTER
from forgeml.data.io import column, replace_column
from forgeml.errors import ConfigError, DataError
from forgeml.evaluate.outputs import model_outputs
from forgeml.evaluate.plots import plt  # pyplot as imported there, after selecting the file-only backend
from forgeml.evaluate.plots import save_figure as save_png
from forgeml.trust.image_attacks import evaluation_mode

# Rows (interpolation steps x texts) x tokens in one forward+backward pass: bounds memory (~1 GB for MiniLM)
# while keeping matmuls large enough to run near peak on a CPU.
TOKENS_PER_PASS = 4096
TABULAR_ROWS_PER_CALL = 256


@dataclass
class WordAttribution:
    """One word's contribution toward the explained output.

    `segment` is 0 for the first text and 1 for the second of a pair; `start`/`end` are character offsets
    into that text (None when unknown).
    """

    word: str
    score: float
    segment: int = 0
    start: int | None = None
    end: int | None = None


@dataclass
class TextExplanation:
    """The prediction for one input and each word's attribution toward `target`.

    `probability` is the predicted class's probability (None for regression, where `label` is the value).
    Scores are in log-odds of `target` (the output itself for regression); they sum to
    output(input) - output(all-[PAD] baseline) up to `delta`, Captum's convergence delta.
    """

    text: str
    label: str
    probability: float | None
    words: list[WordAttribution]
    delta: float
    target: str
    text_pair: str | None = None
    segments: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the server's /v1/explain and the model card)."""
        payload = asdict(self)
        payload.pop("segments")
        return payload


# ---------------------------------------------------------------------------------------------- text


def explain_texts(
    task: Any,
    model: nn.Module,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    target: str | None = None,
    steps: int = 20,
    batch_size: int = 8,
) -> list[TextExplanation]:
    """Word attributions for each text (or (premise, hypothesis) pair), in the order given.

    `target` names the class to explain; by default each text's predicted class. Regression models explain
    their single output. Texts longer than the task's `max_length` are explained as the model sees them:
    truncated.
    """
    _require_positive(steps=steps, batch_size=batch_size)
    inputs = [_as_segments(item, len(task.text_columns), index) for index, item in enumerate(texts)]
    target_index = _target_index(task, target)
    # Similar lengths in one call waste less compute on padding.
    order = sorted(range(len(inputs)), key=lambda i: sum(len(s) for s in inputs[i]))
    explanations: list[TextExplanation | None] = [None] * len(inputs)
    with evaluation_mode(model):  # no dropout: attributions must be deterministic
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for index, explanation in zip(
                chunk, _explain_batch(task, model, [inputs[i] for i in chunk], target_index, steps), strict=True
            ):
                explanations[index] = explanation
    return explanations  # type: ignore[return-value]


def _explain_batch(
    task: Any, model: nn.Module, inputs: list[tuple[str, ...]], target_index: int | None, steps: int
) -> list[TextExplanation]:
    device = _device(model)
    encoded = task.tokenizer(
        *[list(parts) for parts in zip(*inputs, strict=True)],
        truncation=True,
        max_length=task.model_options["max_length"],
        padding=True,
        return_tensors="pt",
        return_special_tokens_mask=True,
        return_offsets_mapping=True,
    )
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    # The task gives token types to pair models only; explain exactly the inputs `predict` would give.
    token_type_ids = (
        encoded["token_type_ids"].to(device) if len(inputs[0]) == 2 and "token_type_ids" in encoded else None
    )
    classification = task.target.kind == "classification"
    with torch.no_grad():
        outputs = model(input_ids, attention_mask, token_type_ids).float()
    targets = _targets(outputs, target_index, classification)
    baseline_ids = torch.where(encoded["special_tokens_mask"].to(device).bool(), input_ids, _pad_id(task.tokenizer))
    layer = LayerIntegratedGradients(_text_forward(model, classification), model.encoder.get_input_embeddings())
    attributions, deltas = layer.attribute(
        inputs=input_ids,
        baselines=baseline_ids,
        additional_forward_args=(attention_mask, token_type_ids),
        target=targets,
        n_steps=steps,
        internal_batch_size=_internal_batch_size(len(inputs), input_ids.shape[1], steps),
        return_convergence_delta=True,
    )
    token_scores = attributions.sum(dim=-1).detach().float().cpu().numpy()
    answers = _answers(task, outputs, targets, classification)
    return [
        TextExplanation(
            text=parts[0],
            text_pair=parts[1] if len(parts) == 2 else None,
            label=answers[row][0],
            probability=answers[row][1],
            target=answers[row][2],
            words=_merge_words(encoded, row, token_scores[row], parts),
            delta=float(deltas[row]),
            segments=list(parts),
        )
        for row, parts in enumerate(inputs)
    ]


def _text_forward(model: nn.Module, classification: bool) -> Callable[..., torch.Tensor]:
    """What the attributions explain: per-class log-odds, or the regression output."""

    def forward(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        outputs = model(input_ids, attention_mask, token_type_ids).float()
        return log_odds(outputs) if classification else outputs

    return forward


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for every class, computed stably from the logits.

    Explained instead of p itself: a confident model's probability is flat along most of the integration
    path (the [PAD] baseline is often already confidently one class), so probability attributions come
    out near zero and Captum's 20-step estimate misses by up to 40 % of their sum on the tiny test model;
    log-odds are not bounded, so every word's evidence shows and the delta stays ~3 %.
    """
    if logits.shape[-1] == 1:
        return logits
    others = logits.unsqueeze(-2).expand(*logits.shape, logits.shape[-1])  # [..., class, other class]
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits - torch.logsumexp(others.masked_fill(eye, float("-inf")), dim=-1)


def _merge_words(encoded: Any, row: int, token_scores: np.ndarray, segments: tuple[str, ...]) -> list[WordAttribution]:
    """Sum the pieces of each word ("play", "##ing") and drop special tokens, using the fast tokenizer's
    word and sequence ids so that words come back exactly as the user wrote them."""
    words: dict[tuple[int, int], list] = {}  # (segment, word id) -> [score, start, end]
    offsets = encoded["offset_mapping"][row].tolist()
    for position, (segment, word_id) in enumerate(zip(encoded.sequence_ids(row), encoded.word_ids(row), strict=True)):
        if segment is None or word_id is None:  # [CLS], [SEP], padding
            continue
        start, end = offsets[position]
        if (segment, word_id) not in words:
            words[(segment, word_id)] = [0.0, start, end]
        entry = words[(segment, word_id)]
        entry[0] += float(token_scores[position])
        entry[1], entry[2] = min(entry[1], start), max(entry[2], end)
    return [
        WordAttribution(segments[segment][start:end], score, segment, start, end)
        for (segment, _), (score, start, end) in words.items()
    ]


def _answers(
    task: Any, outputs: torch.Tensor, targets: torch.Tensor, classification: bool
) -> list[tuple[str, float | None, str]]:
    """(predicted label, its probability, name of the explained output) per row, from the raw outputs."""
    values = outputs.detach().float().cpu().numpy()
    if classification:
        classes = task.target.classes
        probabilities = task.predictions(values)["probabilities"]
        predicted = probabilities.argmax(axis=1)
        return [
            (classes[p], float(probabilities[row, p]), classes[int(targets[row])]) for row, p in enumerate(predicted)
        ]
    restored = task.predictions(values)["value"]  # back in the target's own units
    return [(f"{value:.4g}", None, task.target.column) for value in restored]


# ---------------------------------------------------------------------------------------------- faithfulness


def faithfulness(
    task: Any,
    model: nn.Module,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    k: int = 2,
    seed: int = 0,
    steps: int = 20,
) -> dict[str, Any]:
    """Deletion test: removing the k words most attributed toward the predicted class should lower that
    class's probability more than removing k random words. A positive `gap` (top-k drop minus random drop)
    means the explanations point at words the model really uses. For regression the same test runs on the
    predicted value (in the target's units): removing the words that raised it most should lower it most.

    Texts with no positively attributed word, or no more than k words, are skipped (counted in `skipped`).
    """
    _require_positive(k=k)
    classification = task.target.kind == "classification"
    rng = random.Random(seed)
    kept, top_removed, random_removed = [], [], []
    for explanation in explain_texts(task, model, texts, steps=steps):
        top = sorted((w for w in explanation.words if w.score > 0), key=lambda w: -w.score)[:k]
        if not top or len(explanation.words) <= k:
            continue
        kept.append(explanation)
        top_removed.append(_without(explanation, top))
        random_removed.append(_without(explanation, rng.sample(explanation.words, len(top))))
    classes = [task.target.classes.index(e.label) for e in kept] if classification else [0] * len(kept)
    original = _explained_scores(task, model, [tuple(e.segments) for e in kept], classes)
    top_drops = original - _explained_scores(task, model, top_removed, classes)
    random_drops = original - _explained_scores(task, model, random_removed, classes)
    return {
        "k": k,
        "steps": steps,
        "seed": seed,
        "measure": "probability" if classification else "value",
        "texts": len(kept),
        "skipped": len(texts) - len(kept),
        "top_k_drop": _mean(top_drops),
        "random_drop": _mean(random_drops),
        "gap": _mean(top_drops - random_drops),
        "top_k_wins": int((top_drops > random_drops).sum()),  # texts where top-k removal hurt more
    }


def _without(explanation: TextExplanation, removed: list[WordAttribution]) -> tuple[str, ...]:
    """The input with the given words cut out of their text (right to left, so offsets stay valid)."""
    segments = list(explanation.segments)
    for word in sorted(removed, key=lambda w: (w.segment, w.start or 0), reverse=True):
        text = segments[word.segment]
        segments[word.segment] = text[: word.start] + text[word.end :]
    return tuple(segments)


def _explained_scores(task: Any, model: nn.Module, inputs: list[tuple[str, ...]], classes: list[int]) -> np.ndarray:
    """Per input, the given class's probability (or the predicted value), through the task's own encoding."""
    if not inputs:
        return np.zeros(0)
    dataset = Dataset.from_dict({name: [parts[i] for parts in inputs] for i, name in enumerate(task.text_columns)})
    outputs, _ = model_outputs(model, task.encode(dataset, "input", with_targets=False), device=_device(model))
    answers = task.predictions(outputs)
    if "probabilities" in answers:
        return answers["probabilities"][np.arange(len(inputs)), classes]
    return np.asarray(answers["value"], dtype=np.float64)


# ---------------------------------------------------------------------------------------------- tabular


def explain_tabular(
    task: Any, model: nn.Module, dataset: Dataset, target: str | None = None, steps: int = 32
) -> list[dict[str, float]]:
    """Per row, each feature column's attribution toward `target` (default: the predicted class; the value
    for regression), relative to a baseline row at the training means with every category unknown."""
    _require_positive(steps=steps)
    inputs = task.preprocessor.transform(dataset, "input")
    target_index = _target_index(task, target)
    classification = task.target.kind == "classification"
    device = _device(model)
    rows: list[dict[str, float]] = []
    with evaluation_mode(model):
        for start in range(0, len(dataset), TABULAR_ROWS_PER_CALL):
            numeric = inputs["numeric"][start : start + TABULAR_ROWS_PER_CALL].to(device)
            categorical = inputs["categorical"][start : start + TABULAR_ROWS_PER_CALL].to(device)
            rows += _explain_rows(task, model, numeric, categorical, target_index, classification, steps)
    return rows


def _explain_rows(
    task: Any,
    model: nn.Module,
    numeric: torch.Tensor,
    categorical: torch.Tensor,
    target_index: int | None,
    classification: bool,
    steps: int,
) -> list[dict[str, float]]:
    def forward(numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        outputs = model(numeric, categorical).float()
        return log_odds(outputs) if classification else outputs

    with torch.no_grad():
        targets = _targets(forward(numeric, categorical), target_index, classification)
    # The input of the layer stack is [numbers, one-hot or embedding per category]: one attribution pass
    # covers both categorical encodings; baseline ids 0 are the "missing/unseen" category.
    layer = LayerIntegratedGradients(forward, model.layers)
    attributions = layer.attribute(
        inputs=(numeric, categorical),
        baselines=(torch.zeros_like(numeric), torch.zeros_like(categorical)),
        target=targets,
        n_steps=steps,
        attribute_to_layer_input=True,
    )
    if isinstance(attributions, tuple | list):
        attributions = attributions[0]
    per_feature = _sum_slices(attributions.detach().float().cpu(), _input_widths(task, model))
    names = task.preprocessor.columns
    order = [name for name in task.features if name in names] or names
    return [{name: float(values[names.index(name)]) for name in order} for values in per_feature.numpy()]


def _input_widths(task: Any, model: nn.Module) -> list[int]:
    """How many positions of the layer input each feature column occupies (numeric columns first)."""
    widths = [1] * len(task.preprocessor.numeric)
    for embedding, cardinality in zip(
        model.embeddings or [None] * len(model.cardinalities), model.cardinalities, strict=True
    ):
        widths.append(embedding.embedding_dim if embedding is not None else cardinality)
    return widths


def _sum_slices(values: torch.Tensor, widths: list[int]) -> torch.Tensor:
    return torch.stack([part.sum(dim=1) for part in torch.split(values, widths, dim=1)], dim=1)


def permutation_importance(
    task: Any, model: nn.Module, dataset: Dataset, metric: str | None = None, repeats: int = 5, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """For each input column: how much `metric` (default: the task's primary metric) gets worse when that
    column's values are shuffled across rows, as mean and standard deviation over `repeats` shuffles.
    Most important first. `dataset` must be labelled (a validation or test split)."""
    _require_positive(repeats=repeats)
    metric = metric or task.primary_metric
    baseline = _score(task, model, dataset, metric)
    worse = -1.0 if metric in LOWER_IS_BETTER else 1.0  # a drop is always "got worse"
    rng = np.random.default_rng(seed)
    importance: dict[str, dict[str, Any]] = {}
    for name in _input_columns(task):
        values = column(dataset, name)
        drops = [
            worse * (baseline - _score(task, model, replace_column(dataset, name, _shuffled(values, rng)), metric))
            for _ in range(repeats)
        ]
        importance[name] = {"mean": float(np.mean(drops)), "std": float(np.std(drops)), "drops": drops}
    return dict(sorted(importance.items(), key=lambda item: -item[1]["mean"]))


def _score(task: Any, model: nn.Module, dataset: Dataset, metric: str) -> float:
    outputs, targets = model_outputs(model, task.encode(dataset, "data"), device=_device(model))
    metrics = task.metrics(outputs, targets)
    value = metrics.get(metric)
    if not isinstance(value, int | float):
        allowed = ", ".join(k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
        raise ConfigError(f"metric: {metric!r} is not a metric of this task; choose one of {allowed}")
    return float(value)


def _shuffled(values: list, rng: np.random.Generator) -> list:
    return [values[i] for i in rng.permutation(len(values))]


def _input_columns(task: Any) -> list[str]:
    return list(getattr(task, "features", None) or task.text_columns)


def plot_importance(importance: dict[str, dict[str, Any]], path: Path) -> Path:
    """Horizontal bars of mean importance with standard-deviation error bars, most important on top."""
    names = list(importance)[::-1]  # barh draws bottom-up
    means = [importance[n]["mean"] for n in names]
    errors = [importance[n].get("std", 0.0) for n in names]
    figure, axis = plt.subplots(figsize=(6, max(2.5, 0.35 * len(names) + 1.2)))
    axis.barh(names, means, xerr=errors, color="C0", capsize=3)
    axis.axvline(0, color="grey", linewidth=0.8)
    axis.set_xlabel("drop in metric when shuffled")
    axis.set_title("Permutation importance")
    return save_png(figure, Path(path))


# ---------------------------------------------------------------------------------------------- rendering

POSITIVE_RGB = (22, 163, 74)  # green: pushes toward the target
NEGATIVE_RGB = (220, 38, 38)  # red: pushes away from it


def explanation_html(explanations: Sequence[TextExplanation]) -> str:
    """A self-contained HTML fragment: every word on a green (toward the target) or red (against) background
    whose strength is |score| relative to the text's largest; hovering shows the score."""
    return "\n".join(_explanation_block(e) for e in explanations)


def _explanation_block(explanation: TextExplanation) -> str:
    scale = max((abs(w.score) for w in explanation.words), default=0.0) or 1.0
    segments = explanation.segments or [explanation.text, *([explanation.text_pair] if explanation.text_pair else [])]
    lines = []
    for segment, text in enumerate(segments):
        words = [w for w in explanation.words if w.segment == segment]
        lines.append(
            f'<p class="forgeml-text" style="line-height:1.9;margin:0.2em 0">{_words_html(text, words, scale)}</p>'
        )
    return (
        '<div class="forgeml-explanation" style="margin:0.8em 0">'
        f'<div style="font-size:0.9em;color:#555">{_header(explanation)}</div>{"".join(lines)}</div>'
    )


def _header(explanation: TextExplanation) -> str:
    probability = "" if explanation.probability is None else f" ({explanation.probability:.1%})"
    return (
        f"predicted <strong>{html.escape(explanation.label)}</strong>{html.escape(probability)}; "
        f"attributions toward <strong>{html.escape(explanation.target)}</strong>"
    )


def _words_html(text: str, words: list[WordAttribution], scale: float) -> str:
    """The text with each word in a coloured span; what lies between words (spaces, anything truncated)
    is kept as written when offsets are known, else words are joined by spaces."""
    parts, cursor = [], 0
    for word in words:
        if word.start is not None and word.end is not None and word.start >= cursor:
            parts.append(html.escape(text[cursor : word.start]))
            cursor = word.end
        elif parts:
            parts.append(" ")
        red, green, blue = POSITIVE_RGB if word.score >= 0 else NEGATIVE_RGB
        alpha = min(1.0, abs(word.score) / scale) * 0.8  # never fully opaque: the word must stay legible
        parts.append(
            f'<span style="background:rgba({red},{green},{blue},{alpha:.2f});padding:0 2px;border-radius:3px" '
            f'title="{word.score:+.4f}">{html.escape(word.word)}</span>'
        )
    if cursor and cursor < len(text):
        parts.append(html.escape(text[cursor:]))
    return "".join(parts)


def explanation_terminal(explanation: TextExplanation) -> Text:
    """The explanation as coloured terminal text (for `forgeml explain`): bold green/red for strong pushes
    toward/against the target, plain green/red for weaker ones, default colour for near-zero."""
    scale = max((abs(w.score) for w in explanation.words), default=0.0) or 1.0
    probability = "" if explanation.probability is None else f" ({explanation.probability:.1%})"
    line = Text()
    line.append(f"{explanation.label}{probability}", style="bold")
    line.append(f"  toward {explanation.target}: ", style="dim")
    for index, word in enumerate(explanation.words):
        if index and word.segment != explanation.words[index - 1].segment:
            line.append(" | ", style="dim")
        elif index:
            line.append(" ")
        line.append(word.word, style=_terminal_style(word.score / scale))
    return line


def _terminal_style(relative: float) -> str:
    colour = "green" if relative >= 0 else "red"
    strength = abs(relative)
    if strength >= 0.5:
        return f"bold {colour}"
    return colour if strength >= 0.15 else ""


# ---------------------------------------------------------------------------------------------- helpers


def _as_segments(item: Any, columns: int, index: int) -> tuple[str, ...]:
    parts = (item,) if isinstance(item, str) else tuple(item)
    if len(parts) != columns or not all(isinstance(p, str) for p in parts):
        expected = "a string" if columns == 1 else f"a tuple of {columns} strings"
        raise DataError(f"input {index}: expected {expected} for this task, got {item!r}")
    return parts


def _target_index(task: Any, target: str | None) -> int | None:
    """The class to explain as an index (None: each input's predicted class, or the regression output)."""
    if target is None or task.target.kind != "classification":
        return None
    classes = task.target.classes
    if str(target) not in classes:
        raise ConfigError(f"target: {target!r} is not a class of this model; choose one of {', '.join(classes)}")
    return classes.index(str(target))


def _targets(outputs: torch.Tensor, target_index: int | None, classification: bool) -> torch.Tensor:
    if not classification:
        return torch.zeros(len(outputs), dtype=torch.long, device=outputs.device)
    if target_index is None:
        return outputs.argmax(dim=-1)
    return torch.full((len(outputs),), target_index, dtype=torch.long, device=outputs.device)


def _internal_batch_size(texts: int, width: int, steps: int) -> int:
    """Rows per forward pass: all steps at once when they fit the token budget (Captum needs >= texts)."""
    return max(texts, min(texts * steps, TOKENS_PER_PASS // max(1, width)))


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be a positive whole number, got {value!r}")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0
