"""The `audit:` section end to end: trust/ files, the card's trust sections, fairness thresholds
applied at prediction time, and the `forgeml audit` / `forgeml explain` commands."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from datasets import Dataset

import forgeml
from forgeml.models.hf import TextModel
from forgeml.tasks.targets import ClassLabels
from forgeml.tasks.text import TextTask
from forgeml.trust.audit import identity_swaps

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


@pytest.fixture
def audited_copy(audited: forgeml.RunResult, tmp_path: Path) -> Path:
    """A private copy of the audited run for tests that rewrite trust/: the shared run stays as trained,
    so the read-only tests above and below do not depend on the order the tests run in."""
    return Path(shutil.copytree(audited.run_dir, tmp_path / "runs" / "audited" / audited.run_dir.name))


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
    assert "examples from the validation split: the most confidently right" in card  # says where they come from
    assert "- **group:** a, b" in card  # Factors: the groups the evaluation was broken down by
    assert "Audits run: Fairness, Identity-term swaps" in card  # Ethical considerations
    assert "No fairness, privacy" not in card and "Not run:" not in card and "audits not run" not in card
    summary = json.loads((audited.run_dir / "trust" / "summary.json").read_text())
    assert summary["skipped"] == [] and "skipped" not in audited.metrics["audit"]  # labelled: everything ran


def test_chromium_renders_the_card_with_its_trust_sections(audited: forgeml.RunResult, tmp_path: Path) -> None:
    import re

    import chromium

    if chromium.find_chromium() is None:
        pytest.skip("chromium not installed; `make test` installs it")
    html_path = audited.run_dir / "card.html"
    dom = chromium.dump_dom(html_path)
    for title in ("Trust: Fairness", "Trust: Identity-term swaps", "Trust: Robustness", "Trust: Explanations"):
        assert f">{title}</h2>" in dom, title
    # A copy with a counter script: every image (the run's plots and the audits') must decode.
    probe = tmp_path / "probe.html"
    counter = (
        "<script>window.addEventListener('load', () => { document.title += ' | images=' + "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length + '/' + "
        "document.images.length; });</script>"
    )
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", counter + "</body>"), encoding="utf-8")
    decoded = re.search(r"\| images=(\d+)/(\d+)</title>", chromium.dump_dom(probe))
    assert decoded, "the probe script did not run"
    assert int(decoded.group(1)) == int(decoded.group(2)) >= 8


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


def test_audit_command_reruns_and_keeps_the_run_loadable(audited_copy: Path) -> None:
    result = forgeml_cli("audit", str(audited_copy))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "membership_auc" in result.stdout
    forgeml.load(audited_copy)  # manifest updated for the rewritten trust/ files and thresholds


def test_audit_on_an_external_file_with_its_own_sensitive_column(audited_copy: Path, tmp_path: Path) -> None:
    rows = [{**row, "segment": "new" if i % 3 else "old"} for i, row in enumerate(sentiment_rows(90, seed=8))]
    people = write_csv(tmp_path / "people.csv", rows)
    thresholds = (audited_copy / "model" / "fairness_thresholds.json").read_text()
    result = forgeml_cli("audit", str(audited_copy), "--data", str(people), "--sensitive", "segment")
    assert result.returncode == 0, result.stderr[-2000:]
    fairness = json.loads((audited_copy / "trust" / "fairness.json").read_text())
    report = fairness["report"]
    assert report["rows"] == 90 and set(report["columns"]["segment"]["groups"]) == {"new", "old"}
    assert report["labelled"] is True and fairness["data"] == "people.csv"
    assert (audited_copy / "model" / "fairness_thresholds.json").read_text() == thresholds  # not refitted
    summary = json.loads((audited_copy / "trust" / "summary.json").read_text())
    assert [entry["audit"] for entry in summary["skipped"]] == ["Fairness mitigation"]


def test_audit_on_an_unlabelled_file_reports_selection_rates(audited_copy: Path, tmp_path: Path) -> None:
    rows = [
        {"text": ("he said " if i % 4 == 0 else "") + row["text"], "segment": "new" if i % 3 else "old"}
        for i, row in enumerate(sentiment_rows(90, seed=8))
    ]
    people = write_csv(tmp_path / "people.csv", rows)
    result = forgeml_cli("audit", str(audited_copy), "--data", str(people), "--sensitive", "segment")
    assert result.returncode == 0, result.stderr[-2000:]
    trust = audited_copy / "trust"
    report = json.loads((trust / "fairness.json").read_text())["report"]
    assert report["rows"] == 90 and report["labelled"] is False
    groups = report["columns"]["segment"]["groups"]
    assert set(groups) == {"new", "old"}
    for values in groups.values():
        assert set(values) == {"count", "selection_rate", "mean_probability"}  # no accuracy, TPR or FPR
        assert 0.0 <= values["selection_rate"] <= 1.0 and 0.0 <= values["mean_probability"] <= 1.0
    disparities = report["columns"]["segment"]["disparities"]
    assert set(disparities) == {"demographic_parity_difference", "demographic_parity_ratio"}
    gap = disparities["demographic_parity_difference"]
    assert gap["value"] == pytest.approx(abs(groups["new"]["selection_rate"] - groups["old"]["selection_rate"]))
    assert gap["ci95"] is not None and "equalized_odds_difference" in report["needs_labels"]
    robustness = json.loads((trust / "robustness.json").read_text())
    assert robustness["attack"] is None and robustness["text"]["clean"]["accuracy"] is None
    assert all(0.0 <= r["flip_rate"] <= 1.0 for r in robustness["text"]["results"])
    counterfactual = json.loads((trust / "counterfactual.json").read_text())
    assert counterfactual["texts"] == 90 and counterfactual["dimensions"]["gender"]["variants"] > 0  # the file's
    summary = json.loads((trust / "summary.json").read_text())
    skipped = {entry["audit"] for entry in summary["skipped"]}
    assert {"Fairness: accuracy, TPR, FPR, equalized odds", "Robustness: word-substitution attack"} <= skipped
    assert "Robustness: accuracy under noise" in skipped and "Fairness mitigation" in skipped
    titles = {section["title"] for section in summary["sections"]}
    assert {"Fairness", "Privacy: membership inference", "Explanations", "Robustness"} <= titles  # own splits
    card = (audited_copy / "card.md").read_text()
    assert "Labels were absent: people.csv has no label column 'label'" in card
    assert "## Trust: audits not run" in card and "Robustness: word-substitution attack" in card
    assert "Not run: Fairness mitigation; Fairness: accuracy, TPR, FPR, equalized odds;" in card
    assert "No fairness, privacy" not in card
    assert "membership_auc" in result.stdout and "skipped" in result.stdout


def test_audit_file_errors_name_the_file_and_the_column(audited: forgeml.RunResult, tmp_path: Path) -> None:
    rows = [{"review": row["text"], "segment": "a"} for row in sentiment_rows(10, seed=8)]
    people = write_csv(tmp_path / "people.csv", rows)
    trust = {path.name: path.stat().st_mtime_ns for path in (audited.run_dir / "trust").iterdir()}
    result = forgeml_cli("audit", str(audited.run_dir), "--data", str(people), "--sensitive", "segment")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "people.csv" in result.stderr and "input column 'text'" in result.stderr
    assert "Traceback" not in result.stderr
    texts = write_csv(tmp_path / "texts.csv", [{"text": row["review"]} for row in rows])
    result = forgeml_cli("audit", str(audited.run_dir), "--data", str(texts), "--sensitive", "segment")
    assert result.returncode == 2 and "texts.csv" in result.stderr and "sensitive column 'segment'" in result.stderr
    assert {path.name: path.stat().st_mtime_ns for path in (audited.run_dir / "trust").iterdir()} == trust


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


# --- identity swaps for pairs ---------------------------------------------------------------------

PRONOUN_PAIRS = [
    ("he said the film was great", "he liked it"),
    ("she thought the plot was dull", "she was bored"),
    ("the cast was good", "he was happy"),  # only the hypothesis mentions a term
    ("the movie was long", "it was very long"),
]


def test_identity_swaps_on_an_untrained_three_class_pair_model(tiny_backbone: Path) -> None:
    options = {"backbone": str(tiny_backbone), "max_length": 32, "dropout": 0.1, "pooling": "mean"}
    target = ClassLabels("label", ["contradiction", "entailment", "neutral"])
    task = TextTask("text-pair-classification", ["premise", "hypothesis"], target, options)
    model = TextModel.from_pretrained(str(tiny_backbone), target.num_outputs).eval()
    pairs = Dataset.from_dict({"premise": [p for p, _ in PRONOUN_PAIRS], "hypothesis": [h for _, h in PRONOUN_PAIRS]})
    report = identity_swaps(task, model, pairs)
    assert report["pairs"] is True and report["positive_label"] is None
    assert report["texts_with_terms"] == 3  # a pair counts when either text mentions a term
    gender = report["dimensions"]["gender"]
    assert gender["texts"] == 3 and gender["variants"] > 0 and 0.0 <= gender["flip_rate"] <= 1.0
    assert 0.0 <= gender["mean_abs_shift"] <= gender["max_abs_shift"] <= 1.0
    assert set(report["dimensions"]) >= {"gender", "religion", "age"}  # one row per dimension, even if empty
    assert gender["variants"] == 3  # he -> she, she -> he, and he -> she in the third pair's hypothesis
    for shift in gender["largest_shifts"]:
        (premise, hypothesis), (new_premise, new_hypothesis) = shift["text"], shift["variant"]
        if premise.startswith("the cast"):
            assert new_premise == premise and new_hypothesis == "she was happy"
        else:  # the same substitute in both texts
            assert new_premise.split()[0] == new_hypothesis.split()[0] != hypothesis.split()[0]
    json.dumps(report, allow_nan=False)


def test_pair_runs_get_the_identity_swap_audit(tiny_backbone: Path, tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = []
    for _ in range(120):
        person = rng.choice(["he", "she", "the critic"])
        good = rng.random() < 0.5
        rows.append(
            {
                "premise": f"{person} said the film was {'great' if good else 'awful'}",
                "hypothesis": f"{person} liked it" if rng.random() < 0.5 else f"{person} hated it",
            }
        )
        rows[-1]["label"] = "yes" if good == ("liked" in rows[-1]["hypothesis"]) else "no"
    config = {
        "name": "pairs",
        "task": "text-pair-classification",
        "data": {"train": str(write_csv(tmp_path / "pairs.csv", rows)), "text": "premise", "text_pair": "hypothesis"},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None},
        "audit": {"privacy": False, "robustness": False, "explain": 0},
    }
    result = forgeml.run(config, workspace=tmp_path)
    report = json.loads((result.run_dir / "trust" / "counterfactual.json").read_text())
    assert report["pairs"] is True and report["dimensions"]["gender"]["variants"] > 0
    for shift in report["dimensions"]["gender"]["largest_shifts"]:
        premise, hypothesis = shift["variant"]
        assert premise.split()[0] == hypothesis.split()[0]  # "he ... / he ..." became "she ... / she ..."
    assert result.metrics["audit"]["counterfactual_flip_rate"]["gender"] is not None
    card = (result.run_dir / "card.md").read_text()
    assert "## Trust: Identity-term swaps" in card and "both texts of a pair get the same substitution" in card
