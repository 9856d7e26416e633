"""Explanations on tiny random-initialised models: word attributions find the word that decides the label,
deleting the top words hurts more than deleting random ones, tabular importance finds the one useful column."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

import forgeml
from forgeml.errors import ConfigError
from forgeml.models.hf import TextModel
from forgeml.tasks.targets import ClassLabels, NumericTarget
from forgeml.tasks.text import TextTask
from forgeml.trust.explain import (
    TextExplanation,
    WordAttribution,
    explain_tabular,
    explain_texts,
    explanation_html,
    explanation_terminal,
    faithfulness,
    permutation_importance,
    plot_importance,
)

from conftest import NEGATIVE, POSITIVE, sentiment_rows, write_csv

SENTIMENT = set(POSITIVE + NEGATIVE)


def test_every_word_once_and_the_sentiment_word_decides(sentiment_model: forgeml.api.Predictor) -> None:
    texts = [row["text"] for row in sentiment_rows(20, seed=99)]
    explanations = explain_texts(sentiment_model.task, sentiment_model.model, texts)
    decided_by_sentiment = 0
    for text, explanation in zip(texts, explanations, strict=True):
        assert [w.word for w in explanation.words] == text.split()  # in order, no [CLS]/[SEP], no pieces
        assert explanation.label == explanation.target  # the predicted class by default
        assert 0.5 < explanation.probability <= 1.0
        total = sum(abs(w.score) for w in explanation.words)
        assert abs(explanation.delta) <= 0.1 * total  # observed: at most ~3 % at 20 steps
        decided_by_sentiment += max(explanation.words, key=lambda w: abs(w.score)).word in SENTIMENT
    assert decided_by_sentiment >= 14  # 70 % of 20; observed 19-20
    json.dumps([e.to_dict() for e in explanations])


def test_word_pieces_are_merged_and_a_named_target_flips_the_sign(sentiment_model: forgeml.api.Predictor) -> None:
    task, model = sentiment_model.task, sentiment_model.model
    text = "the cinematography was great!"  # "cinematography" is c ##i ##n ... in the tiny vocabulary
    assert len(task.tokenizer.tokenize("cinematography")) > 1
    predicted = explain_texts(task, model, [text])[0]
    assert [w.word for w in predicted.words] == ["the", "cinematography", "was", "great", "!"]
    assert [(w.start, w.end) for w in predicted.words][1] == (4, 18)
    other = next(c for c in task.target.classes if c != predicted.label)
    flipped = explain_texts(task, model, [text], target=other)[0]
    assert flipped.label == predicted.label and flipped.target == other
    # Two classes: log-odds of one class are minus those of the other, so every score flips sign.
    np.testing.assert_allclose([w.score for w in flipped.words], [-w.score for w in predicted.words], atol=1e-4)
    with pytest.raises(ConfigError, match="not a class"):
        explain_texts(task, model, [text], target="neutral")


def test_batching_does_not_change_the_answers(sentiment_model: forgeml.api.Predictor) -> None:
    texts = [row["text"] for row in sentiment_rows(6, seed=5)]
    task, model = sentiment_model.task, sentiment_model.model
    one_by_one = explain_texts(task, model, texts, batch_size=1)
    together = explain_texts(task, model, texts, batch_size=8)
    for a, b in zip(one_by_one, together, strict=True):
        assert a.label == b.label and a.text == b.text
        np.testing.assert_allclose([w.score for w in a.words], [w.score for w in b.words], atol=1e-3)


def test_deleting_top_words_hurts_more_than_deleting_random_words(sentiment_model: forgeml.api.Predictor) -> None:
    texts = [row["text"] for row in sentiment_rows(30, seed=7)]
    result = faithfulness(sentiment_model.task, sentiment_model.model, texts, k=2, seed=0)
    assert result["measure"] == "probability" and result["texts"] + result["skipped"] == 30
    assert result["texts"] >= 20
    assert result["gap"] > 0  # observed ~0.5
    assert result["top_k_drop"] > result["random_drop"]
    json.dumps(result)


def _untrained_text_task(backbone: Path, columns: list[str], target) -> tuple[TextTask, TextModel]:
    options = {"backbone": str(backbone), "max_length": 32, "dropout": 0.1, "pooling": "mean"}
    task = TextTask("test", columns, target, options)
    return task, TextModel.from_pretrained(str(backbone), target.num_outputs)


def test_pairs_explain_words_of_both_texts(tiny_backbone: Path) -> None:
    task, model = _untrained_text_task(tiny_backbone, ["premise", "hypothesis"], ClassLabels("same", ["no", "yes"]))
    premise, hypothesis = "the film was great", "a boring plot"
    explanation = explain_texts(task, model, [(premise, hypothesis)])[0]
    assert explanation.text == premise and explanation.text_pair == hypothesis
    by_segment = [[w.word for w in explanation.words if w.segment == s] for s in (0, 1)]
    assert by_segment == [premise.split(), hypothesis.split()]
    assert np.isfinite(explanation.delta)
    assert explanation_html([explanation]).count("<p ") == 2


def test_regression_explains_the_value_and_its_faithfulness(tiny_backbone: Path) -> None:
    task, model = _untrained_text_task(tiny_backbone, ["text"], NumericTarget("score", mean=3.0, std=2.0))
    explanation = explain_texts(task, model, ["great film", "awful plot"])[1]
    assert explanation.probability is None and explanation.target == "score"
    float(explanation.label)  # the predicted value, in the target's units
    assert [w.word for w in explanation.words] == ["awful", "plot"]
    total = sum(abs(w.score) for w in explanation.words)
    assert abs(explanation.delta) <= 0.1 * total + 1e-6
    result = faithfulness(task, model, ["great film and plot", "awful plot", "the film was very dull"], k=1)
    assert result["measure"] == "value" and result["texts"] + result["skipped"] == 3
    assert np.isfinite(result["gap"])
    json.dumps(result)


def x1_rows(count: int, seed: int) -> list[dict]:
    """Only x1 decides the label; x2 and colour are noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        x1 = rng.gauss(0, 1)
        rows.append(
            {
                "x1": round(x1, 4),
                "x2": round(rng.gauss(5, 3), 4),
                "colour": rng.choice(["red", "green", "blue"]),
                "label": "high" if x1 > 0 else "low",
            }
        )
    return rows


@pytest.mark.parametrize("categorical", ["onehot", "embedding"])
def test_tabular_importance_and_attributions_find_the_deciding_column(categorical: str, tmp_path: Path) -> None:
    config = {
        "name": "x1",
        "task": "tabular-classification",
        "data": {"train": str(write_csv(tmp_path / "t.csv", x1_rows(400, seed=0))), "label": "label"},
        "model": {"backbone": "mlp", "hidden_sizes": [16], "categorical": categorical},
        "train": {"epochs": 15, "batch_size": 32, "lr": 1e-2, "warmup_ratio": 0.0, "early_stopping": None},
    }
    predictor = forgeml.load(forgeml.run(config, workspace=tmp_path).run_dir)
    task, model = predictor.task, predictor.model
    test = Dataset.from_list(x1_rows(200, seed=1))

    importance = permutation_importance(task, model, test, repeats=3)
    assert next(iter(importance)) == "x1"
    assert importance["x1"]["mean"] > 0.2 > abs(importance["colour"]["mean"])
    json.dumps(importance)

    rows = explain_tabular(task, model, test.select(range(40)))
    assert len(rows) == 40 and all(list(row) == ["x1", "x2", "colour"] for row in rows)
    mean_abs = {name: np.mean([abs(row[name]) for row in rows]) for name in rows[0]}
    assert max(mean_abs, key=mean_abs.get) == "x1"

    plot = plot_importance(importance, tmp_path / "importance.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_escapes_words_and_wraps_each_word_in_one_span() -> None:
    words = [WordAttribution("<script>", 0.8), WordAttribution("alert", -0.4), WordAttribution('"x"&', 0.0)]
    explanation = TextExplanation(
        text='<script> alert "x"&', label="<b>pos</b>", probability=0.9, words=words, delta=0.0, target="<b>pos</b>"
    )
    fragment = explanation_html([explanation])
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment
    assert "<b>" not in fragment and "&quot;x&quot;&amp;" in fragment
    assert fragment.count("<span") == 3
    assert "rgba(22,163,74,0.80)" in fragment and "rgba(220,38,38,0.40)" in fragment  # green +, red -, by |score|
    assert 'title="+0.8000"' in fragment
    terminal = explanation_terminal(explanation)
    assert "<script> alert" in terminal.plain and "90.0%" in terminal.plain
