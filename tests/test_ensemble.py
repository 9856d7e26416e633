"""Ensembles of finished runs: the mean is the members' mean probability, the vote their majority, the stack a
regression fitted on validation; the result is a run that loads, predicts, serves (one encoding for members
that read inputs alike) and reports its members beside itself; runs that do not answer the same question on
the same data are refused, naming the member and the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import forgeml
from forgeml.errors import ConfigError
from forgeml.serve.app import create_app
from forgeml.serve.runtime import ModelRuntime

from conftest import sentiment_rows, write_csv
from serving import serving

TEXTS = ["the film was great", "a dull and boring plot", "the actors were fine", "awful", "wonderful cast"]


@pytest.fixture(scope="module")
def members(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, dict]:
    """Three runs of one recipe that differ in their seed (briefly trained: they disagree now and then)."""
    folder = tmp_path_factory.mktemp("ensemble")
    rows = sentiment_rows(300)
    for row in rows[::7]:  # some wrong labels: members learn them differently
        row["label"] = "negative" if row["label"] == "positive" else "positive"
    config = {
        "name": "member",
        "task": "text-classification",
        "data": {"train": str(write_csv(folder / "reviews.csv", rows)), "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.0, "early_stopping": None},
    }
    runs = [
        forgeml.run({**config, "train": {**config["train"], "seed": seed}}, workspace=folder / "ws").run_dir
        for seed in (1, 2, 3)
    ]
    return runs, folder / "ws", config


def member_probabilities(runs: list[Path], texts: list[str]) -> np.ndarray:
    """members x texts x classes, from each member run loaded on its own."""
    answers = [forgeml.load(run).predict(texts) for run in runs]
    classes = list(answers[0][0]["probabilities"])
    return np.array([[[a["probabilities"][c] for c in classes] for a in member] for member in answers]), classes


def test_the_mean_is_the_members_mean_probability_and_the_run_reports_them(members) -> None:
    runs, workspace, _ = members
    result = forgeml.ensemble(runs, "mean", workspace=workspace)
    probabilities, classes = member_probabilities(runs, TEXTS)
    answers = forgeml.load(result.run_dir).predict(TEXTS)
    fused = np.array([[a["probabilities"][c] for c in classes] for a in answers])
    np.testing.assert_allclose(fused, probabilities.mean(axis=0), atol=1e-5)

    summary = result.metrics["training"]["ensemble"]
    assert summary["method"] == "mean" and summary["input_groups"] == 1  # one tokenizer: one encoding
    assert [member["run"] for member in summary["members"]] == [str(run) for run in runs]
    for member, run in zip(summary["members"], runs, strict=True):  # each member scored on the same test rows
        own = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
        assert member["test"]["accuracy"] == pytest.approx(own, abs=1e-9)
    card = (result.run_dir / "card.html").read_text()
    assert "ensemble (mean)" in card and "member 3" in card
    assert (result.run_dir / "model" / "members" / "2" / "model.safetensors").is_file()


def test_the_vote_is_the_majority_label(members) -> None:
    runs, workspace, _ = members
    result = forgeml.ensemble(runs, "vote", workspace=workspace)
    probabilities, classes = member_probabilities(runs, TEXTS)
    votes = probabilities.argmax(axis=2)  # members x texts
    answers = forgeml.load(result.run_dir).predict(TEXTS)
    for text, answer in enumerate(answers):
        counts = np.bincount(votes[:, text], minlength=len(classes))
        assert counts[classes.index(answer["label"])] == counts.max()
        assert answer["probabilities"][answer["label"]] == pytest.approx(counts.max() / 3, abs=2e-3)


def test_stacking_fits_on_validation_and_reloads_to_the_same_answers(members) -> None:
    runs, workspace, _ = members
    result = forgeml.ensemble(runs, "stack", workspace=workspace, name="stacked")
    assert result.metrics["training"]["ensemble"]["stacker"] == {"inputs": 6, "outputs": 2}
    best_member = max(m["test"]["accuracy"] for m in result.metrics["training"]["ensemble"]["members"])
    assert result.metrics["test"]["accuracy"] >= best_member - 0.05  # a fitted combination, not a broken one
    predictor = forgeml.load(result.run_dir)
    first = [a["probabilities"] for a in predictor.predict(TEXTS)]
    again = [a["probabilities"] for a in forgeml.load(result.run_dir).predict(TEXTS)]
    assert first == again


def test_an_ensemble_is_served_with_the_answers_it_predicts(members) -> None:
    runs, workspace, _ = members
    run = forgeml.ensemble(runs[:2], "mean", workspace=workspace, name="pair").run_dir
    expected = [a["label"] for a in forgeml.load(run).predict(TEXTS)]
    with serving(create_app(ModelRuntime(run), None)) as client:
        status, answer = client.call("POST", "/v1/predict", {"inputs": TEXTS})
        assert status == 200, answer
        status, _ = client.call("POST", "/v1/explain", {"inputs": TEXTS[:1]})
    assert [p["label"] for p in answer["predictions"]] == expected
    assert status == 404  # no single model's words to attribute


def test_runs_that_answer_another_question_are_refused_naming_the_member(members, tmp_path: Path) -> None:
    runs, workspace, config = members
    with pytest.raises(ConfigError, match="at least 2"):
        forgeml.ensemble(runs[:1], workspace=workspace)
    other_split = {**config, "data": {**config["data"], "split": {**config["data"]["split"], "seed": 7}}}
    other = forgeml.run({**other_split, "train": {**config["train"], "epochs": 1}}, workspace=tmp_path).run_dir
    with pytest.raises(ConfigError, match=r"ensemble\.members\[1\] .*: data\.split\.seed differs"):
        forgeml.ensemble([runs[0], other], workspace=workspace)
    relabelled = [{"text": r["text"], "label": "yes" if r["label"] == "positive" else "no"} for r in sentiment_rows(60)]
    labels = {**config, "data": {"train": str(write_csv(tmp_path / "yes_no.csv", relabelled)), "split": {"test": 0.2}}}
    yes_no = forgeml.run({**labels, "train": {**config["train"], "epochs": 1}}, workspace=tmp_path).run_dir
    with pytest.raises(ConfigError, match=r"ensemble\.members\[1\] .*: predicts classes \['no', 'yes'\]"):
        forgeml.ensemble([runs[0], yes_no], workspace=workspace)
    with pytest.raises(ConfigError, match=r"ensemble\.method"):
        forgeml.ensemble(runs, "median", workspace=workspace)


def test_an_ensemble_exports_to_onnx_with_parity(members) -> None:
    from forgeml import api

    runs, workspace, _ = members
    run = forgeml.ensemble(runs[:2], "stack", workspace=workspace, name="exported").run_dir
    report = api.export(run)
    assert report["passed"] and report["checks"]["onnx_fp32"]["max_abs_diff"] <= 1e-4
    assert report["checks"]["onnx_int8"]["label_agreement"] >= 0.9


def test_an_ensemble_run_is_evaluated_and_audited_like_any_run(members, tmp_path: Path) -> None:
    from forgeml import api

    runs, workspace, _ = members
    run = forgeml.ensemble(runs, "mean", workspace=workspace, name="audited").run_dir
    rows = sentiment_rows(40, seed=9)
    metrics = api.evaluate(run, write_csv(tmp_path / "more.csv", rows))
    assert 0.0 <= metrics["accuracy"] <= 1.0 and sum(map(sum, metrics["confusion_matrix"])) == 40
    headline = api.audit(run)
    assert 0.0 <= headline["membership_auc"] <= 1.0  # membership inference on the ensemble's own splits
    assert set(headline["skipped"]) == {"Robustness: word-substitution attack", "Explanations"}  # per member
    assert 0.0 <= headline["robustness_worst_flip_rate"] <= 1.0  # typos and the like go through the ensemble
    card = (run / "card.md").read_text()
    assert "Privacy" in card and "Members" in card
