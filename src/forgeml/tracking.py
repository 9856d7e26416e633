"""Experiment tracking: a finished run directory copied into MLflow (`tracking.mlflow: URI`).

The run directory stays the record of truth; MLflow gets a copy to browse and compare runs in:
the resolved config as params, every number of `metrics.json` and the training curves of
`train.log` as metrics, the model card, config, metrics, plots and model folder as artefacts.

It talks to MLflow only through `MlflowClient(tracking_uri=...)`, never the fluent `mlflow.*` API,
so the process's active run, default tracking URI and environment are left as they were (a
notebook that tracks its own runs keeps doing so). MLflow is optional (`forgeml[mlflow]`) and
imported only here, only when a config asks for tracking.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from forgeml import __version__
from forgeml.errors import ConfigError
from forgeml.workspace import read_json

PARAM_VALUE_LIMIT = 6000  # MLflow 3's param value limit; longer values are truncated, not rejected
KEY_LIMIT = 250  # MLflow's limit on param and metric names
PARAMS_PER_BATCH = 100  # log_batch refuses more params (or tags) per call
METRICS_PER_BATCH = 1000  # ... and more metrics
ARTIFACT_FILES = ("card.md", "card.html", "config.yaml", "metrics.json", "data_profile.json")
ARTIFACT_DIRS = ("plots", "model")
TRAIN_SERIES = ("loss", "lr", "samples_per_s")  # per-step values of train.log's "train" events
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. ]")  # MLflow also allows "/", but it would split a name into folders


def log_run(run_dir: Path, uri: str, experiment: str | None = None, artifacts: bool = True) -> str:
    """Log a finished run directory to the MLflow tracking server at `uri`; return the MLflow run id.

    `experiment` (default: the run's name) is created when missing. Without `artifacts` only params, tags
    and metrics go (an encrypted run's files must not leave it in plaintext). The MLflow run ends FINISHED;
    if logging fails partway it is marked FAILED and the error is raised.
    """
    try:
        import mlflow
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ConfigError("tracking.mlflow: MLflow is not installed; pip install 'forgeml[mlflow]'") from None

    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    metrics = read_json(run_dir / "metrics.json")
    history = _read_events(run_dir / "train.log")
    experiment = experiment or config.get("name") or run_dir.parent.name
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store behind an opt-in; a config naming a file: URI has opted in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
    except MlflowException as error:
        raise ConfigError(f"tracking.mlflow: MLflow cannot use {uri!r}: {error.message}") from error
    experiment_id = _experiment_id(client, experiment, MlflowException)
    tags = {
        "forgeml.run_id": run_dir.name,
        "forgeml.task": str(metrics.get("task") or config.get("task", "")),
        "forgeml.version": __version__,
        "forgeml.run_dir": str(run_dir.resolve()),
        "mlflow.runName": run_dir.name,
        "mlflow.source.name": "forgeml",
    }
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_dir.name).info.run_id
    try:
        params = [Param(key, value) for key, value in _params(config).items()]
        for chunk in _chunks(params, PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk, synchronous=True)
        now = int(time.time() * 1000)
        final_step = _final_step(metrics, history)
        points = [Metric(key, value, now, final_step) for key, value in _numbers(metrics).items()]
        points += [Metric(key, value, now, step) for key, value, step in _series(history)]
        for chunk in _chunks(points, METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
        for name in ARTIFACT_FILES if artifacts else ():
            if (run_dir / name).is_file():  # data_profile.json and the card are absent from some runs
                client.log_artifact(run_id, str(run_dir / name))
        for name in ARTIFACT_DIRS if artifacts else ():
            if (run_dir / name).is_dir():
                client.log_artifacts(run_id, str(run_dir / name), artifact_path=name)
    except BaseException:
        # An unreachable server cannot be told either: the error that stopped the logging is the one to raise.
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _experiment_id(client: Any, name: str, mlflow_error: type[Exception]) -> str:
    """The id of experiment `name`, created when missing (another process may create it first)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except mlflow_error:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":  # MLflow refuses new runs in it, with a less helpful message
        raise ConfigError(
            f"tracking.experiment: MLflow experiment {name!r} is deleted; restore it or choose another name"
        )
    return found.experiment_id


def _params(config: dict[str, Any]) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, lists as JSON, None left out."""
    params = {}
    for key, value in _leaves(config, keep=lambda value: value is not None):
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        params[key] = text[:PARAM_VALUE_LIMIT]
    return params


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """Every numeric leaf of metrics.json (`test.accuracy`, `baselines.models.logreg.metrics.f1`, ...)."""
    # Booleans count (1/0): `training.stopped_early` is worth comparing across runs.
    return {key: float(value) for key, value in _leaves(metrics, keep=_is_number)}


def _series(events: list[dict[str, Any]]) -> Iterator[tuple[str, float, int]]:
    """train.log's curves as (key, value, step): `train.loss`/`lr`/`samples_per_s` and `eval.<metric>`."""
    for event in events:
        step = int(event.get("step", 0))
        if event.get("event") == "train":
            for name in TRAIN_SERIES:
                if _is_number(event.get(name)):
                    yield _key(("train", name)), float(event[name]), step
        elif event.get("event") == "eval":
            for name, value in event.items():
                if name not in ("event", "step", "epoch") and _is_number(value):
                    yield _key(("eval", name)), float(value), step


def _final_step(metrics: dict[str, Any], events: list[dict[str, Any]]) -> int:
    """The step metrics.json's numbers belong to: the last training step."""
    steps = metrics.get("training", {}).get("steps")
    if _is_number(steps):
        return int(steps)
    return max((int(event.get("step", 0)) for event in events), default=0)


def _leaves(tree: dict[str, Any], keep: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of nested dicts that `keep` accepts; empty dicts are leaves."""
    for name, value in tree.items():
        path = (*prefix, str(name))
        if isinstance(value, dict) and value:
            yield from _leaves(value, keep, path)
        elif keep(value):
            yield _key(path), value


def _key(parts: Sequence[str]) -> str:
    """An MLflow-safe name: characters it rejects become "_", and it is cut to its length limit."""
    return ".".join(_BAD_KEY_CHARS.sub("_", part) for part in parts)[:KEY_LIMIT]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _read_events(path: Path) -> list[dict[str, Any]]:
    """train.log's JSON lines (none when the run kept no log)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
