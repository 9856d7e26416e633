"""The registry, retraining from served corrections and the promotion gate, on tiny real runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import text

import forgeml
from forgeml.errors import DataError, ForgeError
from forgeml.improve.gate import paired_classification, paired_regression
from forgeml.improve.promote import GATE_PLOT, GATE_REPORT, compare, promote
from forgeml.improve.retrain import retrain
from forgeml.registry import Registry
from forgeml.serve.records import RecordStore
from forgeml.store import database_url
from forgeml.workspace import LINEAGE, read_json, resolve_run_path, sha256_file

from conftest import sentiment_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def champion(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny sentiment model registered as tiny@1, tiny@champion, in its own workspace."""
    root = tmp_path_factory.mktemp("loop")
    rows = sentiment_rows(300)
    write_csv(root / "reviews.csv", rows)
    config = {
        "name": "tiny",
        "task": "text-classification",
        "data": {"train": "reviews.csv", "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "threads": 1},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    workspace = root / "ws"
    result = forgeml.run(root / "cfg.yaml", workspace=workspace)
    forgeml.register("tiny", result.run_dir, alias="champion", workspace=workspace)  # the public API
    registry = Registry(database_url(workspace))
    return {"root": root, "workspace": workspace, "run_dir": result.run_dir, "rows": rows, "registry": registry}


def _splits(run_dir: Path) -> dict[str, set[str]]:
    """The texts of each split of a run, as prepared (from its data profile hashes' source: a fresh prepare)."""
    from forgeml.data.io import column
    from forgeml.data.prepare import prepare

    config = forgeml.load(run_dir).config
    splits = prepare(config).splits
    return {name: set(column(split, "text")) for name, split in splits.items() if split is not None}


def _send(workspace: Path, corrections: list[tuple[str, str]], model: str = "tiny", version: str = "x") -> None:
    store = RecordStore(database_url(workspace))
    for text_, label in corrections:
        store.add_feedback(
            request_id=None,
            position=None,
            model=model,
            version=version,
            inputs=text_,
            predicted=None,
            label=label,
            comment="",
            key_id=None,
        )
    store.close()


def test_registry_numbers_versions_and_resolves_references(champion: dict, monkeypatch) -> None:
    registry: Registry = champion["registry"]
    assert registry.aliases("tiny") == {"champion": 1}
    version = registry.resolve("tiny@champion")
    assert version["version"] == 1 and Path(version["run_path"]) == champion["run_dir"]
    assert registry.resolve("tiny@1")["run_id"] == champion["run_dir"].name
    lineage = version["lineage"]
    assert lineage["splits_sha256"]["test"] and lineage["config"]["task"] == "text-classification"
    assert lineage["data_files"]["train"]["path"].endswith("reviews.csv")
    assert lineage["data_files"]["train"]["sha256"] == sha256_file(champion["root"] / "reviews.csv")
    with pytest.raises(ForgeError, match=r"no alias 'canary'.*champion -> 1"):
        registry.resolve("tiny@canary")
    with pytest.raises(ForgeError, match="already tiny@1"):
        registry.register("tiny", champion["run_dir"])
    # Wherever a run directory is accepted, so is a reference (the workspace from $FORGEML_WORKSPACE).
    monkeypatch.setenv("FORGEML_WORKSPACE", str(champion["workspace"]))
    assert resolve_run_path("tiny@champion") == champion["run_dir"]
    texts = ["a great film", "a dull plot"]
    by_path = forgeml.load(champion["run_dir"]).predict(texts)
    assert forgeml.load("tiny@champion").predict(texts) == by_path


def test_promotion_log_is_append_only(champion: dict) -> None:
    registry: Registry = champion["registry"]
    log = registry.log("tiny")
    assert log[0]["alias"] == "champion" and log[0]["version"] == 1 and log[0]["previous_version"] is None
    with registry.engine.begin() as connection, pytest.raises(Exception, match="append-only"):
        connection.execute(text("UPDATE promotion_log SET reason = 'rewritten'"))
    with registry.engine.begin() as connection, pytest.raises(Exception, match="append-only"):
        connection.execute(text("DELETE FROM promotion_log"))
    assert registry.log("tiny") == log


def test_concurrent_registrations_get_distinct_versions(champion: dict, tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    versions: list[int] = []

    def register(run: Path) -> None:
        versions.append(registry.register("race", run)["version"])

    # The same finished run under one name twice is refused, so register copies of it.
    import shutil

    copies = []
    for index in range(4):
        copy = tmp_path / "runs" / f"copy{index}"
        shutil.copytree(champion["run_dir"], copy)
        copies.append(copy)
    threads = [threading.Thread(target=register, args=(copy,)) for copy in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [1, 2, 3, 4]


def test_retrain_merges_corrections_and_keeps_the_test_split(champion: dict) -> None:
    workspace, run_dir = champion["workspace"], champion["run_dir"]
    splits = _splits(run_dir)
    new_rows = [row for row in sentiment_rows(200, seed=7) if row["text"] not in set().union(*splits.values())]
    in_test = sorted(splits["test"])[:5]
    in_train = sorted(splits["train"])[:10]
    corrections = [(row["text"], row["label"]) for row in new_rows[:40]]
    corrections += [(t, "positive") for t in in_test]  # must never be trained on
    corrections += [(t, "negative") for t in in_train] + [(t, "positive") for t in in_train]  # the last one wins
    _send(workspace, corrections)
    _send(workspace, [("not for this model", "positive")], model="other")

    result = retrain("tiny", workspace=workspace, holdout=0.25, weight=2.0)
    lineage = read_json(result.run_dir / LINEAGE)
    assert lineage["parent"] == {"name": "tiny", "version": 1, "run_id": run_dir.name, "alias": "champion"}
    feedback = lineage["feedback"]
    distinct = len({t for t, _ in corrections})
    assert feedback["corrections"] == len(corrections) and feedback["distinct_inputs"] == distinct
    assert feedback["left_out_in_evaluation_splits"] == 5
    assert feedback["trained"] + feedback["held_out"] == distinct - 5
    assert feedback["held_out"] == round((distinct - 5) * 0.25)
    assert feedback["added_training_rows"] == 2 * feedback["trained"]  # weight 2: two copies each
    assert all(entry["feedback_id"] and entry["created_at"] for entry in feedback["used"])
    # The test split is the champion's, row for row; a feedback split holds the held-out corrections.
    champion_profile = read_json(run_dir / "data_profile.json")
    profile = read_json(result.run_dir / "data_profile.json")
    assert profile["sha256"]["test"] == champion_profile["sha256"]["test"]
    assert profile["sha256"]["validation"] == champion_profile["sha256"]["validation"]
    assert profile["sha256"]["train"] != champion_profile["sha256"]["train"]
    assert "feedback" in result.metrics and result.metrics["feedback"]["accuracy"] >= 0.0
    from forgeml.data.io import column
    from forgeml.data.prepare import prepare

    prepared = prepare(forgeml.load(result.run_dir).config)
    train_rows = dict(zip(column(prepared.train, "text"), column(prepared.train, "label"), strict=True))
    assert not set(in_test) & set(train_rows)
    trained_from_train = [t for t in in_train if t in train_rows]
    assert trained_from_train and all(train_rows[t] == "positive" for t in trained_from_train)
    champion["retrained"] = result.run_dir


def test_gate_compares_on_the_fixed_split_and_refuses_a_model_that_is_not_better(champion: dict) -> None:
    workspace = champion["workspace"]
    if "retrained" not in champion:  # run alone (-k): a retrain of its own
        _send(workspace, [("a fine film and a superb cast", "positive"), ("a sad and dull plot", "negative")])
        champion["retrained"] = retrain("tiny", workspace=workspace, holdout=0.5).run_dir
    candidate = champion["retrained"]
    report = compare("tiny@champion", candidate, workspace)
    assert report["split"]["rows"] == 60 and report["metric"] == "accuracy"
    test = report["test"]
    assert sum(test[k] for k in ("both_right", "both_wrong", "only_champion_right", "only_candidate_right")) == 60
    assert report["feedback_holdout"]["split"]["rows"] > 0
    assert (candidate / GATE_REPORT).is_file() and (candidate / GATE_PLOT).is_file()
    assert "Promotion gate" in (candidate / "card.md").read_text()
    forgeml.load(candidate)  # the manifest still verifies after the report was added
    if report["passed"]:  # both tiny models are near-perfect: the test has nothing to go on
        pytest.fail(f"a model that is not better passed the gate: {report['checks']}")
    with pytest.raises(ForgeError, match="the gate refuses"):
        promote("tiny", candidate, "champion", workspace=workspace)
    registry: Registry = champion["registry"]
    assert registry.aliases("tiny")["champion"] == 1
    entry = promote("tiny", candidate, "champion", force=True, reason="test of --force", workspace=workspace)
    assert entry["forced"] and entry["version"] == 2 and entry["previous_version"] == 1
    assert entry["gate"]["passed"] is False and entry["reason"] == "test of --force"
    assert registry.aliases("tiny")["champion"] == 2
    # An unprotected alias moves without the gate (still logged).
    promote("tiny", champion["run_dir"], "challenger", workspace=workspace)
    assert registry.aliases("tiny") == {"champion": 2, "challenger": 1}
    assert [e["alias"] for e in registry.log("tiny")] == ["champion", "champion", "challenger"]
    promote("tiny", "tiny@1", "champion", force=True, reason="roll back", workspace=workspace)
    assert registry.aliases("tiny")["champion"] == 1


def test_retrain_refuses_when_the_test_split_changed(champion: dict, tmp_path: Path) -> None:
    workspace = champion["workspace"]
    data = champion["root"] / "reviews.csv"
    original = data.read_bytes()
    try:
        write_csv(data, [*champion["rows"], *sentiment_rows(20, seed=99)])
        with pytest.raises(DataError, match="test split is not the one"):
            retrain("tiny", workspace=workspace)
    finally:
        data.write_bytes(original)


def test_retrain_without_corrections_is_refused(champion: dict, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    with pytest.raises(ForgeError, match="no corrections since"):
        retrain("tiny", workspace=champion["workspace"], since=datetime.now(UTC) + timedelta(days=1))


def test_mcnemar_exact_and_paired_bootstrap() -> None:
    champion = np.array([True] * 90 + [False] * 10)
    candidate = np.array([True] * 90 + [True] * 10)  # right on the ten rows the champion misses
    result = paired_classification(champion, candidate)
    assert result["only_candidate_right"] == 10 and result["only_champion_right"] == 0
    assert result["p_value"] == pytest.approx(0.5**10)  # one-sided: ten of ten discordant rows for the candidate
    tied = paired_classification(champion, np.array([False] * 5 + [True] * 85 + [True] * 5 + [False] * 5))
    assert tied["p_value"] == pytest.approx(638 / 1024)  # P(at least 5 of 10 heads)
    worse = paired_classification(candidate, champion)
    assert worse["p_value"] == pytest.approx(1.0) and worse["only_champion_right"] == 10
    rng = np.random.default_rng(0)
    errors = rng.normal(0, 1, 400)
    better = paired_regression(errors, errors * 0.8, resamples=2000)
    assert better["p_value"] < 0.01 and better["ci95"][0] > 0
    same = paired_regression(errors, errors[::-1].copy(), resamples=2000)
    assert same["ci95"][0] < 0 < same["ci95"][1]


def test_cli_models_commands(champion: dict) -> None:
    from test_cli import forgeml_cli

    workspace = str(champion["workspace"])
    listed = forgeml_cli("models", "list", "--workspace", workspace)
    assert listed.returncode == 0 and "tiny" in listed.stdout and "champion=" in listed.stdout
    shown = forgeml_cli("models", "show", "tiny", "--json", "--workspace", workspace)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["aliases"]["champion"] >= 1
    missing = forgeml_cli("models", "show", "nope", "--workspace", workspace)
    assert missing.returncode == 2 and "no model named 'nope'" in missing.stderr
    predicted = forgeml_cli("models", "compare", "tiny@1", "tiny@1", "--workspace", workspace)
    assert predicted.returncode == 1 and "REFUSED" in predicted.stdout  # a model is not better than itself


def test_retrain_a_tabular_model_with_corrections_of_another_type(tmp_path: Path) -> None:
    """Corrections arrive as the server stores them (a dict of features, the label as a string); the merged
    training split keeps the file's types (integer labels, float features)."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(300):
        x1, x2 = rng.uniform(-1, 1), rng.uniform(-1, 1)
        rows.append({"x1": round(x1, 3), "x2": round(x2, 3), "colour": rng.choice("rgb"), "label": int(x1 + x2 > 0)})
    write_csv(tmp_path / "points.csv", rows)
    config = {
        "name": "points",
        "task": "tabular-classification",
        "data": {"train": str(tmp_path / "points.csv"), "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": "mlp", "hidden_sizes": [16]},
        "train": {"epochs": 3, "batch_size": 32, "threads": 1},
    }
    workspace = tmp_path / "ws"
    champion = forgeml.run(config, workspace=workspace).run_dir
    forgeml.register("points", champion, alias="champion", workspace=workspace)
    store = RecordStore(database_url(workspace))
    for _ in range(30):
        x1, x2 = rng.uniform(-1, 1), rng.uniform(-1, 1)
        features = {"x1": round(x1, 3), "x2": round(x2, 3), "colour": "g"}
        store.add_feedback(
            request_id=None,
            position=None,
            model="points",
            version=champion.name,
            inputs=features,
            predicted=None,
            label=str(int(x1 + x2 > 0)),
            comment="",
            key_id=None,
        )
    store.close()
    result = forgeml.retrain("points", workspace=workspace)
    lineage = read_json(result.run_dir / LINEAGE)
    assert lineage["feedback"]["trained"] == 30 and lineage["feedback"]["added_training_rows"] == 30
    from forgeml.data.prepare import prepare

    prepared = prepare(forgeml.load(result.run_dir).config)
    assert prepared.train.features["label"].dtype == "int64" and prepared.train.features["x1"].dtype == "float64"
    assert len(prepared.train) == 180 + 30
    report = forgeml.compare("points@champion", result.run_dir, workspace=workspace)
    assert report["split"]["rows"] == 60


def test_paired_bootstrap_of_bits_per_character() -> None:
    from forgeml.improve.gate import paired_generation

    rng = np.random.default_rng(0)
    characters = rng.integers(200, 600, 300).astype(float)
    nll = characters * rng.uniform(1.0, 1.4, 300)  # about 1.2 nats a character
    better = paired_generation(nll, nll * 0.95, characters, resamples=2000)
    assert better["p_value"] < 0.01 and better["ci95"][0] > 0
    low, high = better["intervals95"]["champion"]
    assert low < nll.sum() / characters.sum() / np.log(2) < high
    same = paired_generation(nll, nll.copy(), characters, resamples=500)
    assert same["p_value"] == 1.0  # a model is never better than itself


@pytest.fixture(scope="module")
def language_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tiny character GPTs on the same corpus and test split: 10 steps (barely trained) and 150."""
    from test_language_modeling import corpus, lm_config

    root = tmp_path_factory.mktemp("lm_gate")
    (root / "corpus.txt").write_text(corpus(1200), encoding="utf-8")
    runs = {}
    for name, steps in (("short", 10), ("long", 150)):
        config = lm_config(root / "corpus.txt", max_steps=steps, eval_every=steps)
        config["data"]["split"] = {"validation": 0.1, "test": 0.1}
        runs[name] = forgeml.run(config, workspace=root / "ws").run_dir
    return {"workspace": root / "ws", **runs}


def test_gate_pairs_language_models_by_bits_per_character(language_models: dict) -> None:
    workspace = language_models["workspace"]
    forgeml.register("lm", language_models["short"], alias="champion", workspace=workspace)
    report = compare("lm@champion", language_models["long"], workspace)
    assert report["metric"] == "bits_per_character" and report["passed"], report["checks"]
    assert report["values"]["candidate"] < report["values"]["champion"] and report["gain"] > 0
    assert report["test"]["pieces"] >= 5 and report["test"]["p_value"] < 0.05
    assert "Promotion gate" in (language_models["long"] / "card.md").read_text()
    entry = promote("lm", language_models["long"], "champion", workspace=workspace)
    assert entry["version"] == 2 and entry["gate"]["passed"]
    backwards = compare("lm@champion", language_models["short"], workspace, write=False)
    assert not backwards["passed"] and backwards["test"]["p_value"] > 0.5
    from test_cli import forgeml_cli

    shown = forgeml_cli("models", "compare", "lm@1", "lm@2", "--workspace", str(workspace))
    assert shown.returncode == 0 and "bits_per_character" in shown.stdout and "PASSED" in shown.stdout, shown.stderr
    with pytest.raises(ForgeError, match="the gate refuses"):
        promote("lm", language_models["short"], "champion", workspace=workspace)


def test_retrain_an_instruction_tuned_model_from_generation_feedback(tmp_path: Path) -> None:
    """Served corrections and answers rated up become examples; a correction replaces the training example with
    the same prompt, one of a test prompt is left out, a thumbs-down alone teaches nothing; the test split is
    the champion's and the gate compares the two by bits per character."""
    from forgeml.serve.generations import GenerationStore
    from forgeml.tasks import prepare_data

    from test_instruction_tuning import PROMPT, reviews, save_base, sft_config

    write_csv(tmp_path / "reviews.csv", reviews(200))
    base = save_base(tmp_path / "base")
    evaluation = {"generation": {"max_new_tokens": 2, "max_examples": 5}}
    config = sft_config(tmp_path / "reviews.csv", base, train={"epochs": 2}, evaluate=evaluation)
    workspace = tmp_path / "ws"
    champion = forgeml.run(config, workspace=workspace).run_dir
    forgeml.register("sft", champion, alias="champion", workspace=workspace)
    splits = prepare_data(forgeml.load(champion).config).splits
    trained_prompt, tested_prompt = splits["train"][0]["prompt"], splits["test"][0]["prompt"]
    new_prompt = PROMPT.format(text="film 999 was superb")
    feedback = [  # (prompt, what the model said, rating, correction)
        (trained_prompt, " positive", "down", " corrected"),
        (new_prompt, " negative", None, " positive"),
        (tested_prompt, " positive", None, " negative"),
        (PROMPT.format(text="film 998 was dull"), " negative", "up", None),
        (PROMPT.format(text="film 997 was weak"), " positive", "down", None),
    ]
    store = GenerationStore(database_url(workspace))
    run_id = forgeml.load(champion).run.id
    for index, (prompt, said, rating, correction) in enumerate(feedback):
        store.add(
            id=f"gen-{index}",
            model="tiny_sft",
            version=run_id,
            kind="completion",
            prompt=prompt,
            choices=[{"text": said, "finish_reason": "stop", "completion_tokens": 1}],
            settings={},
            prompt_tokens=4,
            completion_tokens=1,
            first_token_s=0.01,
            seconds=0.01,
            key_id=None,
        )
        store.add_feedback(
            generation_id=f"gen-{index}", choice=0, rating=rating, correction=correction, comment="", key_id=None
        )
    store.close()

    retrained = retrain("sft", workspace=workspace).run_dir
    lineage = read_json(retrained / LINEAGE)
    facts = lineage["feedback"]
    assert facts["corrections"] == 4 and facts["left_out_in_evaluation_splits"] == 1
    assert facts["trained"] == 3 and facts["replaced_training_rows"] == 1
    assert {row["request_id"] for row in facts["used"]} == {"gen-0", "gen-1", "gen-3"}
    assert lineage["parent"]["version"] == 1
    new_splits = prepare_data(forgeml.load(retrained).config).splits
    answers = {row["prompt"]: row["response"] for row in new_splits["train"]}
    assert answers[trained_prompt] == " corrected" and answers[new_prompt] == " positive"
    assert tested_prompt not in answers
    profiles = [read_json(run / "data_profile.json")["sha256"]["test"] for run in (champion, retrained)]
    assert profiles[0] == profiles[1]
    report = compare("sft@champion", retrained, workspace)
    assert report["metric"] == "bits_per_character" and report["split"]["rows"] == len(splits["test"])
    assert report["test"]["pieces"] == len(splits["test"])
