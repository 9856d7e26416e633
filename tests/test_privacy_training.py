"""DP-SGD (train.privacy): the budget is respected and reported, the model still learns, text
models train with frozen embeddings, a resumed DP run equals an uninterrupted one, and the
settings DP-SGD cannot honour are refused by name."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import forgeml
from forgeml.config import DifferentialPrivacyConfig
from forgeml.errors import ConfigError
from forgeml.models.mlp import TabularMLP
from forgeml.train.privacy import plan_privacy, poisson_batches

from conftest import write_csv
from test_train import tabular_config, tabular_rows


@pytest.fixture(scope="module")
def rows_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("dp") / "rows.csv", tabular_rows(1200, missing=0.0))


def private_config(path: Path, epsilon: float = 3.0, **train) -> dict:
    config = tabular_config(path, "tabular-classification", "label", hidden_sizes=[32], dropout=0.0)
    config["name"] = "private"
    config["train"].update(
        epochs=8, batch_size=64, lr=2e-2, threads=1, privacy={"epsilon": epsilon, "delta": 1e-5}, **train
    )
    config["train"].update(checkpoint_every=50, keep_checkpoints=20)  # keeps a mid-epoch checkpoint to resume from
    return config


@pytest.fixture(scope="module")
def private_run(rows_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> forgeml.RunResult:
    return forgeml.run(private_config(rows_csv), workspace=tmp_path_factory.mktemp("private"))


def test_private_run_spends_at_most_its_budget_and_still_learns(private_run: forgeml.RunResult) -> None:
    privacy = private_run.metrics["training"]["privacy"]
    assert 2.5 < privacy["epsilon"] <= 3.0 + 1e-6  # every planned step ran, so nearly all of it is spent
    assert privacy["steps"] == privacy["planned_steps"] == 8 * 14  # 840 training rows, batch 64
    assert privacy["noise_multiplier"] > 0.5 and privacy["sample_rate"] == pytest.approx(64 / 840)
    assert private_run.metrics["test"]["accuracy"] >= 0.8  # clean labels: learnable under noise
    log = [json.loads(line) for line in (private_run.run_dir / "train.log").read_text().splitlines()]
    spent = [event["epsilon"] for event in log if event["event"] == "eval"]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(privacy["epsilon"])


def test_card_states_the_guarantee_and_what_it_leaves_out(private_run: forgeml.RunResult) -> None:
    card = (private_run.run_dir / "card.md").read_text()
    epsilon = private_run.metrics["training"]["privacy"]["epsilon"]
    assert f"ε = {epsilon:.2f} (budget 3)" in card
    assert "Noise multiplier" in card and "Poisson" in card
    assert "category vocabularies" in card  # the preprocessing statistics are not covered


def test_noise_is_added(rows_csv: Path, tmp_path: Path) -> None:
    # With a tiny budget the noise swamps the signal: the model is far worse than at epsilon 3.
    noisy = forgeml.run(private_config(rows_csv, epsilon=0.05), workspace=tmp_path)
    assert noisy.metrics["training"]["privacy"]["noise_multiplier"] > 10
    assert noisy.metrics["test"]["log_loss"] > 0.5


def test_resumed_private_run_equals_an_uninterrupted_one(private_run: forgeml.RunResult, tmp_path: Path) -> None:
    # As if the run had crashed just after its mid-epoch checkpoint at step 50: drop what came later.
    run_dir = shutil.copytree(private_run.run_dir, tmp_path / private_run.run_id)
    for path in (run_dir / "checkpoints").glob("step-*"):
        if path.name != "step-00000050":
            shutil.rmtree(path)
    (run_dir / "metrics.json").unlink()
    resumed = forgeml.resume(run_dir, workspace=tmp_path)
    assert resumed.metrics["test"] == private_run.metrics["test"]
    assert resumed.metrics["training"]["privacy"] == private_run.metrics["training"]["privacy"]


def test_text_model_trains_privately_with_frozen_embeddings(text_config: dict, tmp_path: Path) -> None:
    text_config["train"].update(epochs=1, batch_size=16, lr=1e-3, privacy={"epsilon": 8.0})
    result = forgeml.run(text_config, workspace=tmp_path)
    privacy = result.metrics["training"]["privacy"]
    assert privacy["frozen_parameters"] > 0 and privacy["trainable_parameters"] > 0
    assert privacy["epsilon"] <= 8.0 + 1e-6
    weights = forgeml.load(result.run_dir).model.state_dict()
    from forgeml.models.hf import TextModel

    fresh = TextModel.from_pretrained(text_config["model"]["backbone"], num_outputs=2).state_dict()
    embedding = next(name for name in weights if "word_embeddings" in name)
    assert torch.equal(weights[embedding], fresh[embedding])  # frozen: exactly the pre-trained table
    assert "embedding parameters" in (result.run_dir / "card.md").read_text()


def test_poisson_batches_are_seeded_and_sized_by_the_rate() -> None:
    batches = poisson_batches(10_000, 0.01, 50, seed=7)
    sizes = np.array([len(batch) for batch in batches])
    assert abs(sizes.mean() - 100) < 5 and sizes.std() > 3  # sizes vary, as Poisson sampling does
    assert all((np.diff(batch) > 0).all() for batch in batches)
    again = poisson_batches(10_000, 0.01, 50, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_plan_solves_the_noise_for_the_budget() -> None:
    model = TabularMLP(3, [4], 2, hidden_sizes=[8], categorical="embedding")
    plan = plan_privacy(DifferentialPrivacyConfig(epsilon=2.0), model, rows=5000, batch_size=100, steps=500)
    assert plan.spent_epsilon(500) == pytest.approx(2.0, abs=0.05)
    assert plan.spent_epsilon(100) < plan.spent_epsilon(500)
    assert plan.frozen_parameters == 4 * 8  # the categorical embedding table
    assert plan.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"grad_accum_steps": 2}, "train.grad_accum_steps"),
        ({"l1": 0.01}, "train.l1"),
        ({"adversarial": {"epsilon": 1.0}}, "train.adversarial"),
        ({"privacy": {"epsilon": -1}}, "train.privacy.epsilon"),
        ({"privacy": {"epsilon": 1, "accountant": "moments"}}, "train.privacy.accountant"),
    ],
)
def test_settings_dp_sgd_cannot_honour_are_refused(rows_csv: Path, train: dict, key: str) -> None:
    config = private_config(rows_csv)
    config["train"].update(train)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        forgeml.load_config(config)


def test_batch_as_large_as_the_data_is_refused(rows_csv: Path, tmp_path: Path) -> None:
    config = private_config(rows_csv)
    config["train"]["batch_size"] = 5000
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        forgeml.run(config, workspace=tmp_path)


def test_missing_opacus_says_how_to_install_it(rows_csv: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"forgeml\[privacy\]"):
        forgeml.run(private_config(rows_csv), workspace=tmp_path)
