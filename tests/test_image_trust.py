"""Trust for image models: FGSM/PGD attacks and their curves over epsilon, PGD adversarial training (config,
the adversary's step, exact resume), integrated-gradients saliency (completeness, `forgeml explain`), and the
audit of an image run (robustness with a before/after baseline, membership inference, explanations, card)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional
from typer.testing import CliRunner

import forgeml
from forgeml.cli import app
from forgeml.config import load_config
from forgeml.errors import ConfigError
from forgeml.train.adversarial import make_adversary
from forgeml.trust.image_attacks import fgsm, pgd, robustness_curve
from forgeml.trust.image_explain import explain_images
from test_image import png_bytes, stripes

EPSILONS = [2 / 255, 8 / 255, 64 / 255]


def write_stripes(path: Path, train: int = 240, test: int = 80) -> Path:
    x_train, y_train = stripes(train, seed=1)
    x_test, y_test = stripes(test, seed=2)
    names = np.array(["horizontal", "vertical"])
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    return path


def image_config(npz: Path, **train) -> dict:
    return {
        "name": "img",
        "task": "image-classification",
        "data": {"train": str(npz), "test": str(npz), "split": {"validation": 0.2, "test": 0.0}},
        "model": {"width": 8, "depths": [1, 1]},
        "train": {"epochs": 6, "batch_size": 32, "lr": 3e-3, "early_stopping": None, **train},
    }


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> forgeml.RunResult:
    """A small ResNet trained on stripes, audited: attacks at three budgets, membership inference, saliency."""
    folder = tmp_path_factory.mktemp("image_trust")
    config = image_config(write_stripes(folder / "stripes.npz"))
    config["audit"] = {
        "robustness": {"epsilons": ["2/255", "8/255", "32/255"], "pgd_steps": 5, "max_examples": 60},
        "privacy": {"max_examples": 40, "bootstrap": 20},
        "explain": 4,
    }
    return forgeml.run(config, workspace=folder)


@pytest.fixture(scope="module")
def test_images(audited_run: forgeml.RunResult) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    predictor = forgeml.load(audited_run.run_dir)
    x_test, y_test = stripes(80, seed=2)
    pixels = torch.from_numpy(x_test[:48].transpose(0, 3, 1, 2).copy())
    classes = predictor.task.target.classes
    labels = torch.tensor([classes.index("horizontal" if y == 0 else "vertical") for y in y_test[:48]])
    return predictor.torch_model, pixels, labels


def test_attacks_stay_within_epsilon_and_valid_pixels(test_images) -> None:
    model, pixels, labels = test_images
    pixels = pixels[:16].clone()
    pixels[:, :, :2] = 255  # saturated and black rows: the clamp to 0..255 must hold there
    pixels[:, :, -2:] = 0
    epsilon = 8 / 255
    for attacked in (
        fgsm(model, pixels, labels[:16], epsilon),
        pgd(model, pixels, labels[:16], epsilon, steps=4, generator=torch.Generator().manual_seed(0)),
    ):
        moved = (attacked - pixels.float()).abs()
        assert moved.max() <= 8.0 + 1e-4 and moved.max() > 7.9  # on the ball's surface, never past it
        assert attacked.min() >= 0 and attacked.max() <= 255
    first = pgd(model, pixels, labels[:16], epsilon, 4, generator=torch.Generator().manual_seed(3))
    again = pgd(model, pixels, labels[:16], epsilon, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)  # a seeded random start gives the same attack


def test_pgd_is_at_least_as_strong_as_fgsm_and_accuracy_falls_with_epsilon(test_images) -> None:
    model, pixels, labels = test_images
    report = robustness_curve(model, pixels, labels, EPSILONS, pgd_steps=10, seed=0)
    clean = report["clean"]["accuracy"]
    assert clean >= 0.9
    fgsm_accuracy = [r["accuracy"] for r in report["results"] if r["attack"] == "fgsm"]
    pgd_accuracy = [r["accuracy"] for r in report["results"] if r["attack"] == "pgd-10"]
    assert all(p <= f for p, f in zip(pgd_accuracy, fgsm_accuracy, strict=True))
    assert pgd_accuracy == sorted(pgd_accuracy, reverse=True) and pgd_accuracy[-1] < clean - 0.3
    assert fgsm_accuracy[-1] < clean
    unlabelled = robustness_curve(model, pixels, None, EPSILONS, pgd_steps=3, seed=0)
    assert unlabelled["clean"]["accuracy"] is None and unlabelled["results"][-1]["flip_rate"] > 0.3


def test_the_pgd_adversary_crafts_in_eval_mode_without_touching_weights_or_batch_norm(test_images) -> None:
    model, pixels, labels = test_images
    model.train()
    running_mean = model.stem[1].running_mean.clone()
    options = load_config(image_config(Path("d.npz"), adversarial={"epsilon": "4/255", "steps": 2})).train.adversarial
    adversary = make_adversary(options, model, functional.cross_entropy)
    assert adversary.passes == 3  # the loop counts FLOPs for two attack steps and the training step
    crafted = adversary.craft({"pixels": pixels[:8]}, labels[:8])["pixels"]
    assert (crafted - pixels[:8].float()).abs().max() <= 4.0 + 1e-4
    assert model.training  # the training step that follows runs in training mode again
    assert torch.equal(model.stem[1].running_mean, running_mean)  # attack steps leave batch norm alone
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_adversarial_training_settings_round_trip_and_wrong_ones_are_refused(tmp_path: Path) -> None:
    config = image_config(tmp_path / "d.npz", adversarial={"method": "pgd", "epsilon": "8/255", "steps": 2})
    loaded = load_config(config)
    adversarial = loaded.train.adversarial
    assert adversarial.epsilon == pytest.approx(8 / 255) and adversarial.step_size == pytest.approx(2.5 * 8 / 255 / 2)
    again = load_config(json.loads(loaded.model_dump_json()))  # the resolved config, as a run directory saves it
    assert again.train.adversarial == adversarial
    assert load_config(image_config(tmp_path / "d.npz", adversarial={})).train.adversarial.method == "pgd"

    text = {"task": "text-classification", "data": {"train": "t.csv"}}
    for config, message in [
        (
            image_config(tmp_path / "d.npz", adversarial={"method": "fgm"}),
            r"train\.adversarial\.method: 'fgm' .*"
            r"allowed: 'fgm' for text tasks, 'pgd' for task 'image-classification'",
        ),
        ({**text, "train": {"adversarial": {"method": "pgd"}}}, r"train\.adversarial\.method: 'pgd' does not work"),
        ({**text, "train": {"adversarial": {"steps": 3}}}, r"train\.adversarial\.steps: is for method 'pgd'"),
        (image_config(tmp_path / "d.npz", adversarial={"epsilon": 8}), r"train\.adversarial\.epsilon: .* \(0, 1\]"),
        (
            {**image_config(tmp_path / "d.npz"), "audit": {"robustness": {"epsilons": [0.5, 2]}}},
            r"audit\.robustness\.epsilons.*\(0, 1\]",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(config)


def test_the_random_start_draws_from_torchs_generator_so_a_resumed_run_attacks_alike(test_images) -> None:
    """Checkpoints save torch's global generator (a killed image run resumes exactly: tests/test_image.py); the
    adversary must draw its random starts from it, and nothing else, for an adversarial run to resume exactly."""
    model, pixels, labels = test_images
    options = load_config(image_config(Path("d.npz"), adversarial={"steps": 1})).train.adversarial
    adversary = make_adversary(options, model, functional.cross_entropy)
    torch.manual_seed(7)
    first = adversary.craft({"pixels": pixels[:8]}, labels[:8])["pixels"]
    after_first = torch.get_rng_state()
    torch.manual_seed(7)
    assert torch.equal(adversary.craft({"pixels": pixels[:8]}, labels[:8])["pixels"], first)
    assert torch.equal(torch.get_rng_state(), after_first)
    torch.manual_seed(8)
    assert not torch.equal(adversary.craft({"pixels": pixels[:8]}, labels[:8])["pixels"], first)


def test_integrated_gradients_are_complete_and_explain_writes_a_saliency_png(
    audited_run: forgeml.RunResult, test_images, tmp_path: Path
) -> None:
    model, pixels, _ = test_images
    explanations = explain_images(model, pixels[:4], ["horizontal", "vertical"], steps=64)
    for explanation in explanations:
        total = float(explanation.attributions.sum())
        assert total == pytest.approx(explanation.explained_change, rel=0.03, abs=0.02)
        assert abs(explanation.explained_change) > 0.1  # something was explained: the baseline is not the image
        assert explanation.delta == pytest.approx(total - explanation.explained_change, abs=1e-3)

    x_test, _ = stripes(2, seed=5)
    files = []
    for index, image in enumerate(x_test):
        files.append(tmp_path / f"in{index}.png")
        files[-1].write_bytes(png_bytes(image))
    output = tmp_path / "saliency.png"
    result = CliRunner().invoke(app, ["explain", str(audited_run.run_dir), *map(str, files), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = forgeml.load(audited_run.run_dir).predict([{"image": str(f)} for f in files])
    for file, answer in zip(files, answers, strict=True):
        assert f"{file}: {answer['label']} (" in result.output.replace("\n", "")


def test_an_image_run_is_audited_and_compared_with_a_baseline(audited_run: forgeml.RunResult) -> None:
    trust = audited_run.run_dir / "trust"
    summary = json.loads((trust / "summary.json").read_text())
    titles = [section["title"] for section in summary["sections"]]
    assert titles == ["Privacy: membership inference", "Robustness", "Explanations"]
    headline = audited_run.metrics["audit"]
    assert 0 <= headline["pgd_accuracy_at_32_255"] < headline["fgsm_accuracy_at_2_255"] <= 1
    assert 0 <= headline["membership_auc"] <= 1 and headline["saliency_completeness_error"] < 0.1
    explained = json.loads((trust / "explanations.json").read_text())["images"]
    assert len(explained) == 4 and all(e["true_label"] in ("horizontal", "vertical") for e in explained)
    assert all(abs(e["delta"]) <= 0.1 * abs(e["explained_change"]) + 0.01 for e in explained)
    for name in ("robustness.png", "saliency.png", "membership_roc.png"):
        assert (trust / name).read_bytes()[:4] == b"\x89PNG"
    card = (audited_run.run_dir / "card.html").read_text()
    for title in ("Trust: Robustness", "Trust: Explanations", "Trust: Privacy: membership inference"):
        assert title in card
    assert card.count("data:image/png;base64") >= 3 + 1  # the three audit plots, beside the run's own

    # The run as its own baseline: the same rows and the same seeded attacks must give identical numbers.
    headline = forgeml.audit(audited_run.run_dir, baseline=audited_run.run_dir)
    for key, value in headline.items():
        if key.startswith(("pgd_", "fgsm_")):
            assert headline[f"baseline_{key}"] == value
    section = next(
        s for s in json.loads((trust / "summary.json").read_text())["sections"] if s["title"] == "Robustness"
    )
    comparison = section["tables"][-1]
    assert comparison["header"] == ["probe", "accuracy before", "accuracy after", "flip rate before", "flip rate after"]
    assert [row[0] for row in comparison["rows"]][:2] == ["clean", "fgsm at 2/255"]
    assert all(row[1] == row[2] and row[3] == row[4] for row in comparison["rows"])
