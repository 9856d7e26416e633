"""Drift monitoring: the tests on their own (real statistics on small samples), then a tiny tabular and a
tiny text model checked against windows from their training distribution and shifted ones, served rows
read back from a real SQLite store, and the report folder."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2_contingency

import forgeml
from forgeml.errors import ConfigError, ForgeError
from forgeml.monitor import DriftMonitor, monitor_run, served_rows, since_time, stats, text_embeddings, window_bounds
from forgeml.serve.records import RecordStore

from conftest import FILLER, sentiment_rows, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": 0.5, "green": 0.3, "blue": 0.2}


# --- the statistics alone ---------------------------------------------------------------------------


def test_ks_flags_a_shifted_column_and_not_a_fresh_sample() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(40, 10, 3000)
    same = stats.numeric_drift(reference, rng.normal(40, 10, 300))
    shifted = stats.numeric_drift(reference, rng.normal(43, 10, 300))
    assert same["p_value"] > 0.05 and same["psi"] < 0.1
    assert shifted["p_value"] < 1e-3 and shifted["psi"] > same["psi"]
    # A column that starts arriving empty is drift too: missing values count as the lowest value.
    missing = stats.numeric_drift(reference, np.r_[rng.normal(40, 10, 270), [np.nan] * 30])
    assert missing["missing_share"] == {"reference": 0.0, "window": 0.1} and missing["p_value"] < 0.01


def test_chi2_flags_a_new_category_mix_pools_rare_ones_and_counts_unseen_ones() -> None:
    rng = np.random.default_rng(1)
    reference = stats.category_counts(rng.choice(["a", "b", "c", "d"], 5000, p=[0.5, 0.3, 0.19, 0.01]))
    same = stats.categorical_drift(reference, rng.choice(["a", "b", "c", "d"], 200, p=[0.5, 0.3, 0.19, 0.01]))
    assert same["p_value"] > 0.05
    assert same["bins"] == ["a", "b", "c + (rare)"]  # 'd': 2 rows expected, too few for a bin of its own
    mixed = stats.categorical_drift(reference, rng.choice(["a", "b", "c"], 200, p=[0.2, 0.3, 0.5]))
    assert mixed["p_value"] < 1e-6 and mixed["psi"] > 0.25
    # One new value weighs what chance allows (it lands in a window of 200 out of 5,200 rows with p ~ 0.04):
    # the exact Monte Carlo p-value says so, the chi-squared approximation would call it near certain drift.
    window = list(rng.choice(["a", "b", "c"], 200, p=[0.5, 0.3, 0.2]))
    typo = stats.categorical_drift(reference, [*window[:199], "aa"])
    assert typo["unseen"] == {"aa": 1} and typo["method"].startswith("monte-carlo") and typo["p_value"] > 1e-3
    table = np.array([[reference[v] for v in "abcd"] + [0], [window[:199].count(v) for v in "abcd"] + [1]])
    assert chi2_contingency(table, correction=False).pvalue < 1e-4
    burst = stats.categorical_drift(reference, [*window[:180], *["new"] * 20])
    assert burst["unseen_share"] == 0.1 and burst["p_value"] < 1e-3


def test_a_long_tailed_column_does_not_alarm_on_its_own_new_values() -> None:
    """Windows of an ID-like column bring values training never had; its singletons say how many to expect,
    so windows from the same distribution are flagged at about the nominal rate (here 5 %), not always."""
    rng = np.random.default_rng(2)
    reference = stats.category_counts([f"city-{v}" for v in rng.zipf(1.6, 5000)])
    results = [
        stats.categorical_drift(reference, [f"city-{v}" for v in rng.zipf(1.6, 400)], seed=i) for i in range(100)
    ]
    assert np.mean([r["unseen_share"] for r in results]) > 0.02
    assert np.mean([r["p_value"] <= 0.05 for r in results]) <= 0.10


def test_holm_adjusts_step_down_and_keeps_order() -> None:
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.5])
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm([]) == []


def test_domain_classifier_auc_is_high_for_separable_vectors_and_chance_for_the_same_ones() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 1, (400, 8))
    same = stats.domain_classifier(reference, rng.normal(0, 1, (150, 8)), permutations=49)
    moved = stats.domain_classifier(reference, rng.normal(0.5, 1, (150, 8)), permutations=49)
    assert abs(same["auc"] - 0.5) < 0.1 and same["p_value"] > 0.05
    assert moved["auc"] > 0.8 and moved["p_value"] == pytest.approx(1 / 50)
    assert moved["rows"] == 150 and moved["permutations"] == 49


def test_the_batched_logistic_regression_is_scikit_learns() -> None:
    """The permutation test fits its models itself (all labellings at once); they are LogisticRegression(C=1)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(0, 1, (300, 6)), rng.normal(0.7, 1, (300, 6))])
    labels = np.vstack([np.r_[np.zeros(300), np.ones(300)], rng.permutation(np.r_[np.zeros(300), np.ones(300)])])
    test = rng.normal(0.3, 1, (50, 6))
    ours = stats.logistic_scores(x, labels, test)
    for row, y in enumerate(labels):
        theirs = LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(x, y).decision_function(test)
        assert np.abs(ours[row] - theirs).max() < 1e-4


def test_since_accepts_durations_and_iso_times() -> None:
    now = datetime(2026, 5, 2, 12, 0, tzinfo=UTC)
    assert since_time("24h", now) == now - timedelta(hours=24)
    assert since_time("7d", now) == now - timedelta(days=7)
    assert since_time("2026-05-01T10:00:00+02:00") == datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    assert since_time("2026-05-01") == datetime(2026, 5, 1, tzinfo=UTC)
    with pytest.raises(ConfigError, match="since"):
        since_time("yesterday")


def test_windows_are_cut_back_from_the_newest_row() -> None:
    assert window_bounds(1050, 500) == [(50, 550), (550, 1050)]
    assert window_bounds(120, 500) == [(0, 120)]


# --- a tiny tabular model ---------------------------------------------------------------------------


def table_rows(count: int, seed: int, shift: float = 0.0, colours: dict[str, float] = COLOURS) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        x = rng.gauss(0, 1) + shift
        colour = rng.choices(list(colours), weights=list(colours.values()))[0]
        score = 2.0 * (x - shift) + {"red": 1.0, "green": 0.0, "blue": -1.0}[colour] + rng.gauss(0, 0.5)
        rows.append(
            {"x": round(x, 4), "count": rng.randint(0, 9), "colour": colour, "label": "yes" if score > 0 else "no"}
        )
    return rows


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("monitor-table")
    config = {
        "name": "table",
        "task": "tabular-classification",
        "data": {
            "train": str(write_csv(folder / "train.csv", table_rows(1200, seed=0))),
            "label": "label",
            "features": ["x", "count", "colour"],
            "split": {"validation": 0.25, "test": 0.0},
        },
        "model": {"backbone": "mlp", "hidden_sizes": [16]},
        "train": {"epochs": 8, "batch_size": 64, "lr": 1e-2, "warmup_ratio": 0.0, "early_stopping": None, "threads": 1},
    }
    return forgeml.run(config, workspace=folder).run_dir


@pytest.fixture(scope="module")
def table_monitor(table_run: Path) -> DriftMonitor:
    return DriftMonitor(table_run, reference_rows=800)


def inputs_of(rows: list[dict]) -> list[dict]:
    return [{key: row[key] for key in ("x", "count", "colour")} for row in rows]


def test_no_drift_on_a_window_from_the_training_distribution(table_monitor: DriftMonitor) -> None:
    result = table_monitor.check(inputs_of(table_rows(300, seed=11)))
    assert result["drift"] is False and result["drifted"] == []
    assert result["kind"] == "tabular" and result["correction"] == "holm" and result["tests"] == 4
    assert set(result["features"]) == {"x", "count", "colour"}
    assert result["features"]["x"]["test"] == "ks" and result["features"]["colour"]["test"] == "chi2"
    assert table_monitor.reference.sources["model"]["split"] == "validation"  # carved from train: held out


def test_a_shifted_number_and_a_new_category_mix_are_flagged(table_monitor: DriftMonitor) -> None:
    shifted = table_monitor.check(inputs_of(table_rows(300, seed=12, shift=0.8)))
    assert shifted["drift"] and "feature:x" in shifted["drifted"] and shifted["ranking"][0] == "feature:x"
    assert shifted["features"]["x"]["psi"] > 0.1
    assert "feature:colour" not in shifted["drifted"] and "feature:count" not in shifted["drifted"]
    mixed = table_monitor.check(inputs_of(table_rows(300, seed=13, colours={"red": 0.1, "green": 0.3, "blue": 0.6})))
    assert mixed["drift"] and "feature:colour" in mixed["drifted"] and mixed["ranking"][0] == "feature:colour"


def test_a_class_prior_shift_moves_the_predicted_labels(table_monitor: DriftMonitor) -> None:
    pool = table_rows(3000, seed=14)
    yes = [row for row in pool if row["label"] == "yes"]
    no = [row for row in pool if row["label"] == "no"]
    share = len(yes) / len(pool)
    window = yes[: round(300 * min(1.0, share + 0.35))]
    window += no[: 300 - len(window)]
    result = table_monitor.check(inputs_of(window))
    assert "predictions" in result["drifted"]
    assert result["predictions"]["of"] == "label"
    # The served answers, when given, are what is compared: here every answer says 'no'.
    served = table_monitor.check(inputs_of(pool[:300]), predictions=[{"label": "no"}] * 300)
    assert "predictions" in served["drifted"] and served["predictions"]["shares"]["window"][
        served["predictions"]["bins"].index("no")
    ] == pytest.approx(1.0)
    with pytest.raises(ForgeError, match="one per row"):
        table_monitor.check(inputs_of(pool[:30]), predictions=[{"label": "no"}])


def test_served_rows_come_back_from_the_store_and_monitor_run_writes_the_report(
    table_run: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'forgeml.db'}"
    store = RecordStore(url)
    predictor = forgeml.load(table_run)
    old = inputs_of(table_rows(250, seed=20))
    new = inputs_of(table_rows(200, seed=21, shift=1.0))
    store.add_predictions("table", "v1", [("r1", old, predictor.predict(old))])
    cut = datetime.now(UTC)
    store.add_predictions("table", "v1", [("r2", new[:120], predictor.predict(new[:120]))])
    store.add_predictions("table", "v2", [("r3", new[120:], predictor.predict(new[120:]))])
    store.add_predictions("other", "v1", [("r4", old[:10], predictor.predict(old[:10]))])
    store.close()

    inputs, answers, times = served_rows(url, "table")
    assert inputs == old + new and len(answers) == 450 and times == sorted(times) and times[0].tzinfo is UTC
    assert served_rows(url, "table", since=cut)[0] == new
    assert served_rows(url, "table", version="v2")[0] == new[120:]
    assert served_rows(url, "table", limit=80)[0] == new[120:]  # the newest rows
    assert len(served_rows(url)[0]) == 460

    folder = tmp_path / "report"
    report = monitor_run(table_run, url, model="table", window=200, output_dir=folder)
    assert report["rows"] == 450 and report["rows_left_out"] == 50 and len(report["windows"]) == 2
    assert [w["drift"] for w in report["windows"]] == [False, True]  # 200 of the old rows, then the new ones
    assert report["drift"] and "feature:x" in report["windows"][-1]["drifted"]
    written = json.loads((folder / "report.json").read_text())
    assert written["windows"][-1]["features"]["x"]["p_adjusted"] < 0.05
    assert {path.name for path in folder.glob("*.png")} >= {
        "tests.png",
        "feature-x.png",
        "predictions.png",
        "timeline.png",
    }
    assert all(path.stat().st_size > 1000 for path in folder.glob("*.png"))
    with pytest.raises(ForgeError, match="served predictions"):
        monitor_run(table_run, url, model="nobody", output_dir=folder)


# --- a tiny text model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_monitor(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> DriftMonitor:
    folder = tmp_path_factory.mktemp("monitor-text")
    config = {
        "name": "tiny",
        "task": "text-classification",
        "data": {"train": str(write_csv(folder / "reviews.csv", sentiment_rows(600))), "split": {"validation": 0.3}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None, "threads": 1},
    }
    return DriftMonitor(forgeml.run(config, workspace=folder).run_dir)


def gibberish(count: int, seed: int) -> list[str]:
    """Text from another world: letter-and-digit codes the sentiment model never saw."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [
        " ".join("".join(rng.choices(alphabet, k=rng.randint(2, 5))) for _ in range(rng.randint(8, 14)))
        for _ in range(count)
    ]


def test_embeddings_are_the_vectors_the_head_sees(text_monitor: DriftMonitor) -> None:
    predictor = text_monitor.predictor
    vectors = text_embeddings(predictor, ["the film was great", "a boring plot"])
    assert vectors.shape == (2, 32)
    logits = predictor.torch_model.head(__import__("torch").as_tensor(vectors)).detach().numpy()
    labels = [predictor.task.target.classes[i] for i in logits.argmax(axis=1)]
    assert labels == [answer["label"] for answer in predictor.predict(["the film was great", "a boring plot"])]


def test_in_domain_text_is_not_drift_and_other_text_is(text_monitor: DriftMonitor) -> None:
    same = text_monitor.check([row["text"] for row in sentiment_rows(150, seed=7)])
    assert same["kind"] == "text" and same["drift"] is False
    assert abs(same["text"]["domain"]["auc"] - 0.5) < 0.15 and same["text"]["domain"]["p_value"] > 0.05
    other = text_monitor.check(gibberish(150, seed=8))
    assert other["drift"] and "text:domain" in other["drifted"] and other["text"]["domain"]["auc"] > 0.95
    assert "text:length" in other["drifted"]  # 8-14 words against 3-7
    unseen = other["text"]["unknown_tokens"]["unseen_words"]
    assert unseen["window"] > 0.9 and same["text"]["unknown_tokens"]["unseen_words"]["window"] == 0.0


def test_unknown_tokens_and_a_sentiment_prior_shift_are_flagged(text_monitor: DriftMonitor) -> None:
    rows = sentiment_rows(400, seed=9)
    positive = [row["text"] for row in rows if row["label"] == "positive"][:150]
    shifted = text_monitor.check(positive)
    assert "predictions" in shifted["drifted"]
    rng = random.Random(10)
    unknown = [" ".join([*rng.sample(FILLER, 4), "€€", "great"]) for _ in range(150)]  # '€' is not in the vocabulary
    flagged = text_monitor.check(unknown)
    assert "text:unknown_tokens" in flagged["drifted"]
    assert flagged["text"]["unknown_tokens"]["share"]["window"] == 1.0
    assert flagged["text"]["unknown_tokens"]["rate"]["window"] > 0.05


def test_the_report_of_a_text_window_has_json_and_plots(text_monitor: DriftMonitor, tmp_path: Path) -> None:
    from forgeml.monitor import write_report

    window = text_monitor.describe(gibberish(60, seed=11))
    result = text_monitor.compare(window)
    files = write_report(result, text_monitor.reference, window, tmp_path)
    assert {path.name for path in files} == {"report.json", "tests.png", "lengths.png", "predictions.png"}
    assert json.loads((tmp_path / "report.json").read_text())["text"]["domain"]["auc"] > 0.9
    with pytest.raises(ForgeError, match="at least"):
        text_monitor.compare(window.take(range(5)))
    assert Counter(text_monitor.reference.label_counts).keys() <= {"positive", "negative"}


def test_cli_monitor_on_a_registered_model_exits_1_on_drift(table_run: Path, tmp_path: Path) -> None:
    from forgeml.store import database_url

    from test_cli import forgeml_cli

    workspace = table_run.parent.parent.parent
    forgeml.register("table", table_run, alias="champion", workspace=workspace)
    predictor = forgeml.load(table_run)
    shifted = inputs_of(table_rows(250, seed=31, shift=1.2))
    store = RecordStore(database_url(workspace))
    store.add_predictions("table", table_run.name, [("cli", shifted, predictor.predict(shifted))])
    store.close()
    result = forgeml_cli("monitor", "table", "--window", "200", "-o", str(tmp_path / "out"), "-w", str(workspace))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "DRIFT  feature:x" in result.stdout and (tmp_path / "out" / "report.json").is_file()
    missing = forgeml_cli("monitor", "table", "--since", "yesterday", "-w", str(workspace))
    assert missing.returncode == 2 and "since: 'yesterday'" in missing.stderr


def test_a_server_publishes_drift_gauges_checked_in_the_background(table_run: Path, tmp_path: Path) -> None:
    import time

    from forgeml.config import ServeConfig
    from forgeml.serve.app import create_app
    from forgeml.serve.runtime import ModelRuntime

    from serving import serving

    url = f"sqlite:///{tmp_path / 'forgeml.db'}"
    runtime = ModelRuntime(table_run)
    shifted = inputs_of(table_rows(150, seed=41, shift=1.5))
    store = RecordStore(url)
    store.add_predictions(runtime.name, runtime.version, [("old", shifted, runtime.predict(shifted))])
    settings = ServeConfig(drift_every_s=0.2, drift_window=100)
    with serving(create_app(runtime, None, settings, RecordStore(url))) as client:
        deadline, metrics = time.monotonic() + 120, ""
        while "forgeml_drift_detected{" not in metrics and time.monotonic() < deadline:
            time.sleep(0.2)  # waiting for the background check, not timing anything
            metrics = client.call("GET", "/metrics")[1]
        assert client.call("POST", "/v1/predict", {"inputs": shifted[0]})[0] == 200  # serving meanwhile
    store.close()
    assert f'forgeml_drift_detected{{version="{runtime.version}"}} 1.0' in metrics
    assert f'forgeml_drift_rows{{version="{runtime.version}"}} 100.0' in metrics
    assert 'test="feature:x"' in metrics and 'feature="x"' in metrics  # p-value and PSI of the shifted column
