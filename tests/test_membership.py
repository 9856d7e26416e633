"""Membership inference on models really trained by forgeml.run: an MLP that memorises noisy labels
is caught by the loss-threshold attack, the same recipe under DP-SGD and a regularised one are not,
and the report, plot and verdict are fit for the model card."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import forgeml
from forgeml.config import load_config
from forgeml.data.prepare import prepare
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks.base import TensorSplit
from forgeml.trust.membership import (
    _downsample,
    example_losses,
    membership_inference,
    plot_membership_roc,
    verdict,
)

from conftest import write_csv

NOISE_COLUMNS = [f"noise{i}" for i in range(4)]  # irrelevant inputs make each row easy to single out
FEATURES = ["x1", "x2", "colour", *NOISE_COLUMNS]


def noisy_rows(count: int, seed: int = 0, flipped: float = 0.3) -> list[dict]:
    """Rows like test_train's tabular data, with 30 % of labels flipped: only memorisation fits those."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        x1, x2 = rng.gauss(0, 1), rng.gauss(5, 3)
        colour = rng.choice(["red", "green", "blue"])
        score = 2.0 * x1 - 0.5 * (x2 - 5) + {"red": 1.5, "green": 0.0, "blue": -1.5}[colour]
        label = "high" if score > 0 else "low"
        if rng.random() < flipped:
            label = "low" if label == "high" else "high"
        row = {"x1": round(x1, 4), "x2": round(x2, 4), "colour": colour}
        row.update({name: round(rng.gauss(0, 1), 4) for name in NOISE_COLUMNS})
        row["label"] = label
        row["score"] = round(3.0 * x1 - 2.0 * x2 + 1.0 + rng.gauss(0, 0.5), 4)
        rows.append(row)
    return rows


def config(path: Path, name: str, model: dict, train: dict, task: str = "tabular-classification") -> dict:
    """500 training rows (members) and 500 validation rows (non-members); no test split."""
    return {
        "name": name,
        "task": task,
        "data": {
            "train": str(path),
            "label": "label" if task == "tabular-classification" else "score",
            "features": FEATURES,
            "split": {"validation": 0.5, "test": 0.0},
        },
        "model": {"backbone": "mlp", **model},
        # One thread: tiny matmuls only lose to thread hand-offs, worst of all on a busy machine.
        "train": {"warmup_ratio": 0.0, "early_stopping": None, "threads": 1, **train},
    }


@pytest.fixture(scope="module", autouse=True)
def _restore_threads() -> Any:
    """train.threads sets torch's process-wide thread count; give other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def noisy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("membership") / "noisy.csv", noisy_rows(1000))


def trained(config_dict: dict, workspace: Path) -> tuple[Any, Any, Any, Any]:
    """(task, model, members, non_members) of a finished run, splits re-read from its saved config."""
    result = forgeml.run(config_dict, workspace=workspace)
    predictor = forgeml.load(result.run_dir)
    data = prepare(load_config(result.run_dir / "config.yaml"))
    recorded = json.loads((result.run_dir / "data_profile.json").read_text())["sha256"]
    assert data.hashes["train"] == recorded["train"]  # the very rows the model was trained on
    task = predictor.task
    return task, predictor.model, task.encode(data.train, "train"), task.encode(data.validation, "validation")


@pytest.fixture(scope="module")
def overfitted(noisy_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    # A wide MLP, no dropout or weight decay, ~1,900 steps at a constant lr; evaluating only at the
    # end keeps the final (memorised) weights instead of the best-on-validation ones.
    model = {"hidden_sizes": [256, 256], "dropout": 0.0}
    train = {"epochs": 60, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "scheduler": "constant"}
    train["eval_every"] = 100_000
    return trained(config(noisy_csv, "overfitted", model, train), tmp_path_factory.mktemp("overfitted"))


@pytest.fixture(scope="module")
def private(noisy_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The overfitted recipe, same model and rows, trained with DP-SGD at epsilon 3."""
    model = {"hidden_sizes": [256, 256], "dropout": 0.0}
    train = {"epochs": 60, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "scheduler": "constant"}
    train.update(eval_every=100_000, privacy={"epsilon": 3.0, "delta": 1e-5})
    return trained(config(noisy_csv, "private", model, train), tmp_path_factory.mktemp("private"))


@pytest.fixture(scope="module")
def regularised(noisy_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model = {"hidden_sizes": [8], "dropout": 0.3}
    train = {"epochs": 10, "batch_size": 32, "lr": 1e-2, "weight_decay": 0.1}
    return trained(config(noisy_csv, "regularised", model, train), tmp_path_factory.mktemp("regularised"))


def test_attack_catches_a_model_that_memorises_noisy_labels(overfitted: tuple) -> None:
    report = membership_inference(*overfitted)
    low, high = report["auc_ci95"]
    assert report["auc"] >= 0.65, report["auc"]  # measured 0.78 [0.75, 0.82]
    assert low > 0.6 and low <= report["auc"] <= high
    assert report["members"]["count"] == report["non_members"]["count"] == 500
    assert report["members"]["mean_loss"] < 0.05 < report["non_members"]["mean_loss"]
    assert report["advantage"] >= 0.3
    assert 0.0 <= report["tpr_at_1pct_fpr"] <= report["tpr_at_10pct_fpr"] <= 1.0
    assert "memorises its training rows" in verdict(report)


def test_dp_sgd_removes_what_the_overfitted_recipe_leaks(private: tuple) -> None:
    report = membership_inference(*private)
    low, high = report["auc_ci95"]
    assert abs(report["auc"] - 0.5) <= 0.05, report["auc"]  # measured 0.52 [0.48, 0.55] at epsilon 3
    assert low <= 0.5 <= high
    assert report["advantage"] < 0.15


def test_regularised_model_leaks_nothing_measurable(regularised: tuple) -> None:
    report = membership_inference(*regularised)
    low, high = report["auc_ci95"]
    assert abs(report["auc"] - 0.5) <= 0.1, report["auc"]  # measured 0.51 [0.47, 0.55]
    assert low <= 0.52 and high >= 0.48
    assert report["advantage"] < 0.2
    assert "no measurable leakage" in verdict(report)


def test_same_rows_on_both_sides_give_auc_one_half(regularised: tuple) -> None:
    task, model, members, _ = regularised
    report = membership_inference(task, model, members, members, bootstrap=0)
    assert report["auc"] == pytest.approx(0.5) and report["advantage"] == 0.0
    assert report["auc_ci95"] is None
    assert verdict(report).startswith("AUC 0.50: no measurable leakage")


def test_report_is_json_plot_is_written_and_sampling_is_seeded(overfitted: tuple, tmp_path: Path) -> None:
    report = membership_inference(*overfitted, max_examples=120, bootstrap=50, seed=3)
    assert report["members"]["count"] == report["non_members"]["count"] == 120
    text = json.dumps(report, allow_nan=False)  # plain floats and lists, no NaN
    assert json.loads(text) == report
    assert report == membership_inference(*overfitted, max_examples=120, bootstrap=50, seed=3)
    roc = report["roc"]
    assert 2 <= len(roc["fpr"]) == len(roc["tpr"]) <= 200
    assert (roc["fpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 1.0, 1.0)
    assert all(math.isfinite(v) for v in roc["fpr"] + roc["tpr"])

    path = plot_membership_roc(report, tmp_path / "trust" / "membership_roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1024
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left behind


def test_example_losses_are_the_task_loss_row_by_row(overfitted: tuple) -> None:
    task, model, _, non_members = overfitted
    losses = example_losses(task, model, non_members, batch_size=7)  # batching must not reorder rows
    outputs, targets = model_outputs(model, non_members)
    expected = float(task.loss(torch.from_numpy(outputs), torch.from_numpy(targets)))
    assert losses.shape == (len(non_members),) and (losses >= 0).all()
    assert losses.mean() == pytest.approx(expected, rel=1e-5)


def test_regression_losses_are_squared_standardised_errors(noisy_csv: Path, tmp_path: Path) -> None:
    model = {"hidden_sizes": [16], "dropout": 0.0}
    train = {"epochs": 5, "batch_size": 32, "lr": 1e-2}
    task, model, members, non_members = trained(
        config(noisy_csv, "regression", model, train, task="tabular-regression"), tmp_path
    )
    losses = example_losses(task, model, members)
    assert losses.shape == (len(members),) and losses.dtype == np.float64 and (losses >= 0).all()
    outputs, targets = model_outputs(model, members)
    expected = float(task.loss(torch.from_numpy(outputs), torch.from_numpy(targets)))
    assert losses.mean() == pytest.approx(expected, rel=1e-5)
    report = membership_inference(task, model, members, non_members, bootstrap=20)
    assert 0.0 <= report["auc"] <= 1.0 and json.dumps(report, allow_nan=False)


def test_bad_arguments_name_the_parameter(regularised: tuple) -> None:
    task, model, members, non_members = regularised
    with pytest.raises(ValueError, match="max_examples"):
        membership_inference(task, model, members, non_members, max_examples=0)
    with pytest.raises(ValueError, match="bootstrap"):
        membership_inference(task, model, members, non_members, bootstrap=-1)
    unlabelled = TensorSplit(members.inputs, None)
    with pytest.raises(ValueError, match="labelled"):
        example_losses(task, model, unlabelled)


def test_curve_downsampling_keeps_the_ends_and_the_low_fpr_region() -> None:
    fpr = np.concatenate([[0.0], np.sort(np.random.default_rng(0).random(5000)), [1.0]])
    tpr = np.sqrt(fpr)
    kept = _downsample(fpr, tpr, 200)
    assert len(kept) <= 200 and kept[0] == 0 and kept[-1] == len(fpr) - 1
    assert (np.diff(kept) > 0).all()
    assert (fpr[kept] < 0.01).sum() >= 20  # the log-scale panel has points to draw
