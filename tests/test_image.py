"""Image classification: reading .npz arrays, class folders and tables of image files (with errors that name
the file), augmentation inside the model (on while training only, reproducible, resumed exactly), and a
small ResNet that learns, predicts from files, bytes or arrays, and round-trips through its run directory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import forgeml
from forgeml.config import load_config
from forgeml.data.images import read_images
from forgeml.errors import ConfigError, DataError
from forgeml.models.cnn import Augment, ResNetSmall

from conftest import killed_and_resumed, write_csv


def stripes(count: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy horizontal (class 0) or vertical (class 1) stripes of random phase and colour."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    grid = np.arange(size)
    for index, label in enumerate(labels):
        period, phase = rng.integers(3, 6), rng.integers(0, 6)
        wave = ((grid + phase) // period) % 2
        pattern = wave[:, None] * np.ones(size)[None, :] if label == 0 else np.ones(size)[:, None] * wave[None, :]
        colour = rng.uniform(80, 255, 3)
        image = pattern[:, :, None] * colour + rng.normal(0, 25, (size, size, 3))
        images[index] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels


def write_npz(path: Path, train: int = 300, test: int = 100) -> Path:
    x_train, y_train = stripes(train, seed=1)
    x_test, y_test = stripes(test, seed=2)
    names = np.array(["horizontal", "vertical"])
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_config(npz: Path, **train) -> dict:
    return {
        "name": "img",
        "task": "image-classification",
        "data": {"train": str(npz), "test": str(npz), "split": {"validation": 0.15, "test": 0.0}},
        "model": {"width": 8, "depths": [1, 1]},
        "train": {"epochs": 8, "batch_size": 32, "lr": 3e-3, **train},
    }


def test_an_npz_gives_each_split_its_arrays_with_class_names(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    train, test = read_images(npz, "label", "train"), read_images(npz, "label", "test")
    assert (len(train), len(test)) == (300, 100)
    assert set(train["label"]) == {"horizontal", "vertical"}
    assert train[0]["image_shape"] == [16, 16, 3] and len(train[0]["image"]) == 16 * 16 * 3
    assert train[5]["source"] == "x_train[5]"
    with pytest.raises(DataError, match=r"no x_validation/y_validation or x/y or images/labels arrays"):
        read_images(npz, "label", "validation")


def test_bad_npz_arrays_are_refused_naming_the_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 8, 8, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"x must be uint8 images"):
        read_images(tmp_path / "f.npz", "label")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 3]), class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"label 3 in y has no entry in class_names"):
        read_images(tmp_path / "c.npz", "label")


def test_a_folder_of_class_folders_decodes_every_file_and_names_a_broken_one(tmp_path: Path) -> None:
    images, labels = stripes(6, size=12)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "photos" / ("horizontal" if label == 0 else "vertical")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")
    data = read_images(tmp_path / "photos", "label")
    assert len(data) == 6 and set(data["label"]) == {"horizontal", "vertical"}
    assert all(source.endswith(".png") for source in data["source"])

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "photos" / "vertical" / "big.png")
    with pytest.raises(DataError, match=r"big.png: 30 x 20 pixels where .* has 12 x 12; set data.image_size"):
        read_images(tmp_path / "photos", "label")
    resized = read_images(tmp_path / "photos", "label", size=12)
    assert {tuple(shape) for shape in resized["image_shape"]} == {(12, 12, 3)}

    (tmp_path / "photos" / "vertical" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        read_images(tmp_path / "photos", "label", size=12)


def test_a_table_names_image_files_relative_to_itself(tmp_path: Path) -> None:
    images, labels = stripes(4, size=10)
    (tmp_path / "files").mkdir()
    rows = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(tmp_path / "files" / f"{index}.jpg", quality=95)
        rows.append({"path": f"files/{index}.jpg", "label": int(label)})
    table = write_csv(tmp_path / "images.csv", rows)
    data = read_images(table, "label", image_column="path")
    assert len(data) == 4 and data["label"] == [int(v) for v in labels]
    with pytest.raises(DataError, match=r"no image column 'image' \(data.image\); columns: path, label"):
        read_images(table, "label")


def test_augmentation_is_off_in_eval_mode_reproducible_and_keeps_the_image_content() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) % 256
    fill = torch.tensor([1.0, 2.0, 3.0])
    augment = Augment(crop_padding=2, flip=True, jitter=0.2, cutout=4)
    augment.eval()
    assert torch.equal(augment(images, fill), images)
    augment.train()
    torch.manual_seed(0)
    first = augment(images, fill)
    torch.manual_seed(0)
    assert torch.equal(augment(images, fill), first)  # torch's generator decides: checkpoints restore it
    assert not torch.equal(first, images)

    crop = Augment(crop_padding=2, flip=False)  # a crop is a window of the reflect-padded image
    crop.train()
    shifted = crop(images, fill)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    windows = [padded[:, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
    assert all(any(torch.equal(shifted[i], w[i]) for w in windows) for i in range(2))

    cut = Augment(crop_padding=0, flip=False, cutout=4)
    cut.train()
    painted = cut(torch.full((4, 3, 8, 8), 200.0), fill)
    assert all((painted[i] != 200.0).any() for i in range(4))
    assert set(painted.unique().tolist()) <= {1.0, 2.0, 3.0, 200.0}


def test_the_resnet_counts_its_flops_and_takes_raw_pixels() -> None:
    model = ResNetSmall(10, (3, 32, 32), [120.0] * 3, [60.0] * 3, width=16, depths=[1, 1, 1])
    # stem 3->16 at 32x32, then three stages of two 3x3 convs (+ 1x1 shortcuts at stages 2 and 3), head.
    convs = 32 * 32 * (27 * 16 + 2 * 144 * 16) + 16 * 16 * 32 * (144 + 288 + 16) + 8 * 8 * 64 * (288 + 576 + 32)
    assert model.forward_flops == pytest.approx(2 * (convs + 64 * 10))
    model.eval()
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(model(raw), model(raw.float()))


def test_image_settings_that_cannot_work_are_refused_naming_the_key(tmp_path: Path) -> None:
    config = image_config(tmp_path / "d.npz")
    for key, value, message in [
        ("model", {"backbone": "minilm"}, "model.backbone: task 'image-classification' needs 'resnet_small'"),
        ("model", {"depths": [1, 0]}, "model.depths: every stage needs at least one block"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config({**config, key: value})
    text = {"task": "text-classification", "data": {"train": "t.csv", "augment": {}}}
    with pytest.raises(ConfigError, match=r"data\.augment: is for task 'image-classification'"):
        load_config(text)
    loaded = load_config(config)
    assert loaded.data.augment.crop_padding == 4 and loaded.data.augment.flip  # on unless set to null
    assert load_config({**config, "data": {**config["data"], "augment": None}}).data.augment is None


def test_a_small_resnet_learns_stripes_and_predicts_from_files_bytes_and_arrays(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz")
    result = forgeml.run(image_config(npz), workspace=tmp_path)
    assert result.metrics["test"]["accuracy"] >= 0.9  # chance: 0.5
    assert (result.run_dir / "plots" / "examples.png").is_file()
    assert "plots/examples.png" in (result.run_dir / "card.md").read_text()
    baselines = result.metrics["baselines"]["models"]
    assert "pixels_logreg" in baselines and "accuracy" in baselines["pixels_logreg"]["metrics"]

    x_test, y_test = stripes(6, seed=2)
    expected = ["horizontal" if y == 0 else "vertical" for y in y_test]
    predictor = forgeml.load(result.run_dir)
    (tmp_path / "one.png").write_bytes(png_bytes(x_test[0]))
    from_arrays = [a["label"] for a in predictor.predict([{"image": image.tolist()} for image in x_test])]
    from_bytes = [a["label"] for a in predictor.predict([{"image": png_bytes(image)} for image in x_test])]
    from_file = predictor.predict([{"image": str(tmp_path / "one.png")}])[0]["label"]
    assert from_arrays == from_bytes and from_file == from_arrays[0]
    assert sum(a == b for a, b in zip(from_arrays, expected, strict=True)) >= 5

    output = forgeml.predict(result.run_dir, npz, tmp_path / "out.csv")
    header = output.read_text().splitlines()[0].split(",")
    assert header[:3] == ["label", "source", "prediction"] and "image" not in header
    with pytest.raises(DataError, match=r"row 1: image of shape \(8, 8, 3\), the model takes \(16, 16, 3\)"):
        predictor.predict([{"image": np.zeros((8, 8, 3)).tolist()}])


def test_a_killed_image_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", train=400)
    config = image_config(npz, epochs=3, checkpoint_every=5, early_stopping=None)
    config["data"]["augment"] = {"crop_padding": 2, "flip": True, "jitter": 0.2, "cutout": 4}
    reference, resumed, _ = killed_and_resumed(config, tmp_path, "runs/img/*/checkpoints/step-00000015")
    assert resumed["test"] == reference["test"]  # augmentation drew the same crops, flips and holes


def test_mixup_and_cutmix_mix_images_and_targets_in_the_same_proportion() -> None:
    from forgeml.tasks.image import ImageClassificationTask
    from forgeml.tasks.targets import ClassLabels

    target = ClassLabels("label")
    target.fit(["a", "b", "c"])
    pixels = torch.stack([torch.full((3, 8, 8), value, dtype=torch.uint8) for value in (0, 100, 200, 250)])
    targets = torch.tensor([0, 1, 2, 0])
    for mixing in ({"mixup": 0.4}, {"cutmix": 1.0}):
        task = ImageClassificationTask(target, {"width": 8, "depths": [1], "dropout": 0.0}, {"flip": True, **mixing})
        assert "mixup" not in task.pixel_augment and "cutmix" not in task.pixel_augment  # not the model's
        torch.manual_seed(3)
        inputs, soft = task.training_batch({"pixels": pixels}, targets)
        mixed = inputs["pixels"].float()
        assert soft.shape == (4, 3) and torch.allclose(soft.sum(dim=1), torch.ones(4))
        # Each image is `share` of its own (constant) value and 1 - share of its partner's, and so is its target.
        own = soft[torch.arange(4), targets]
        for index in range(4):
            values = mixed[index].unique()
            if "cutmix" in mixing:  # a box of the partner's value pasted into the image's own
                assert len(values) <= 2 and (mixed[index] == pixels[index].float()).float().mean() >= own[index] - 1e-6
            else:
                assert len(values) == 1
        torch.manual_seed(3)
        again, _ = task.training_batch({"pixels": pixels}, targets)
        assert torch.equal(again["pixels"], inputs["pixels"])  # torch's generator: seeded, checkpointed
    plain = ImageClassificationTask(target, {"width": 8, "depths": [1], "dropout": 0.0}, {"flip": True})
    assert plain.training_batch({"pixels": pixels}, targets)[1] is targets


def test_a_run_with_mixup_and_cutmix_learns_and_resumes_exactly(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", train=400)
    config = image_config(npz, epochs=3, checkpoint_every=5, early_stopping=None)
    config["data"]["augment"] = {"crop_padding": 2, "flip": True, "mixup": 0.2, "cutmix": 1.0}
    reference, resumed, _ = killed_and_resumed(config, tmp_path, "runs/img/*/checkpoints/step-00000015")
    assert resumed["test"] == reference["test"]  # the same partners, shares and boxes after the restart
    assert reference["test"]["accuracy"] >= 0.8  # chance: about 0.5


def test_the_my_images_example_runs_on_folders_of_class_folders(tmp_path: Path) -> None:
    """examples/my_images.yaml as shipped, on a folder per class of PNG files of mixed sizes beside it."""
    import shutil

    example = Path(__file__).resolve().parents[1] / "examples" / "my_images.yaml"
    shutil.copy(example, tmp_path / "my_images.yaml")
    for split, count, seed in (("train", 160, 1), ("test", 40, 2)):
        images, labels = stripes(count, size=80, seed=seed)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / "my_images" / split / ("horizontal" if label == 0 else "vertical")
            folder.mkdir(parents=True, exist_ok=True)
            side = 64 + index % 3 * 8  # 64, 72 or 80 pixels: brought to data.image_size (64)
            Image.fromarray(image[:side, :side]).save(folder / f"{index:04d}.png")
    config = load_config(tmp_path / "my_images.yaml")
    assert config.data.train == tmp_path / "my_images" / "train" and config.data.image_size == 64
    overrides = ["train.epochs=3", "model.width=8", "train.batch_size=32"]
    result = forgeml.run(tmp_path / "my_images.yaml", overrides=overrides, workspace=tmp_path / "ws")
    assert result.metrics["test"]["accuracy"] >= 0.8  # chance: about 0.5
    assert set(result.metrics["test"]["per_class"]) == {"horizontal", "vertical"}
