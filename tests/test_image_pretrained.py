"""Image classification from a pre-trained checkpoint folder: timm's layout (config.json + model.safetensors)
and torchvision's (one <model>-<hash>.pth or .safetensors file). The checkpoints are networks with random
weights made here (nothing is downloaded): ResNet-18s, which forgeml builds itself with both libraries' weight
names (so these tests run without timm or torchvision), and, where the libraries import, their own networks.
A run fine-tunes with a new head, loads the checkpoint's weights, reloads and exports without the folder; bad
folders and resnet_small-only keys are refused naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import forgeml
from forgeml import api
from forgeml.config import FAMILY_DEFAULTS, load_config
from forgeml.data.images import read_images
from forgeml.errors import ConfigError
from forgeml.models import vision
from forgeml.models.resnet import ResNet
from forgeml.tasks.image import ImageClassificationTask
from forgeml.tasks.targets import ClassLabels
from test_image import stripes


def _libraries() -> tuple[Any, Any] | None:
    try:
        import timm
        import torchvision
    except Exception:  # absent, or a torchvision built for another torch (it then fails with a RuntimeError)
        return None
    return timm, torchvision


LIBRARIES = _libraries()
needs_vision = pytest.mark.skipif(
    LIBRARIES is None, reason="timm and torchvision do not import here (pip install 'forgeml[vision]')"
)
TIMM_NETWORK = "test_resnet"  # timm's own tiny test ResNet: 0.37 M weights


def write_npz(path: Path, train: int = 240, test: int = 80, size: int = 32) -> Path:
    x_train, y_train = stripes(train, size=size, seed=1)
    x_test, y_test = stripes(test, size=size, seed=2)
    names = np.array(["horizontal", "vertical"])
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    return path


def pretrained_config(npz: Path, backbone: str | Path, **train: Any) -> dict:
    return {
        "name": "pretrained",
        "task": "image-classification",
        "data": {"train": str(npz), "test": str(npz), "split": {"validation": 0.15, "test": 0.0}},
        "model": {"backbone": str(backbone)},
        "train": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "early_stopping": None, **train},
    }


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict with ImageNet's 1,000-class head, named as torchvision and timm name it."""
    torch.manual_seed(0)
    return ResNet("resnet18").state_dict()


def write_timm_layout(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A resnet18 folder as timm's save_for_hf writes it (config.json copied from timm 1.0.31's own)."""
    folder.mkdir(parents=True)
    config = {
        "architecture": "resnet18",
        "num_classes": 1000,
        "num_features": 512,
        "global_pool": "avg",
        "model_args": {"in_chans": 3, "num_classes": 1000, "global_pool": "avg"},
        "pretrained_cfg": {
            "tag": "a1_in1k",
            "input_size": [3, 224, 224],
            "fixed_input_size": False,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "num_classes": 1000,
            "first_conv": "conv1",
            "classifier": "fc",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")
    return folder


def test_a_resnet_checkpoint_in_timms_layout_fine_tunes_reloads_without_its_folder_and_exports(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    folder = write_timm_layout(tmp_path / "checkpoint", resnet18_state)
    npz = write_npz(tmp_path / "stripes.npz")
    result = forgeml.run(pretrained_config(npz, folder), workspace=tmp_path / "workspace")
    assert result.metrics["test"]["accuracy"] >= 0.85  # chance: 0.5

    state = json.loads((result.run_dir / "model" / "task.json").read_text())["model"]
    assert (state["library"], state["network"], state["head"]) == ("timm", "resnet18", ["fc"])
    images, _ = stripes(8, size=32, seed=5)
    before = forgeml.load(result.run_dir).predict(list(images))
    shutil.rmtree(folder)  # the run stands alone: its task.json says how to build the network
    assert forgeml.load(result.run_dir).predict(list(images)) == before
    report = api.export(result.run_dir)
    assert report["passed"] and report["checks"]["onnx_fp32"]["max_abs_diff"] <= 1e-4


def test_a_torchvision_resnet_file_loads_without_torchvision(
    tmp_path: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    folder = tmp_path / "torchvision"
    folder.mkdir()
    torch.save(resnet18_state, folder / "resnet18-f37072fd.pth")  # as torch.hub caches torchvision's weights
    task, model = _task(folder, write_npz(tmp_path / "d.npz", train=20, test=4))
    assert (task.checkpoint.library, task.checkpoint.network) == ("torchvision", "resnet18")
    assert isinstance(model.network, ResNet) and model.head.out_features == 2
    assert task.new_head == ["fc.bias", "fc.weight"]
    weights = model.network.state_dict()
    assert all(torch.equal(weights[name], value) for name, value in resnet18_state.items() if "fc." not in name)
    model.eval()  # raw pixels in, normalised with ImageNet's mean and standard deviation
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = model.network((pixels.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    assert torch.allclose(model(pixels), expected, atol=1e-5)


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's tiny ResNet with a 10-class head, saved as timm's hub layout (safetensors)."""
    timm = LIBRARIES[0]
    from timm.models import save_for_hf

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoints") / "timm-resnet"
    save_for_hf(timm.create_model(TIMM_NETWORK, pretrained=False, num_classes=10), folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    torchvision = LIBRARIES[1]
    torch.manual_seed(0)
    return torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict()  # 1,000 classes


@needs_vision
def test_a_timm_checkpoint_fine_tunes_reloads_without_its_folder_and_exports(tmp_path: Path, timm_folder: Path) -> None:
    folder = tmp_path / "checkpoint"
    shutil.copytree(timm_folder, folder)
    npz = write_npz(tmp_path / "stripes.npz")
    result = forgeml.run(pretrained_config(npz, folder), workspace=tmp_path / "workspace")
    assert result.metrics["test"]["accuracy"] >= 0.85  # chance: 0.5

    state = json.loads((result.run_dir / "model" / "task.json").read_text())["model"]
    assert state["architecture"] == "pretrained" and (state["library"], state["network"]) == ("timm", TIMM_NETWORK)
    assert state["mean"] == [0.5, 0.5, 0.5] and state["head"] == ["fc"] and "weights" not in state
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert config["model"]["backbone"] == str(folder) and config["train"]["lr"] == 2e-3

    images, _ = stripes(8, size=32, seed=5)
    before = forgeml.load(result.run_dir).predict(list(images))
    shutil.rmtree(folder)  # the run stands alone: its task.json says how to build the network
    after = forgeml.load(result.run_dir).predict(list(images))
    assert after == before

    report = api.export(result.run_dir)
    assert report["passed"] and report["checks"]["onnx_fp32"]["max_abs_diff"] <= 1e-4


def _task(folder: Path, npz: Path) -> tuple[ImageClassificationTask, torch.nn.Module]:
    task = ImageClassificationTask(ClassLabels("label"), {"backbone": str(folder)}, {"crop_padding": 4, "flip": True})
    task.fit(read_images(npz, "label"))
    return task, task.build_model()


@needs_vision
def test_a_new_run_starts_from_the_checkpoints_weights_with_a_new_head(tmp_path: Path, timm_folder: Path) -> None:
    task, model = _task(timm_folder, write_npz(tmp_path / "d.npz", train=20, test=4))
    saved = load_file(str(timm_folder / "model.safetensors"))
    weights = model.network.state_dict()
    assert saved["fc.weight"].shape == (10, 96) and weights["fc.weight"].shape == (2, 96)
    assert task.new_head == ["fc.bias", "fc.weight"]
    assert all(torch.equal(weights[name], value) for name, value in saved.items() if not name.startswith("fc."))
    assert model.head is model.network.fc  # the Fréchet distance reads the pooled features at the head

    model.eval()  # raw pixels in, normalised with the checkpoint's mean and std (0.5, 0.5)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(model(pixels), model.network((pixels.float() / 255 - 0.5) / 0.5))
    assert model.training_flops([0, 1], 1) == pytest.approx(6 * model.forward_flops)

    # A saved run rebuilds the same network from task.json alone: no weights are read from the folder.
    rebuilt = ImageClassificationTask.from_saved(tmp_path, task.state(), task.target)
    empty = rebuilt.build_model().network.state_dict()
    assert rebuilt.new_head == [] and not torch.equal(empty["conv1.0.weight"], saved["conv1.0.weight"])


@needs_vision
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_torchvision_file_builds_its_model_with_the_head_resized(
    tmp_path: Path, torchvision_state: dict[str, torch.Tensor], suffix: str
) -> None:
    folder = tmp_path / "torchvision"
    folder.mkdir()
    if suffix == ".pth":  # named as torch.hub caches torchvision's weights
        torch.save(torchvision_state, folder / "mobilenet_v3_small-047dcff4.pth")
    else:
        save_file(torchvision_state, folder / "mobilenet_v3_small.safetensors")
    task, model = _task(folder, write_npz(tmp_path / "d.npz", train=20, test=4))
    assert (task.checkpoint.library, task.checkpoint.network) == ("torchvision", "mobilenet_v3_small")
    assert task.new_head == ["classifier.3.bias", "classifier.3.weight"]
    assert model.head.out_features == 2 and list(model.mean) == pytest.approx([0.485, 0.456, 0.406])
    weights = model.network.state_dict()
    assert all(
        torch.equal(weights[name], value) for name, value in torchvision_state.items() if "classifier.3" not in name
    )
    model.eval()
    assert model(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)).shape == (3, 2)


def test_folders_without_a_usable_checkpoint_are_refused_naming_the_key(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", train=20, test=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    pickled = tmp_path / "pickled"  # what timm's save_for_hf writes by default
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architecture": TIMM_NETWORK, "num_classes": 10}))
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    for folder, message in [
        (empty, r"model\.backbone: .*empty holds no checkpoint: expected a timm folder"),
        (pickled, r"model\.backbone: .*pickled holds its weights only as pytorch_model\.bin, a pickle"),
    ]:
        with pytest.raises(ConfigError, match=message):
            forgeml.run(pretrained_config(npz, folder), workspace=tmp_path / "workspace")


@needs_vision
def test_a_file_named_after_no_torchvision_model_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, folder / "resnet18x-1234.safetensors")  # resnet18 needs a separator after it
    with pytest.raises(ConfigError, match=r"model\.backbone: .*resnet18x-1234\.safetensors is named after no torch"):
        vision.inspect_checkpoint(folder)
    torch.save({"w": torch.zeros(1)}, folder / "resnet18-f37072fd.pth")
    with pytest.raises(ConfigError, match=r"model\.backbone: .*weights holds 2 weight files"):
        vision.inspect_checkpoint(folder)


def test_weights_that_do_not_fit_the_network_are_refused_naming_them(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra": torch.zeros(1)}, folder / "resnet18.safetensors")
    checkpoint = vision.inspect_checkpoint(folder)
    network = vision.build_network(checkpoint, 2)
    with pytest.raises(ConfigError, match=r"does not fit torchvision's resnet18: weights missing bn1\.weight.*"):
        vision.load_pretrained(network, checkpoint, vision.head_name(network, checkpoint, 2))


def test_a_missing_library_names_the_extra_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": TIMM_NETWORK}))
    (folder / "model.safetensors").write_bytes(b"")

    def absent(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(vision.importlib, "import_module", absent)
    with pytest.raises(ConfigError, match=r"model\.backbone: .* needs timm and torchvision .*forgeml\[vision\]"):
        vision.inspect_checkpoint(folder)


def test_the_config_takes_a_folder_with_its_own_defaults_and_refuses_resnet_small_keys(tmp_path: Path) -> None:
    npz = write_npz(tmp_path / "d.npz", train=20, test=4)
    folder = tmp_path / "configs" / "checkpoint"
    folder.mkdir(parents=True)
    path = tmp_path / "configs" / "run.yaml"  # a relative backbone is found beside the config file
    path.write_text(yaml.safe_dump({**pretrained_config(npz, "checkpoint"), "train": {}}))
    config = load_config(path)
    assert config.model.backbone == str(folder) and config.family == "cnn-pretrained"
    defaults = FAMILY_DEFAULTS["cnn-pretrained"]
    assert (config.train.lr, config.train.batch_size, config.train.epochs) == (5e-4, 64, 10)
    assert config.train.early_stopping.metric == "accuracy" == defaults["early_stopping.metric"]
    assert config.data.augment is not None  # on by default, as for resnet_small

    base = pretrained_config(npz, folder)
    for model, message in [
        ({"width": 16}, r"model\.width: is for backbone 'resnet_small'"),
        ({"depths": [2, 2]}, r"model\.depths: is for backbone 'resnet_small'"),
        ({"backbone": "resnet18"}, r"model\.backbone: task 'image-classification' needs 'resnet_small' or a folder"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config({**base, "model": {**base["model"], **model}})
    # A saved run's config names its folder by absolute path; it still loads once the folder is gone.
    gone = load_config({**base, "model": {"backbone": str(tmp_path / "gone")}})
    assert gone.model.backbone == str(tmp_path / "gone")
