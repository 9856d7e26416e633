"""Robustness probes on tiny trained models: text perturbations, the word-substitution attack,
Gaussian noise on tabular features, the plot and the card section."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import Dataset

import forgeml
from forgeml.trust.robustness import (
    TEXT_PERTURBATIONS,
    plot_robustness,
    robustness_section,
    tabular_robustness,
    text_robustness,
    word_substitution_attack,
)

from conftest import sentiment_rows, write_csv
from test_train import tabular_config, tabular_rows

SENTENCE = "The film was great, and the acting superb! A lovely story about friendship."


@pytest.fixture(scope="module")
def reviews() -> Dataset:
    return Dataset.from_list(sentiment_rows(120, seed=21))


@pytest.mark.parametrize("name", sorted(TEXT_PERTURBATIONS))
def test_perturbations_change_text_at_rate_one_only_and_are_deterministic(name: str) -> None:
    perturb = TEXT_PERTURBATIONS[name]
    assert perturb(SENTENCE, 0.0, random.Random(0)) == SENTENCE
    changed = perturb(SENTENCE, 1.0, random.Random(0))
    assert changed != SENTENCE
    assert perturb(SENTENCE, 1.0, random.Random(0)) == changed
    assert perturb(SENTENCE, 0.5, random.Random(3)) == perturb(SENTENCE, 0.5, random.Random(3))


def test_character_edits_skip_short_words() -> None:
    for name in ("char_swap", "char_drop", "char_insert", "keyboard_typo"):
        assert TEXT_PERTURBATIONS[name]("a is to", 1.0, random.Random(0)) == "a is to", name


def test_typos_flip_predictions_and_case_does_not(sentiment_model: forgeml.api.Predictor, reviews: Dataset) -> None:
    task, model = sentiment_model.task, sentiment_model.model
    report = text_robustness(task, model, reviews, rates=(0.3,), max_examples=100)
    json.dumps(report, allow_nan=False)
    assert report["examples"] == 100 and report["metric"] == "accuracy"
    clean = report["clean"]["accuracy"]
    assert clean >= 0.9
    results = {r["perturbation"]: r for r in report["results"]}
    assert set(results) == set(TEXT_PERTURBATIONS)
    typos = results["keyboard_typo"]
    assert typos["flip_rate"] > 0
    assert typos["accuracy"] <= clean
    assert typos["accuracy_drop"] == pytest.approx(clean - typos["accuracy"])
    assert results["case_change"]["flip_rate"] == 0  # the tiny tokenizer lowercases
    assert results["case_change"]["texts_changed"] > 0
    again = text_robustness(task, model, reviews, ["keyboard_typo"], rates=(0.3,), max_examples=100)
    assert again["results"][0] == typos  # seeded: the same rows and the same edits


def test_attack_respects_the_budget(sentiment_model: forgeml.api.Predictor, reviews: Dataset) -> None:
    budget = 0.35
    report = word_substitution_attack(
        sentiment_model.task, sentiment_model.model, reviews, max_examples=20, budget=budget
    )
    json.dumps(report, allow_nan=False)
    assert report["examples_attacked"] > 0
    assert 0.0 <= report["success_rate"] <= 1.0
    assert all(0 < share <= budget for share in report["words_changed"])
    assert report["mean_queries"] > 0
    for pair in report["pairs"]:
        assert pair["adversarial_label"] != pair["label"]
        assert len(pair["adversarial"].split()) == len(pair["original"].split())


def test_tabular_noise_lowers_accuracy_and_the_section_and_plot(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(400))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"].update(epochs=15, threads=1)
    result = forgeml.run(config, workspace=tmp_path)
    loaded = forgeml.load(result.run_dir)
    rows = Dataset.from_list(tabular_rows(600, seed=5, missing=0.0))
    report = tabular_robustness(loaded.task, loaded.model, rows, sigmas=(0.1, 0.3, 0.5, 1.0))
    json.dumps(report, allow_nan=False)
    accuracies = [report["clean"]["accuracy"], *(r["accuracy"] for r in report["results"])]
    assert accuracies == sorted(accuracies, reverse=True)
    assert report["results"][2]["accuracy"] < report["clean"]["accuracy"]  # sigma 0.5
    assert report["results"][2]["flip_rate"] > 0

    plot = plot_robustness(report, tmp_path / "trust" / "robustness.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1024
    section = robustness_section(None, None, report, "trust/robustness.png")
    json.dumps(section, allow_nan=False)
    assert section["title"] == "Robustness" and section["plots"][0]["path"] == "trust/robustness.png"
    assert len(section["tables"][0]["rows"]) == 4


def test_text_plot_and_section(sentiment_model: forgeml.api.Predictor, reviews: Dataset, tmp_path: Path) -> None:
    task, model = sentiment_model.task, sentiment_model.model
    report = text_robustness(task, model, reviews, ["char_drop", "punctuation"], rates=(0.1, 0.5), max_examples=40)
    attack = word_substitution_attack(task, model, reviews, max_examples=5, budget=0.5)
    plot = plot_robustness(report, tmp_path / "robustness.png")
    assert plot.stat().st_size > 1024
    section = robustness_section(report, attack, None, "trust/robustness.png")
    json.dumps(section, allow_nan=False)
    assert len(section["tables"][0]["rows"]) == 4
    assert any(label.startswith("attack:") for label, _ in section["facts"])
    for table in section["tables"]:
        assert all(isinstance(cell, str | int | float) for row in table["rows"] for cell in row)


def test_bad_arguments_name_the_parameter(sentiment_model: forgeml.api.Predictor, reviews: Dataset) -> None:
    task, model = sentiment_model.task, sentiment_model.model
    with pytest.raises(ValueError, match="perturbations"):
        text_robustness(task, model, reviews, ["typo"])
    with pytest.raises(ValueError, match="rates"):
        text_robustness(task, model, reviews, rates=(1.5,))
    with pytest.raises(ValueError, match="budget"):
        word_substitution_attack(task, model, reviews, budget=0)
