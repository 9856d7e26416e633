"""Image generation: the VAE's likelihood, the GAN's two players in one loss, the Fréchet distance, generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from typer.testing import CliRunner

import forgeml
from forgeml import api
from forgeml.config import load_config
from forgeml.errors import ConfigError, ForgeError
from forgeml.evaluate.frechet import NOT_FID, frechet_distance
from forgeml.evaluate.pixel_likelihood import discretized_gaussian_log_prob, discretized_logistic_log_prob
from forgeml.models.gan import DCGAN
from forgeml.serve.runtime import load_runtime
from forgeml.tasks import load_task
from forgeml.train.checkpoint import latest_checkpoint
from forgeml.train.loop import train
from test_image import write_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def generation_config(npz: Path, kind: str, **train) -> dict:
    return {
        "name": f"stripes_{kind}",
        "task": "image-generation",
        "data": {"train": str(npz), "test": str(npz), "split": {"validation": 0.15, "test": 0.0}},
        "model": {"kind": kind, "width": 8, "latent_size": 8 if kind == "vae" else 16},
        "train": {"epochs": 10, "batch_size": 16, "lr": 5e-3, **train} if kind == "vae" else {"epochs": 3, **train},
    }


@pytest.fixture(scope="module")
def stripes_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("generation") / "stripes.npz")


@pytest.fixture(scope="module")
def vae_run(stripes_npz: Path, tmp_path_factory: pytest.TempPathFactory):
    return forgeml.run(generation_config(stripes_npz, "vae"), workspace=tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def gan_run(stripes_npz: Path, tmp_path_factory: pytest.TempPathFactory):
    """A GAN scored at every epoch by the features of a tiny stripes classifier trained first."""
    workspace = tmp_path_factory.mktemp("gan")
    classifier = {
        "name": "stripes_classifier",
        "task": "image-classification",
        "data": {"train": str(stripes_npz), "test": str(stripes_npz), "split": {"validation": 0.15, "test": 0.0}},
        "model": {"width": 4, "depths": [1]},
        "train": {"epochs": 2, "batch_size": 32},
        "evaluate": {"baseline": False},
    }
    classifier_run = forgeml.run(classifier, workspace=workspace)
    config = generation_config(stripes_npz, "gan")
    config["evaluate"] = {"classifier": str(classifier_run.run_dir)}
    return forgeml.run(config, workspace=workspace)


def test_discretized_likelihoods_give_the_256_pixel_values_probabilities_summing_to_one() -> None:
    values = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 5)
    logistic_mean = torch.tensor([-1.0, -0.3, 0.0, 0.6, 1.0])
    logistic = discretized_logistic_log_prob(values, logistic_mean, torch.tensor([-4.0, -2.0, -1.0, -3.0, -6.0]))
    gaussian = discretized_gaussian_log_prob(
        values, torch.tensor([0.0, 40.0, 128.0, 250.0, 300.0]), torch.full((5,), 9.0)
    )
    for log_prob in (logistic, gaussian):
        assert torch.allclose(log_prob.double().exp().sum(dim=0), torch.ones(5, dtype=torch.float64), atol=1e-4)
    # A narrow Gaussian puts nearly all its mass on the bin of its mean, and a far tail is finite, not -inf.
    assert discretized_gaussian_log_prob(torch.tensor([128]), torch.tensor([128.0]), torch.tensor([0.1])) > -1e-6
    assert torch.isfinite(discretized_gaussian_log_prob(torch.tensor([0]), torch.tensor([255.0]), torch.tensor([5.0])))


def test_frechet_distance_is_zero_for_one_set_grows_with_a_shift_and_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(features, features + shift) for shift in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([6 * 0.25, 6 * 1.0, 6 * 4.0], rel=1e-6)  # a shift moves only the means
    other = rng.normal(size=(400, 6)) * 2.0 + 1.0
    cov_a, cov_b = np.cov(features, rowvar=False), np.cov(other, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((features.mean(0) - other.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(features, other) == pytest.approx(expected, rel=1e-6)


def test_each_gan_player_is_moved_only_by_its_own_loss_and_one_step_moves_both() -> None:
    torch.manual_seed(0)
    gan = DCGAN((3, 16, 16), width=8, latent_size=16)
    pixels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    players = {"generator": gan.generator, "discriminator": gan.discriminator}
    for column, own in ((0, "discriminator"), (1, "generator")):
        gan.zero_grad()
        gan(pixels)[:, column].mean().backward()
        moved = {
            name: sum(float(p.grad.abs().sum()) for p in player.parameters() if p.grad is not None)
            for name, player in players.items()
        }
        other = "generator" if own == "discriminator" else "discriminator"
        assert moved[own] > 0 and moved[other] == 0, (column, moved)
    before = {name: [p.detach().clone() for p in player.parameters()] for name, player in players.items()}
    optimizer = torch.optim.Adam(gan.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizer.zero_grad()
    gan(pixels)[:, :2].mean(0).sum().backward()  # the task's loss: L_D + L_G, one backward, one step
    optimizer.step()
    for name, player in players.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], player.parameters(), strict=True)), name


def test_vae_learns_stripes_below_the_per_pixel_gaussian_and_draws_its_pictures(vae_run) -> None:
    metrics = vae_run.metrics
    evaluations = [json.loads(line) for line in (vae_run.run_dir / "train.log").read_text().splitlines()]
    bits = [event["bits_per_dim"] for event in evaluations if event["event"] == "eval"]
    assert bits[-1] < bits[0]  # validation bits/dim fell during training
    test_bits = metrics["test"]["bits_per_dim"]
    baseline = metrics["baselines"]["models"]["per_pixel_gaussian"]["metrics"]["bits_per_dim"]
    assert np.isfinite(test_bits) and 0 < test_bits < baseline - 0.05, (test_bits, baseline)
    assert metrics["test"]["kl_bits_per_dim"] > 0
    plots = vae_run.run_dir / "plots"
    assert {"samples.png", "reconstructions.png", "interpolation.png"} <= {p.name for p in plots.glob("*.png")}
    with Image.open(plots / "reconstructions.png") as picture:  # 16 test images over their reconstructions
        assert picture.size == (3 * (8 * 16 + 7 * 2), 3 * (4 * 16 + 3 * 2))
    card = (vae_run.run_dir / "card.md").read_text()
    assert "per-pixel Gaussian" in card and "reconstructions.png" in card


def test_generate_writes_the_grid_asked_for_and_a_seed_repeats_its_pixels(vae_run, tmp_path: Path) -> None:
    from forgeml.cli import app

    result = CliRunner().invoke(
        app, ["generate", str(vae_run.run_dir), "--num-samples", "10", "-o", str(tmp_path / "a.png"), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    forgeml.generate_images(vae_run.run_dir, 10, tmp_path / "b.png", seed=3)
    forgeml.generate_images(vae_run.run_dir, 10, tmp_path / "c.png", seed=4)
    grids = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in "abc"}
    assert grids["a"].shape == (3 * 16 + 2 * 2, 4 * 16 + 3 * 2, 3)  # 10 images: 3 rows of 4, 2 pixels apart
    assert np.array_equal(grids["a"], grids["b"]) and not np.array_equal(grids["a"], grids["c"])


def test_a_generation_run_refuses_to_predict_export_audit_compress_or_serve(vae_run) -> None:
    for action in (
        lambda: forgeml.load(vae_run.run_dir).predict([np.zeros((16, 16, 3), np.uint8)]),
        lambda: api.export(vae_run.run_dir),
        lambda: api.audit(vae_run.run_dir),
        lambda: api.compress(vae_run.run_dir),
        lambda: load_runtime(vae_run.run_dir),
    ):
        with pytest.raises(ForgeError, match="not available for image-generation runs; it predicts nothing"):
            action()


def test_gan_is_scored_every_epoch_with_a_fixed_noise_grid_and_its_frechet_distance(gan_run) -> None:
    evaluations = [json.loads(line) for line in (gan_run.run_dir / "train.log").read_text().splitlines()]
    evaluations = [event for event in evaluations if event["event"] == "eval"]
    assert [event["step"] for event in evaluations] == [4, 8, 12]  # 255 images, batches of 64: 4 steps an epoch
    assert all(np.isfinite(event["frechet_distance"]) and event["frechet_distance"] > 0 for event in evaluations)
    test = gan_run.metrics["test"]
    assert 0.5 <= test["sample_confidence"] <= 1.0  # two classes: the top probability is at least a half
    assert sum(test["sample_classes"].values()) == 100 and set(test["sample_classes"]) == {"horizontal", "vertical"}
    plots = gan_run.run_dir / "plots"
    assert len(list((plots / "samples_by_step").glob("step_*.png"))) == 3
    assert {"samples.png", "losses.png", "frechet_by_epoch.png", "sample_classes.png"} <= {
        p.name for p in plots.glob("*.png")
    }
    assert NOT_FID.split(":")[0] in (gan_run.run_dir / "card.md").read_text()
    assert gan_run.metrics["training"]["watched_metric"] == "frechet_distance"


def test_a_gan_resumed_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(
    stripes_npz: Path, tmp_path: Path
) -> None:
    """Its noise comes from torch's generator, which checkpoints save: resuming replays the same z."""
    settings = {"epochs": 2, "batch_size": 32, "checkpoint_every": 5, "keep_checkpoints": 20}
    config = load_config(generation_config(stripes_npz, "gan", **settings))
    from forgeml.tasks import build_task, prepare_data

    data = prepare_data(config)
    task = build_task(config, data.input_columns)
    task.fit(data.train)
    splits = {name: task.encode(data.splits[name], name) for name in ("train", "validation")}

    def fresh_model():
        torch.manual_seed(config.train.seed)
        return task.build_model()

    uninterrupted = fresh_model()
    train(task, uninterrupted, splits["train"], splits["validation"], config.train, tmp_path / "a")
    # The same run "killed" after step 5 (mid-epoch: 8 batches an epoch): only its first checkpoint is left.
    folder = tmp_path / "b"
    train(task, fresh_model(), splits["train"], splits["validation"], config.train, folder)
    for checkpoint in sorted(folder.glob("step-*"))[1:]:
        for file in checkpoint.iterdir():
            file.unlink()
        checkpoint.rmdir()
    assert latest_checkpoint(folder).name == "step-00000005"
    resumed = fresh_model()
    train(task, resumed, splits["train"], splits["validation"], config.train, folder, resume=True)
    expected, found = uninterrupted.state_dict(), resumed.state_dict()
    assert int(found["steps"]) == 16
    assert all(torch.equal(expected[name], found[name]) for name in expected)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.kind", None, "model.kind: task 'image-generation' needs 'vae' or 'gan'"),
        ("model.kind", "diffusion", "model.kind.*'vae'.*'gan'"),
        ("audit", {"fairness": True}, "audit: not available for task 'image-generation'"),
        ("data.augment", {"flip": True}, "data.augment: not available for task 'image-generation'"),
        ("train.early_stopping", {"metric": "accuracy"}, "train.early_stopping.metric"),
        ("evaluate.classifier", "no/such/run", "evaluate.classifier"),
    ],
)
def test_config_errors_name_the_key(stripes_npz: Path, key: str, value: object, message: str) -> None:
    config = generation_config(stripes_npz, "gan")
    *parents, name = key.split(".")
    section = config
    for part in parents:
        section = section.setdefault(part, {})
    if value is None:
        del section[name]
    else:
        section[name] = value
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_generation_keys_are_refused_for_other_tasks(stripes_npz: Path) -> None:
    config = {"task": "image-classification", "data": {"train": str(stripes_npz)}, "model": {"kind": "vae"}}
    with pytest.raises(ConfigError, match=r"model\.kind: is for task 'image-generation'"):
        load_config(config)


def test_a_saved_run_loads_back_as_its_generator(vae_run) -> None:
    task, model = load_task(vae_run.run_dir / "model")
    assert task.name == "image-generation" and task.kind == "vae" and task.image_shape == (16, 16, 3)
    assert task.sample_images(model, 4, seed=1).shape == (4, 3, 16, 16)
