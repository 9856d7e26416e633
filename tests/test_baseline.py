"""Simple baselines beside every run (evaluate/baseline.py) and the vocabulary-coverage check on text:
metrics.json, data_profile.json, the card, the terminal table and the warning."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

import forgeml
from forgeml.data.profile import vocabulary_warning
from forgeml.evaluate.baseline import fit_baselines
from forgeml.evaluate.metrics import scalar_metrics
from forgeml.tasks.targets import ClassLabels
from forgeml.tasks.text import TextTask

from conftest import sentiment_rows, write_csv
from test_train import tabular_config, tabular_rows

SCRIPT = Path(sys.executable).with_name("forgeml")


def text_task(backbone: Path, columns: list[str]) -> TextTask:
    options = {"backbone": str(backbone), "max_length": 32, "pooling": "mean", "dropout": 0.1}
    return TextTask("text-classification", columns, ClassLabels("label"), options)


def test_unknown_token_share_counts_unk_among_ordinary_tokens(tiny_backbone: Path) -> None:
    # The tiny vocabulary has no CJK characters: the tokenizer splits them one per token, each [UNK].
    single = text_task(tiny_backbone, ["text"])
    rows = Dataset.from_dict({"text": ["great film", "great 中文", "中"], "label": ["a", "b", "a"]})
    single.fit(rows)
    # great film | great [UNK] [UNK] | [UNK]: 3 unknown of 6 ([CLS] and [SEP] not counted)
    assert single.unknown_token_share(single.encode(rows, "t")) == pytest.approx(3 / 6)
    clean = Dataset.from_dict({"text": ["the film was great"], "label": ["a"]})
    assert single.unknown_token_share(single.encode(clean, "t")) == 0.0

    pair = text_task(tiny_backbone, ["premise", "hypothesis"])
    rows = Dataset.from_dict({"premise": ["great film", "bad"], "hypothesis": ["中", "文 film"], "label": ["a", "b"]})
    pair.fit(rows)
    # great film [SEP] [UNK] | bad [SEP] [UNK] film: 2 unknown of 6
    assert pair.unknown_token_share(pair.encode(rows, "t")) == pytest.approx(2 / 6)


def test_vocabulary_warning_above_five_percent_only() -> None:
    assert vocabulary_warning({"train": 0.049, "test": 0.05, "validation": None}, "minilm") is None
    assert vocabulary_warning({}, "minilm") is None
    warning = vocabulary_warning({"train": 0.02, "test": 0.661}, "minilm")
    assert warning is not None and "66.1 % of the test split's tokens" in warning
    assert "model.backbone" in warning and "'minilm'" in warning and "your own corpus" in warning


def test_text_run_records_baselines_beside_the_model(text_config: dict, tmp_path: Path, caplog) -> None:
    text_config["train"]["epochs"] = 2
    with caplog.at_level(logging.WARNING, logger="forgeml"):
        result = forgeml.run(text_config, workspace=tmp_path)
    baselines = result.metrics["baselines"]
    assert baselines["split"] == "test" and baselines["seconds"] > 0
    majority, tfidf = baselines["models"]["majority"], baselines["models"]["tfidf_logreg"]
    for entry in (majority, tfidf):  # the same metrics as the model's, so the numbers compare
        assert set(entry["metrics"]) == set(scalar_metrics(result.metrics["test"]))
        assert entry["description"] and entry["seconds"] >= 0
    # One sentiment word decides the label: the bag of n-grams gets it, the majority class cannot.
    assert tfidf["metrics"]["accuracy"] >= 0.95 and tfidf["metrics"]["roc_auc"] >= 0.98
    assert majority["metrics"]["roc_auc"] == pytest.approx(0.5)
    profile = json.loads((result.run_dir / "data_profile.json").read_text())
    counts = profile["splits"]["train"]["class_counts"]
    most_frequent = max(counts, key=counts.get)
    test_counts = profile["splits"]["test"]["class_counts"]
    expected = test_counts.get(most_frequent, 0) / profile["splits"]["test"]["rows"]
    assert majority["metrics"]["accuracy"] == pytest.approx(expected)  # classes in the task's order
    assert baselines["train_rows"] == profile["splits"]["train"]["rows"]

    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["baselines"]["models"]["tfidf_logreg"]["metrics"] == tfidf["metrics"]
    record = forgeml.runs(tmp_path)[0]
    assert record["durations"]["baseline_s"] > 0

    card = (result.run_dir / "card.md").read_text()
    assert "Baselines on the test split" in card
    assert "| this model |" in card and "| TF-IDF + logistic regression |" in card and "| majority class |" in card
    assert "the best baseline, TF-IDF + logistic regression" in card
    assert "Baselines on the test split" in (result.run_dir / "card.html").read_text()

    # Every word is in the tiny vocabulary: full coverage, recorded, shown, and no warning.
    assert profile["unknown_token_share"] == {"train": 0.0, "validation": 0.0, "test": 0.0}
    assert "warnings" not in profile
    assert "unknown tokens |" in card and "| 0.0 % |" in card
    assert not [r for r in caplog.records if "unknown" in r.getMessage()]


@pytest.mark.parametrize(
    ("task", "label", "linear", "expected"),
    [
        ("tabular-classification", "label", "logreg", {"accuracy", "f1", "roc_auc", "log_loss"}),
        ("tabular-regression", "score", "ridge", {"mae", "rmse", "mse", "r2"}),
    ],
)
def test_tabular_runs_record_linear_baselines(
    task: str, label: str, linear: str, expected: set[str], tmp_path: Path
) -> None:
    config = tabular_config(write_csv(tmp_path / "t.csv", tabular_rows(500)), task, label)
    config["train"]["epochs"] = 3
    result = forgeml.run(config, workspace=tmp_path)
    models = result.metrics["baselines"]["models"]
    dummy = models["majority" if task.endswith("classification") else "mean"]["metrics"]
    fitted = models[linear]["metrics"]
    assert expected <= set(fitted) and set(fitted) == set(scalar_metrics(result.metrics["test"]))
    if task.endswith("classification"):
        # The label is a linear function of the features (with a few missing values).
        assert fitted["accuracy"] >= 0.88 and fitted["accuracy"] > dummy["accuracy"] + 0.2
    else:
        assert fitted["r2"] >= 0.95 and dummy["r2"] <= 0.05
        assert fitted["rmse"] < dummy["rmse"] / 3
    card = (result.run_dir / "card.md").read_text()
    assert f"| {models[linear]['label']} |" in card


def test_baselines_are_skipped_without_held_out_labels(tiny_backbone: Path) -> None:
    task = text_task(tiny_backbone, ["text"])
    train = Dataset.from_list(sentiment_rows(40))
    task.fit(train)
    assert fit_baselines(task, {"train": train, "validation": None, "test": None}) == {
        "skipped": "no labelled validation or test split to score baselines on"
    }


def test_cli_warns_about_unknown_tokens_and_prints_baselines(tiny_backbone: Path, tmp_path: Path) -> None:
    """A corpus the backbone's vocabulary lacks: the run says so in one sentence, the profile and card show it."""
    rng = random.Random(0)
    rows = [{**row, "text": row["text"] + " " + "".join(rng.sample("中文字好的很", 3))} for row in sentiment_rows(200)]
    write_csv(tmp_path / "reviews.csv", rows)
    config = {
        "name": "unk",
        "task": "text-classification",
        "data": {"train": "reviews.csv", "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"max_steps": 2, "batch_size": 16},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "forgeml.cli"]
    result = subprocess.run(
        [*command, "run", str(tmp_path / "cfg.yaml"), "--workspace", str(tmp_path / "ws"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "tokens are unknown ([UNK])" in output and "model.backbone" in output
    assert "baselines (test)" in result.stdout and "TF-IDF + logistic regression" in result.stdout
    assert "this model" in result.stdout and "majority class" in result.stdout
    run_dir = Path(result.stdout.split("run directory:")[1].split()[0])
    profile = json.loads((run_dir / "data_profile.json").read_text())
    # 3 unknown characters among 5-9 ordinary tokens per row
    assert all(0.25 < share < 0.65 for share in profile["unknown_token_share"].values())
    assert len(profile["warnings"]) == 1
    card = (run_dir / "card.md").read_text()
    assert "unknown tokens |" in card and profile["warnings"][0] in card  # under caveats
