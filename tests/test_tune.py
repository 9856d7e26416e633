"""Hyper-parameter search: Optuna studies in the workspace database whose trials are ordinary runs, pruned by
the training loop's validations, shared by worker processes (SQLite and PostgreSQL), surviving a killed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

import forgeml
from forgeml.errors import ConfigError
from forgeml.store import Store, database_url
from forgeml.tuning import BEST_CONFIG, STUDIES, storage
from forgeml.workspace import LINEAGE, read_json

from conftest import write_csv
from test_train import tabular_config, tabular_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def tune_config(path: Path, **tune) -> dict:
    config = tabular_config(path, "tabular-classification", "label")
    config["name"] = "tabular_tune"
    config["train"].update(epochs=6, threads=1)
    config["tune"] = {
        "metric": "roc_auc",
        "space": {
            "train.lr": {"type": "float", "low": 1.0e-5, "high": 3.0e-2, "log": True},
            "model.hidden_sizes": {"type": "choice", "values": [[16], [64, 32]]},
        },
        "trials": 8,
        "startup_trials": 2,
        **tune,
    }
    return config


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("tune") / "rows.csv", tabular_rows(400))


def test_search_spaces_are_checked_before_any_trial(table: Path, tmp_path: Path) -> None:
    bad = [
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, {}, "tune.space.train.lr: a float range needs"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, {}, "log-scale range needs low > 0"),
        ({"train.epochs": {"type": "choice", "values": []}}, {}, "a choice needs a non-empty list"),
        ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, {"sampler": "grid"}, "needs finite values"),
        ({"model.dropout": {"type": "choice", "values": [0.1]}}, {"sampler": "cmaes"}, "CMA-ES searches ranges"),
        ({"data.split.seed": {"type": "int", "low": 1, "high": 3}}, {}, "tune.space.data.split.seed: data is not"),
    ]
    for space, extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            forgeml.tune(tune_config(table, space=space, **extra), workspace=tmp_path)
    unknown = tune_config(table, space={"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    with pytest.raises(ConfigError, match=r"tune.space.train.lrr = 0.0001: .*unknown key 'train.lrr'"):
        forgeml.tune(unknown, workspace=tmp_path)
    wrong_type = tune_config(table, space={"train.batch_size": {"type": "float", "low": 0.5, "high": 8.5}})
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.batch_size"):
        forgeml.tune(wrong_type, workspace=tmp_path)
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_a_study_prunes_lagging_trials_and_every_trial_is_a_run(table: Path, tmp_path: Path) -> None:
    # Random search keeps drawing learning rates too small to learn in six epochs: the pruner stops those.
    config = tune_config(table, sampler="random")
    config["tune"]["space"]["train.lr"]["low"] = 1.0e-6
    summary = forgeml.tune(config, workspace=tmp_path)
    assert summary["trials"] == 8 and summary["states"].get("complete", 0) >= 3
    assert summary["states"].get("pruned", 0) >= 1, summary["rows"]
    first = next(row for row in summary["rows"] if row["number"] == 0)
    assert first["params"]["train.lr"] == pytest.approx(1e-2)  # the search starts from the config's own values
    best = summary["best"]
    assert best["value"] > 0.9 and best["value"] == max(r["value"] for r in summary["rows"] if r["value"])
    runs = {record["id"]: record for record in Store(database_url(tmp_path)).runs("tabular_tune")}
    assert len(runs) == 8 and {row["run_id"] for row in summary["rows"]} == set(runs)
    for row in summary["rows"]:
        record = runs[row["run_id"]]
        assert record["status"] == ("pruned" if row["state"] == "pruned" else "finished"), record
        lineage = read_json(Path(row["run_dir"]) / LINEAGE)
        assert lineage["study"] == "tabular_tune" and lineage["trial"] == row["number"]
        assert lineage["params"]["model.hidden_sizes"] in ([16], [64, 32])
    pruned = [row for row in summary["rows"] if row["state"] == "pruned"]
    assert all(2 <= row["evaluations"] < 6 for row in pruned)  # after prune_after validations, before the end
    # The card, and the best config as a runnable file with the best values and the original's other sections.
    folder = tmp_path / STUDIES / "tabular_tune"
    for name in ("card.md", "card.html", "history.png", "importance.png", "parallel.png", "summary.json"):
        assert (folder / name).is_file(), name
    assert "never read by the search" in (folder / "card.md").read_text()
    best_config = forgeml.load_config(folder / BEST_CONFIG)
    assert best_config.tune is None and best_config.train.lr == pytest.approx(best["params"]["train.lr"])
    assert best_config.model.hidden_sizes == best["params"]["model.hidden_sizes"]
    # More trials join the same study; `show` reports all of them.
    more = forgeml.tune(config, trials=2, workspace=tmp_path)
    assert more["trials"] == 10 and forgeml.study("tabular_tune", tmp_path)["trials"] == 10


def _worker(config: Path, workspace: Path, trials: int, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "forgeml.cli", "tune", str(config), "--trials", str(trials)]
    command += ["--workspace", str(workspace), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _two_workers_share_one_study(table: Path, workspace: Path) -> None:
    """Two `forgeml tune` processes on the study of the store $FORGEML_DB_URL names (else the workspace's)."""
    config = tune_config(table, trials=3, pruner="none")
    config["train"]["epochs"] = 2
    path = workspace / "tune.yaml"
    workspace.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    workers = [_worker(path, workspace, 3, {**os.environ}) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    summary = forgeml.study("tabular_tune", workspace)
    runs = Store(database_url(workspace)).runs("tabular_tune")
    numbers = sorted(row["number"] for row in summary["rows"])
    assert numbers == list(range(6)) and summary["states"] == {"complete": 6}  # none lost, none twice
    assert {row["run_id"] for row in summary["rows"]} == {run["id"] for run in runs}
    params = [json.dumps(row["params"], sort_keys=True) for row in summary["rows"]]
    assert len(set(params)) == 6  # the workers did not replay one sequence


def test_two_workers_share_one_sqlite_study(table: Path, tmp_path: Path) -> None:
    _two_workers_share_one_study(table, tmp_path / "ws")
    from test_cli import forgeml_cli

    shown = forgeml_cli("tune", "show", "tabular_tune", "--workspace", str(tmp_path / "ws"))
    assert shown.returncode == 0 and "6 complete" in shown.stdout and "best: trial" in shown.stdout, shown.stderr
    assert (tmp_path / "ws" / STUDIES / "tabular_tune" / BEST_CONFIG).is_file()
    missing = forgeml_cli("tune", "show", "nope", "--workspace", str(tmp_path / "ws"))
    assert missing.returncode == 2 and "no study named 'nope'" in missing.stderr


def test_two_workers_share_one_postgres_study(
    table: Path, tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEML_DB_URL", postgres_url)  # the workers inherit it
    _two_workers_share_one_study(table, tmp_path / "ws")


def test_a_killed_workers_trial_is_failed_and_the_study_goes_on(table: Path, tmp_path: Path) -> None:
    config = tune_config(table, trials=1, pruner="none", heartbeat_s=1)
    config["train"]["epochs"] = 2000  # long enough to be killed in the middle
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    worker = _worker(path, tmp_path, 1, {**os.environ})
    shared = storage(database_url(tmp_path))
    import optuna

    running = threading.Event()
    for _ in range(1200):  # up to 60 s for the worker to start its trial (polling a state, not timing)
        try:
            trials = optuna.load_study(study_name="tabular_tune", storage=shared).trials
        except KeyError:
            trials = []
        if any(trial.state.name == "RUNNING" and trial.user_attrs.get("run_id") for trial in trials):
            running.set()
            break
        running.wait(0.05)
    assert running.is_set(), worker.stderr.read() if worker.poll() is not None else "no trial started"
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    config["train"]["epochs"] = 2
    path.write_text(yaml.safe_dump(config))
    finisher = _worker(path, tmp_path, 2, {**os.environ})
    _, err = finisher.communicate(timeout=600)
    assert finisher.returncode == 0, err
    summary = forgeml.study("tabular_tune", tmp_path)
    states = [row["state"] for row in sorted(summary["rows"], key=lambda row: row["number"])]
    assert states == ["fail", "complete", "complete"], states


@pytest.mark.parametrize(
    ("sampler", "pruner", "space"),
    [
        ("grid", "none", {"train.lr": {"type": "float", "low": 0.005, "high": 0.015, "step": 0.005}}),
        ("cmaes", "hyperband", {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                                "model.dropout": {"type": "float", "low": 0.0, "high": 0.3}}),
    ],
)  # fmt: skip
def test_grid_and_cmaes_samplers_and_the_hyperband_pruner_run(
    table: Path, tmp_path: Path, sampler: str, pruner: str, space: dict
) -> None:
    config = tune_config(table, sampler=sampler, pruner=pruner, space=space, trials=3, startup_trials=1)
    config["train"]["epochs"] = 3
    summary = forgeml.tune(config, workspace=tmp_path)
    assert summary["trials"] == 3 and summary["best"] is not None
    values = [row["params"]["train.lr"] for row in summary["rows"]]
    if sampler == "grid":  # every point of the grid once
        assert sorted(values) == pytest.approx([0.005, 0.01, 0.015])
    else:
        assert all(1e-3 <= value <= 3e-2 for value in values)
