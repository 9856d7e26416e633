"""Training on tiny random-initialised models: every task learns, runs are deterministic, and a
run killed with SIGKILL resumes to the same result as one that was never interrupted."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import forgeml
from forgeml.config import TrainConfig
from forgeml.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from forgeml.train.loop import epoch_batches, make_optimizer, make_scheduler
from forgeml.train.progress import ProgressBar, progress_enabled, progress_mode

from conftest import kill_at_checkpoint, resume_run, write_csv


def test_text_classification_learns(text_config: dict, tmp_path: Path) -> None:
    result = forgeml.run(text_config, workspace=tmp_path)
    assert result.metrics["test"]["accuracy"] >= 0.9
    assert result.metrics["validation"]["f1"] >= 0.9
    model = forgeml.load(result.run_dir)
    answers = model.predict(["the film was great", "a dull and boring plot"])
    assert [a["label"] for a in answers] == ["positive", "negative"]
    assert sum(answers[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_same_seed_same_metrics(text_config: dict, tmp_path: Path) -> None:
    text_config["train"]["epochs"] = 1
    first = forgeml.run(text_config, workspace=tmp_path / "a")
    second = forgeml.run(text_config, workspace=tmp_path / "b")
    assert first.metrics["test"] == second.metrics["test"]
    assert first.metrics["validation"]["log_loss"] == second.metrics["validation"]["log_loss"]


def tabular_rows(count: int, seed: int = 0, missing: float = 0.05) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        x1, x2 = rng.gauss(0, 1), rng.gauss(5, 3)
        colour = rng.choice(["red", "green", "blue"])
        score = 2.0 * x1 - 0.5 * (x2 - 5) + {"red": 1.5, "green": 0.0, "blue": -1.5}[colour]
        rows.append(
            {
                "x1": round(x1, 4),
                "x2": "" if rng.random() < missing else round(x2, 4),  # some missing numbers
                "colour": "" if rng.random() < missing else colour,  # and missing categories
                "label": "high" if score > 0 else "low",
                "score": round(3.0 * x1 - 2.0 * x2 + 1.0 + rng.gauss(0, 0.1), 4),
            }
        )
    return rows


def tabular_config(path: Path, task: str, label: str, **model) -> dict:
    return {
        "name": task,
        "task": task,
        "data": {
            "train": str(path),
            "label": label,
            "features": ["x1", "x2", "colour"],
            "split": {"validation": 0.15, "test": 0.15},
        },
        "model": {"backbone": "mlp", **model},
        "train": {"epochs": 30, "batch_size": 32, "lr": 1e-2, "warmup_ratio": 0.0, "early_stopping": None},
    }


def test_tabular_classification_learns_with_missing_values(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(600))
    for categorical in ("onehot", "embedding"):
        config = tabular_config(path, "tabular-classification", "label", categorical=categorical)
        result = forgeml.run(config, workspace=tmp_path)
        assert result.metrics["test"]["accuracy"] >= 0.88, categorical
        assert result.metrics["test"]["roc_auc"] >= 0.95, categorical
    answers = forgeml.load(result.run_dir).predict(
        [{"x1": 3.0, "x2": 5.0, "colour": "red"}, {"x1": -3.0, "x2": None, "colour": "unseen"}]
    )
    assert [a["label"] for a in answers] == ["high", "low"]
    saved = json.loads((result.run_dir / "model" / "task.json").read_text())
    assert saved["inputs"]["preprocessing"]["categorical"]["colour"]  # fitted vocabulary saved as JSON


def test_linear_regression_recovers_a_linear_target(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(500, missing=0.0))
    config = tabular_config(path, "tabular-regression", "score", hidden_sizes=[], dropout=0.0)
    config["data"]["features"] = ["x1", "x2"]
    config["train"].update(epochs=60, scheduler="constant", weight_decay=0.0)
    result = forgeml.run(config, workspace=tmp_path)
    assert result.metrics["test"]["r2"] >= 0.98
    assert (result.run_dir / "plots" / "predicted_vs_true.png").is_file()
    value = forgeml.load(result.run_dir).predict([{"x1": 1.0, "x2": 2.0}])[0]["value"]
    assert value == pytest.approx(3.0 * 1.0 - 2.0 * 2.0 + 1.0, abs=0.5)


def test_text_regression_and_pair_classification_train(tiny_backbone: Path, tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = []
    for _ in range(300):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = ["great"] * good + ["awful"] * bad + ["film"]
        rng.shuffle(words)
        other = rng.choice(["the film was good", "the film was bad"])
        rows.append(
            {
                "text": " ".join(words),
                "other": other,
                "score": good - bad,
                "same": "yes" if (good >= bad) == ("good" in other) else "no",
            }
        )
    path = write_csv(tmp_path / "r.csv", rows)
    base = {
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None},
    }
    regression = forgeml.run(
        {"name": "reg", "task": "regression", **base, "data": {"train": str(path), "label": "score"}},
        workspace=tmp_path,
    )
    assert regression.metrics["test"]["r2"] >= 0.5
    pair = forgeml.run(
        {
            "name": "pair",
            "task": "text-pair-classification",
            **base,
            "data": {"train": str(path), "text_pair": "other", "label": "same"},
        },
        workspace=tmp_path,
    )
    assert set(pair.metrics["test"]["classes"]) == {"no", "yes"}
    answers = forgeml.load(pair.run_dir).predict([("great great film", "the film was good")])
    assert answers[0]["label"] in {"yes", "no"}
    log = [json.loads(line) for line in (pair.run_dir / "train.log").read_text().splitlines()]
    losses = [event["loss"] for event in log if event["event"] == "train"]
    assert losses[-1] < losses[0]


def test_early_stopping_stops_and_keeps_the_best_checkpoint(text_config: dict, tmp_path: Path) -> None:
    text_config["train"].update(
        epochs=10, lr=1e-9, scheduler="constant", eval_every=3, early_stopping={"patience": 2, "metric": "accuracy"}
    )
    result = forgeml.run(text_config, workspace=tmp_path)
    training = result.metrics["training"]
    assert training["stopped_early"]
    assert training["steps"] == 9  # evaluations at steps 3 (best), 6 and 9 (no better): patience 2
    assert training["best_step"] == 3
    assert (result.run_dir / "checkpoints" / "best.safetensors").is_file()


@pytest.mark.parametrize(
    "train",
    [
        {"epochs": 2},  # the best evaluation is the last one: the weights in memory are kept as they are
        {"epochs": 4, "lr": 2e-2, "eval_every": 2},  # an earlier best is restored at the end
    ],
)
def test_reported_validation_metrics_are_those_of_the_weights_kept(
    text_config: dict, train: dict, tmp_path: Path
) -> None:
    # The report reuses the loop's validation outputs of the best evaluation instead of running
    # validation again: they must be exactly what the saved model gives on the validation split.
    from forgeml.config import load_config
    from forgeml.data.prepare import prepare
    from forgeml.evaluate.metrics import scalar_metrics
    from forgeml.pipeline import evaluate_split

    text_config["train"].update(train)
    result = forgeml.run(text_config, workspace=tmp_path)
    training = result.metrics["training"]
    assert (training["best_step"] == training["steps"]) == ("eval_every" not in train)
    saved = forgeml.load(result.run_dir)
    validation = prepare(load_config(result.run_dir / "config.yaml")).splits["validation"]
    fresh = evaluate_split(saved.task, saved.model, saved.task.encode(validation, "validation"), 64, None)
    reported = scalar_metrics(result.metrics["validation"])
    assert scalar_metrics(fresh) == pytest.approx(reported, abs=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd", "lr": 0.1, "scheduler": "cosine", "grad_accum_steps": 3},
        {"l1": 1e-4, "max_grad_norm": None, "group_by_length": False, "warmup_ratio": 0.2},
    ],
)
def test_optimizer_variants_reduce_the_loss(options: dict, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(400))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"].update(epochs=10, **options)
    result = forgeml.run(config, workspace=tmp_path)
    assert result.metrics["test"]["accuracy"] >= 0.8


def test_length_grouped_batches_cover_every_row_with_less_padding() -> None:
    lengths = np.random.default_rng(0).integers(3, 120, size=2000)
    grouped = epoch_batches(lengths, 32, seed=1, group_by_length=True)
    plain = epoch_batches(lengths, 32, seed=1, group_by_length=False)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(2000))
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches)  # noqa: E731
    assert padded(grouped) < 0.7 * padded(plain)
    again = epoch_batches(lengths, 32, seed=1, group_by_length=True)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again, strict=True))


def test_checkpoint_round_trip_restores_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    config = TrainConfig().fill_family_defaults("encoder")  # a bare TrainConfig leaves family keys null
    optimizer, scheduler = make_optimizer(model, config), None
    scheduler = make_scheduler(optimizer, config, total_steps=10)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"step": 3, "history": []})
    expected_state = optimizer.state_dict()
    expected_random = torch.rand(3)

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    fresh_optimizer = make_optimizer(fresh, config)
    fresh_scheduler = make_scheduler(fresh_optimizer, config, total_steps=10)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 3
    assert torch.equal(torch.rand(3), expected_random)
    for key, value in expected_state["state"][0].items():
        assert torch.equal(fresh_optimizer.state_dict()["state"][0][key], value)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(text_config: dict, tmp_path: Path) -> None:
    # 420 training rows, batch 8 -> 53 steps an epoch, 2 epochs; checkpoints every 10 steps.
    from conftest import sentiment_rows

    write_csv(Path(text_config["data"]["train"]), sentiment_rows(600, seed=3))
    text_config["train"].update(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=10, eval_every=20)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(text_config))

    reference = forgeml.run(text_config, workspace=tmp_path / "reference")

    workspace = tmp_path / "killed"
    run_dir = kill_at_checkpoint(config_path, workspace, "runs/tiny/*/checkpoints/step-00000070")  # mid-epoch 2
    assert not (run_dir / "metrics.json").exists()  # killed before it finished
    step = json.loads((latest_checkpoint(run_dir / "checkpoints") / "state.json").read_text())["trainer"]["step"]
    assert 70 <= step < 106

    resume_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] == reference.metrics["test"]
    assert metrics["validation"] == reference.metrics["validation"]
    assert metrics["training"]["steps"] == reference.metrics["training"]["steps"]
    statuses = {r["id"]: r["status"] for r in forgeml.runs(workspace)}
    assert statuses[run_dir.name] == "finished"


def test_progress_is_a_bar_on_a_terminal_plain_lines_in_logs_and_nothing_when_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert (progress_mode(), progress_mode(quiet=True)) == ("bar", "off")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert (progress_mode(), progress_mode(quiet=True)) == ("lines", "off")
    assert progress_enabled() and not progress_enabled(quiet=True)  # --quiet alone silences it

    with ProgressBar("training", 200, enabled=True) as bar:
        for step in range(200):
            bar.advance(1, {"loss": f"{1 / (step + 1):.4f}", "samples/s": "900"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20  # every 5 %
    assert lines[0].startswith("training 10/200 (5%)  loss 0.1000  samples/s 900  elapsed 0:00:00  eta ")
    assert lines[-1].startswith("training 200/200 (100%)  loss 0.0050") and "eta" not in lines[-1]

    with ProgressBar("training", 1000, enabled=True, completed=400) as bar:  # resumed, then stopped early
        bar.advance(30, {"loss": "0.2"})
    assert capsys.readouterr().err.splitlines() == ["training 430/1000 (43%)  loss 0.2  elapsed 0:00:00  eta 0:00:00"]

    with ProgressBar("training", 200, enabled=False) as bar:
        bar.advance(200, {"loss": "0.1"})
    assert capsys.readouterr().err == ""


def test_training_progress_reaches_a_log_unless_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(300))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"]["epochs"] = 4
    forgeml.run(config, workspace=tmp_path, quiet=False)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("training ")]
    assert len(lines) >= 10 and lines[-1].startswith("training 28/28 (100%)  loss "), lines
    assert "samples/s" in lines[0] and "elapsed" in lines[0] and "eta" in lines[0]

    forgeml.run(config, workspace=tmp_path, quiet=True)
    assert "training " not in capfd.readouterr().err


def test_cli_run_logs_progress_and_points_at_the_card_and_next_commands(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(300))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"]["epochs"] = 2
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "forgeml.cli", "run", str(tmp_path / "cfg.yaml"), "--workspace", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)  # stderr is a pipe, not a TTY
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 14/14 (100%)" in result.stderr
    run_dir = result.stdout.split("run directory:")[1].split()[0]
    assert f"model card: {run_dir}/card.html" in result.stdout and Path(run_dir, "card.html").is_file()
    assert f"forgeml serve {run_dir}" in result.stdout
    assert f"forgeml predict {run_dir} FILE -o out.csv" in result.stdout

    quiet = subprocess.run([*command, "--quiet"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and "training " not in quiet.stderr, quiet.stderr[-3000:]


def test_the_matmul_peak_leaves_the_random_stream_and_a_low_one_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeml.train import peak

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(1).item()
    torch.manual_seed(0)
    measured = peak.matmul_peak_flops(size=256, repeats=3)
    # Measuring leaves the global random stream alone: a run must not depend on whether the peak was cached.
    assert torch.rand(1).item() == expected
    cache = json.loads(peak.cache_file().read_text())
    (key,) = cache
    peak.cache_file().write_text(json.dumps({key: 1.0}))  # as if measured while other work held the cores
    assert peak.matmul_peak_flops(size=256) == 1.0  # cached figures are trusted ...
    refreshed = peak.matmul_peak_flops(size=256, repeats=3, refresh=True)  # ... until utilisation says otherwise
    assert refreshed > 1e6 and json.loads(peak.cache_file().read_text())[key] == refreshed
    peak.cache_file().write_text(json.dumps({key: measured * 100}))
    assert peak.matmul_peak_flops(size=256, repeats=3, refresh=True) == measured * 100  # never lowered
