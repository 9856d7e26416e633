"""Federated training: how clients are made from the data, what the config refuses, and (where Flower is
installed: the federated environment, `make setup-federated`) whole federated runs: FedAvg learns, FedProx
holds clients near the global weights, client-level DP reports its epsilon, a killed federation resumes to
the uninterrupted result, and the result is an ordinary run that predicts and exports."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import forgeml
from forgeml.config import load_config
from forgeml.errors import ConfigError, DataError
from forgeml.federated.partition import by_column, dirichlet

from conftest import killed_and_resumed, write_csv
from test_train import tabular_config, tabular_rows

HAS_FLOWER = importlib.util.find_spec("flwr") is not None
needs_flower = pytest.mark.skipif(
    not HAS_FLOWER, reason="Flower not installed: these run in the federated environment (make setup-federated)"
)


def labels(count: int, classes: int, seed: int) -> list[str]:
    return [f"c{v}" for v in np.random.default_rng(seed).integers(0, classes, count)]


def label_share_spread(partition, train: list[str]) -> float:
    """Mean over clients of how far the client's label mix is from the overall mix (total variation)."""
    y = np.asarray(train)
    classes = sorted(set(train))
    overall = np.array([np.mean(y == c) for c in classes])
    spreads = []
    for rows in partition.rows["train"]:
        mix = np.array([np.mean(y[rows] == c) for c in classes])
        spreads.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(spreads))


def test_a_dirichlet_split_gives_every_row_to_one_client_and_small_alpha_is_less_iid() -> None:
    train, validation = labels(3000, 4, 0), labels(600, 4, 1)
    skewed = dirichlet({"train": train, "validation": validation}, clients=8, alpha=0.1, seed=0, min_rows=20)
    even = dirichlet({"train": train, "validation": validation}, clients=8, alpha=100.0, seed=0, min_rows=20)
    for partition in (skewed, even):
        rows = np.concatenate(partition.rows["train"])
        assert sorted(rows.tolist()) == list(range(3000))  # each row once: disjoint and complete
        assert min(partition.sizes("train")) >= 20
        assert sum(partition.sizes("validation")) == 600
    assert label_share_spread(skewed, train) > 0.3 > 0.05 > label_share_spread(even, train)
    # A client's validation rows follow its own label mix: shares correlate with its training shares.
    y_train, y_val = np.asarray(train), np.asarray(validation)
    train_mix = [np.mean(y_train[r] == "c0") for r in skewed.rows["train"]]
    val_mix = [np.mean(y_val[r] == "c0") if len(r) else np.nan for r in skewed.rows["validation"]]
    keep = ~np.isnan(val_mix)
    assert np.corrcoef(np.asarray(train_mix)[keep], np.asarray(val_mix)[keep])[0, 1] > 0.8
    again = dirichlet({"train": train, "validation": validation}, clients=8, alpha=0.1, seed=0, min_rows=20)
    assert all(np.array_equal(a, b) for a, b in zip(again.rows["train"], skewed.rows["train"], strict=True))


def test_a_dirichlet_split_that_cannot_give_each_client_enough_rows_says_what_to_change() -> None:
    with pytest.raises(DataError, match=r"federated\.clients: 10 clients of at least 10 rows need 100"):
        dirichlet({"train": labels(50, 2, 0)}, clients=10, alpha=0.5, seed=0, min_rows=10)
    with pytest.raises(DataError, match=r"federated\.alpha: .*raise alpha"):
        dirichlet({"train": labels(400, 2, 0)}, clients=20, alpha=0.01, seed=0, min_rows=15)


def test_one_client_per_column_value_and_unseen_values_belong_to_nobody() -> None:
    values = {"train": ["a", "b", "a", None, "b"], "test": ["b", "c", "a", None]}
    partition = by_column(values, "site")
    assert partition.names == ["(missing)", "a", "b"]
    assert [r.tolist() for r in partition.rows["train"]] == [[3], [0, 2], [1, 4]]
    assert [r.tolist() for r in partition.rows["test"]] == [[3], [2], [0]]  # "c" is no client's
    with pytest.raises(DataError, match="column 'site' has 1 value"):
        by_column({"train": ["a", "a"]}, "site")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federated.by_column=colour", "federated.clients=3"], "federated.clients: by_column makes one client"),
        (["federated.proximal_mu=0.1"], "federated.proximal_mu: is for strategy fedprox"),
        (["federated.strategy=fedsgd"], "federated.strategy"),
        (["train.privacy.epsilon=3"], "train.privacy: DP-SGD protects rows of one dataset"),
        (["evaluate.cross_validation=3"], "evaluate.cross_validation: not available with federated"),
        (["federated.fraction=0"], "federated.fraction"),
    ],
)
def test_federated_settings_that_cannot_work_are_refused_naming_the_key(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    config = tabular_config(write_csv(tmp_path / "t.csv", tabular_rows(100)), "tabular-classification", "label")
    config["federated"] = {"rounds": 2}
    with pytest.raises(ConfigError, match=message):
        load_config(config, overrides)


def test_a_dirichlet_split_of_a_regression_target_is_refused() -> None:
    config = {"task": "tabular-regression", "data": {"train": "t.csv", "label": "score"}, "federated": {}}
    with pytest.raises(ConfigError, match=r"federated\.by_column: a Dirichlet split shares each class"):
        load_config(config)
    config["federated"] = {"by_column": "colour"}
    assert load_config(config).federated.clients is None  # one client per colour instead


def test_defaults_fill_in_for_the_chosen_split_and_strategy() -> None:
    base = {"task": "tabular-classification", "data": {"train": "t.csv"}}
    federated = load_config({**base, "federated": {"strategy": "fedprox"}}).federated
    assert (federated.clients, federated.alpha, federated.proximal_mu, federated.rounds) == (10, 0.5, 0.01, 20)


@pytest.mark.skipif(HAS_FLOWER, reason="Flower is installed here; this checks the message when it is not")
def test_without_flower_a_federated_run_is_refused_before_any_work(tmp_path: Path) -> None:
    config = tabular_config(write_csv(tmp_path / "t.csv", tabular_rows(100)), "tabular-classification", "label")
    config["federated"] = {"rounds": 2}
    with pytest.raises(ConfigError, match=r"federated: Flower is not installed; pip install 'forgeml\[federated\]'"):
        forgeml.run(config, workspace=tmp_path)
    assert not (tmp_path / "runs").exists()


def federated_config(tmp_path: Path, rows: int = 900, **federated) -> dict:
    config = tabular_config(write_csv(tmp_path / "t.csv", tabular_rows(rows)), "tabular-classification", "label")
    config["name"] = "fed"
    config["train"].update(epochs=1, batch_size=32, lr=1e-2, scheduler="constant")
    config["federated"] = {"clients": 4, "alpha": 1.0, "rounds": 6, **federated}
    return config


@needs_flower
def test_fedavg_over_non_iid_clients_learns_and_the_run_is_an_ordinary_run(tmp_path: Path) -> None:
    result = forgeml.run(federated_config(tmp_path), workspace=tmp_path)
    metrics = result.metrics
    assert metrics["test"]["accuracy"] >= 0.85  # the centralised MLP reaches ~0.9 on these rows
    summary = metrics["training"]["federated"]
    assert summary["clients"] == 4 and summary["rounds"] == 6 and summary["strategy"] == "fedavg"
    profile = json.loads((result.run_dir / "data_profile.json").read_text())
    assert sum(summary["client_train_rows"].values()) == profile["splits"]["train"]["rows"]  # every row, once
    scored = summary["clients_scored"]
    assert [c["client"] for c in scored] == ["client-0", "client-1", "client-2", "client-3"]
    assert all(0.5 <= c["accuracy"] <= 1.0 for c in scored if "accuracy" in c)
    log = [json.loads(line) for line in (result.run_dir / "train.log").read_text().splitlines()]
    rounds = [event["round"] for event in log if event["event"] == "eval"]
    assert rounds == [1, 2, 3, 4, 5, 6]
    assert all(len(event["clients"]) == 4 for event in log if event["event"] == "train")
    assert (result.run_dir / "plots" / "federated.png").is_file()
    card = (result.run_dir / "card.md").read_text()
    assert "Federated training" in card and "Dirichlet alpha 1" in card
    assert "| Epochs |" not in card  # train.epochs did nothing: clients made federated.local_epochs passes

    # Everything downstream works on it: the saved model predicts, and it exports to ONNX with parity.
    answers = forgeml.load(result.run_dir).predict([{"x1": 3.0, "x2": 5.0, "colour": "red"}])
    assert answers[0]["label"] == "high"
    from forgeml.api import export

    assert export(result.run_dir)["passed"]


@needs_flower
def test_one_client_per_column_value(tmp_path: Path) -> None:
    config = federated_config(tmp_path, by_column="colour", rounds=4)
    del config["federated"]["clients"]
    result = forgeml.run(config, workspace=tmp_path)
    summary = result.metrics["training"]["federated"]
    assert summary["split"] == "by column colour"
    assert set(summary["client_train_rows"]) == {"(missing)", "blue", "green", "red"}
    assert result.metrics["test"]["accuracy"] >= 0.8


@needs_flower
def test_fedprox_keeps_clients_closer_to_the_global_weights_than_fedavg(tmp_path: Path) -> None:
    """One round from the same start: with a strong proximal term the averaged weights move less."""
    from forgeml.federated import client_partition
    from forgeml.federated.simulation import train_federated
    from forgeml.tasks import build_task, prepare_data
    from forgeml.train.loop import seed_everything

    moved = {}
    for strategy in ("fedavg", "fedprox"):
        extra = {"proximal_mu": 10.0} if strategy == "fedprox" else {}
        config = load_config(federated_config(tmp_path, rounds=1, strategy=strategy, **extra))
        data = prepare_data(config)
        seed_everything(config.train.seed)
        task = build_task(config, data.input_columns)
        task.fit(data.train)
        encoded = {name: task.encode(split, name) for name, split in data.splits.items() if split is not None}
        model = task.build_model()
        start = [p.detach().clone() for p in model.parameters()]
        train_federated(task, model, encoded, client_partition(config, data), config.federated, config.train)
        moved[strategy] = sum(float((p.detach() - s).norm()) for p, s in zip(model.parameters(), start, strict=True))
    assert moved["fedprox"] < 0.7 * moved["fedavg"], moved


@needs_flower
def test_client_level_privacy_reports_an_epsilon_that_grows_with_rounds_and_shrinks_with_noise(
    tmp_path: Path,
) -> None:
    spent = {}
    for noise in (1.0, 2.0):
        privacy = {"noise_multiplier": noise, "clipping_norm": 1.0, "delta": 1e-5}
        result = forgeml.run(federated_config(tmp_path, rounds=4, privacy=privacy), workspace=tmp_path)
        log = [json.loads(line) for line in (result.run_dir / "train.log").read_text().splitlines()]
        epsilons = [event["epsilon"] for event in log if event["event"] == "eval"]
        assert len(epsilons) == 4 and all(a < b for a, b in itertools.pairwise(epsilons))
        report = result.metrics["training"]["federated"]["privacy"]
        assert report["epsilon"] == pytest.approx(epsilons[-1]) and report["releases"] == 4
        spent[noise] = report["epsilon"]
        assert "Client-level privacy:** ε =" in (result.run_dir / "card.md").read_text()
    assert spent[2.0] < spent[1.0]


@needs_flower
def test_a_killed_federation_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    config = federated_config(tmp_path, rows=3000, rounds=12)
    config["train"]["early_stopping"] = None
    checkpoint = "runs/fed/*/checkpoints/federated-round-00004.*"
    reference, resumed, _ = killed_and_resumed(config, tmp_path, checkpoint)
    assert resumed["test"] == reference["test"]
    assert resumed["training"]["federated"]["rounds"] == 12


@needs_flower
@pytest.mark.integration
def test_adult_by_race_federation_beats_the_majority_class(shared_datasets: Path, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "adult_federated.yaml"
    overrides = ["data.sample.train=6000", "federated.by_column=race", "federated.clients=null", "federated.rounds=5"]
    result = forgeml.run(load_config(example, overrides), workspace=tmp_path)
    summary = result.metrics["training"]["federated"]
    assert set(summary["client_train_rows"]) == {"White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"}
    assert result.metrics["test"]["accuracy"] >= 0.82  # majority class: 0.764; centralised on all rows: 0.859
    assert all(c["rows"] > 0 for c in summary["clients_scored"])  # every group scored on its own test rows
