"""MLflow tracking: a run with `tracking.mlflow` is copied into MLflow (params, metric history,
artefacts, tags), a run without it sends nothing anywhere, and an unreachable server only warns."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import forgeml
from forgeml.errors import ConfigError
from forgeml.tracking import log_run
from forgeml.workspace import RunDir

from conftest import write_csv
from test_train import tabular_config, tabular_rows

mlflow = pytest.importorskip("mlflow")

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def small_config(folder: Path) -> dict[str, Any]:
    config = tabular_config(write_csv(folder / "t.csv", tabular_rows(200)), "tabular-classification", "label")
    config["train"]["epochs"] = 3
    return config


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tracked run, shared by the read-back tests: its result, the MLflow client, experiment and runs."""
    folder = tmp_path_factory.mktemp("tracked")
    uri = "file:" + str(folder / "mlruns")
    config = small_config(folder)
    config["tracking"] = {"mlflow": uri}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # a file: URI in the config is the opt-in
        result = forgeml.run(config, workspace=folder / "ws")
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(config["name"])
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        yield {"result": result, "client": client, "experiment": experiment, "runs": runs}


def test_run_lands_in_experiment_named_after_run(tracked: dict[str, Any]) -> None:
    assert tracked["experiment"] is not None
    assert len(tracked["runs"]) == 1
    run = tracked["runs"][0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["forgeml.run_id"] == tracked["result"].run_dir.name == tracked["result"].run_id
    assert run.data.tags["forgeml.task"] == "tabular-classification"
    assert run.data.tags["forgeml.version"] == forgeml.__version__
    assert run.data.tags["mlflow.runName"] == tracked["result"].run_dir.name


def test_params_metrics_and_history(tracked: dict[str, Any]) -> None:
    run, client, result = tracked["runs"][0], tracked["client"], tracked["result"]
    params = run.data.params
    assert float(params["train.lr"]) == 1e-2
    assert params["model.backbone"] == "mlp"
    assert json.loads(params["data.features"]) == ["x1", "x2", "colour"]
    assert "data.validation" not in params  # None is left out

    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert run.data.metrics["validation.f1"] == pytest.approx(metrics["validation"]["f1"])
    assert run.data.metrics["training.samples_per_second"] == pytest.approx(metrics["training"]["samples_per_second"])
    assert run.data.metrics["test.per_class.high.support"] == metrics["test"]["per_class"]["high"]["support"]

    events = [json.loads(line) for line in (result.run_dir / "train.log").read_text().splitlines()]
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    eval_steps = [e["step"] for e in events if e["event"] == "eval"]
    losses = client.get_metric_history(run.info.run_id, "train.loss")
    assert len(losses) > 1 and sorted(m.step for m in losses) == train_steps
    primary = metrics["primary_metric"]
    evaluations = client.get_metric_history(run.info.run_id, f"eval.{primary}")
    assert sorted(m.step for m in evaluations) == eval_steps


def test_artifacts(tracked: dict[str, Any]) -> None:
    client, run_id = tracked["client"], tracked["runs"][0].info.run_id
    root = {info.path: info.is_dir for info in client.list_artifacts(run_id)}
    for name in ("card.md", "card.html", "config.yaml", "metrics.json"):
        assert root.get(name) is False, name
    assert root.get("model") is True and root.get("plots") is True
    model_files = {Path(info.path).name for info in client.list_artifacts(run_id, "model")}
    local_files = {path.name for path in (tracked["result"].run_dir / "model").iterdir()}
    assert model_files == local_files


def test_no_tracking_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative default (./mlruns) would land here
    result = forgeml.run(small_config(tmp_path), workspace=tmp_path / "ws")
    assert result.run_dir.is_dir()
    assert not [path for path in tmp_path.rglob("*") if path.name in ("mlruns", "mlflow.db")]
    assert not os.path.exists("mlruns")


def test_unreachable_server_raises_but_run_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in a second, not after minutes of retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = small_config(tmp_path)
    config["tracking"] = {"mlflow": UNREACHABLE, "experiment": "nowhere"}
    with caplog.at_level(logging.WARNING, logger="forgeml.pipeline"):
        result = forgeml.run(config, workspace=tmp_path / "ws")
    assert any(UNREACHABLE in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    run = RunDir.open(result.run_dir)
    run.verify()  # every artefact is there and matches the manifest
    assert (run.path / "card.md").is_file() and run.metrics.is_file()
    assert forgeml.load(result.run_dir).predict([{"x1": 1.0, "x2": 5.0, "colour": "red"}])

    with pytest.raises(mlflow.exceptions.MlflowException, match=r"127\.0\.0\.1"):
        log_run(result.run_dir, UNREACHABLE, "nowhere")


def test_numbers_only_without_artifacts_and_a_clear_error_without_mlflow(
    tracked: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, uri = tracked["result"].run_dir, "file:" + str(tmp_path / "mlruns")
    run_id = log_run(run_dir, uri, "numbers_only", artifacts=False)  # what an encrypted run sends
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.list_artifacts(run_id) == [] and "train.lr" in client.get_run(run_id).data.params
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an install without forgeml[mlflow] looks like
    with pytest.raises(ConfigError, match=r"MLflow is not installed; pip install 'forgeml\[mlflow\]'"):
        log_run(run_dir, uri)


def test_failure_midway_marks_the_mlflow_run_failed(
    tracked: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = "file:" + str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifacts", refuse)
    with pytest.raises(OSError, match="disk full"):
        log_run(tracked["result"].run_dir, uri, "failing")
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
    assert "train.lr" in run.data.params  # what was logged before the failure stays
