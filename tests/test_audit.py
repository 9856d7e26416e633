"""The `audit:` section end to end: trust/ files, the card's trust sections, fairness thresholds
applied at prediction time, and the `forgeml audit` / `forgeml explain` commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import forgeml

from conftest import sentiment_rows, write_csv
from test_cli import forgeml_cli
from test_train import tabular_config, tabular_rows


@pytest.fixture(scope="module")
def audited(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> forgeml.RunResult:
    root = tmp_path_factory.mktemp("audited")
    rng = random.Random(0)
    rows = sentiment_rows(500, seed=4)
    for row in rows:
        row["group"] = rng.choice(["a", "b"])
        if rng.random() < 0.3:
            row["text"] = "he said " + row["text"]  # identity terms for the swap test
    write_csv(root / "reviews.csv", rows)
    config = {
        "name": "audited",
        "task": "text-classification",
        "data": {"train": str(root / "reviews.csv"), "sensitive": ["group"], "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
        "audit": {"fairness": {"mitigate": "demographic_parity", "bootstrap": 50}, "explain": 4},
    }
    return forgeml.run(config, workspace=root)


def test_every_audit_writes_its_results(audited: forgeml.RunResult) -> None:
    trust = audited.run_dir / "trust"
    for name in (
        "fairness.json",
        "fairness_group.png",
        "fairness_thresholds.json",
        "counterfactual.json",
        "counterfactual.png",
        "membership.json",
        "membership_roc.png",
        "explanations.json",
        "explanations.html",
        "summary.json",
    ):
        assert (trust / name).is_file(), name
    headline = audited.metrics["audit"]
    assert headline["split"] == "test"
    assert 0.0 <= headline["membership_auc"] <= 1.0
    assert headline["counterfactual_flip_rate"]["gender"] is not None
    assert 0.0 <= headline["robustness_worst_flip_rate"] <= 1.0 and 0.0 <= headline["attack_success_rate"] <= 1.0
    mitigation = headline["fairness.mitigation"]
    assert set(mitigation["before"]) == {"accuracy", "demographic_parity_difference", "equalized_odds_difference"}
    report = json.loads((trust / "fairness.json").read_text())["report"]
    assert set(report["columns"]["group"]["groups"]) == {"a", "b"}
    assert (audited.run_dir / "model" / "fairness_thresholds.json").is_file()


def test_card_has_a_section_per_audit(audited: forgeml.RunResult) -> None:
    card = (audited.run_dir / "card.md").read_text()
    for title in (
        "Trust: Fairness",
        "Trust: Identity-term swaps",
        "Trust: Privacy: membership inference",
        "Trust: Explanations",
    ):
        assert f"## {title}" in card
    html = (audited.run_dir / "card.html").read_text()
    assert html.count("data:image/png;base64,") >= 8  # the run's plots plus the audits'
    assert "trust/explanations.html" in card
    assert "- **group:** a, b" in card  # Factors: the groups the evaluation was broken down by
    assert "Audits run: Fairness, Identity-term swaps" in card  # Ethical considerations


def test_thresholds_apply_when_the_group_column_is_given(audited: forgeml.RunResult) -> None:
    model = forgeml.load(audited.run_dir)
    rule = model.thresholds
    assert rule["column"] == "group" and rule["constraint"] == "demographic_parity"
    texts = [row["text"] for row in sentiment_rows(60, seed=11)]
    plain = model.predict(texts)
    with_group = model.predict([{"text": t, "group": "a"} for t in texts])
    assert len(with_group) == len(plain)
    assert [a["probabilities"] for a in with_group] == [a["probabilities"] for a in plain]  # scores unchanged
    a_rule = rule["groups"]["a"]
    threshold = a_rule["operation0"]["threshold"]
    if a_rule["p0"] == 1.0 and isinstance(threshold, float):  # a deterministic rule: check it exactly
        positive = rule["positive_label"]
        expected = [positive if p["probabilities"][positive] > threshold else "negative" for p in plain]
        assert [a["label"] for a in with_group] == expected


def test_audit_command_reruns_and_keeps_the_run_loadable(audited: forgeml.RunResult) -> None:
    result = forgeml_cli("audit", str(audited.run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "membership_auc" in result.stdout
    forgeml.load(audited.run_dir)  # manifest updated for the rewritten trust/ files and thresholds


def test_audit_on_an_external_file_with_its_own_sensitive_column(audited: forgeml.RunResult, tmp_path: Path) -> None:
    rows = [{**row, "segment": "new" if i % 3 else "old"} for i, row in enumerate(sentiment_rows(90, seed=8))]
    people = write_csv(tmp_path / "people.csv", rows)
    result = forgeml_cli("audit", str(audited.run_dir), "--data", str(people), "--sensitive", "segment")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((audited.run_dir / "trust" / "fairness.json").read_text())["report"]
    assert report["rows"] == 90 and set(report["columns"]["segment"]["groups"]) == {"new", "old"}


def test_explain_command_prints_words_and_writes_html(audited: forgeml.RunResult, tmp_path: Path) -> None:
    out = tmp_path / "why.html"
    result = forgeml_cli("explain", str(audited.run_dir), "the film was great", "--html", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "great" in result.stdout and "toward" in result.stdout
    assert out.read_text().count("<span") >= 4


def test_tabular_audit_reports_importance_and_membership(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(400))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"]["epochs"] = 10
    config["data"]["sensitive"] = ["colour"]
    config["audit"] = {"explain": 5, "fairness": {"bootstrap": 20}}
    result = forgeml.run(config, workspace=tmp_path)
    headline = result.metrics["audit"]
    assert headline["top_features"][0] == "x1"  # the label depends most on x1
    assert 0.0 <= headline["robustness_worst_flip_rate"] <= 1.0
    assert "fairness.colour.demographic_parity_difference" in headline
    assert (result.run_dir / "trust" / "feature_importance.png").is_file()


def test_audit_config_errors_name_the_key(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(100))
    config = tabular_config(path, "tabular-classification", "label")
    config["audit"] = {"fairness": {"mitigate": "equal_opportunity"}}
    with pytest.raises(forgeml.ConfigError, match=r"audit\.fairness\.mitigate"):
        forgeml.load_config(config)
    config["audit"] = {"fairness": {"positive_label": "maybe"}, "privacy": False, "explain": 0}
    config["data"]["sensitive"] = ["colour"]
    with pytest.raises(forgeml.ConfigError, match=r"audit\.fairness\.positive_label"):
        forgeml.run(config, workspace=tmp_path)
