"""Pre-trained image classifiers from a local checkpoint folder (timm or torchvision), fine-tuned with a new head
for the run's classes.

Like the small ResNet (models/cnn.py), the model takes raw pixels in 0..255, augments them while training (the
same `Augment`) and normalises them with buffers saved beside the weights: here the checkpoint's own mean and
standard deviation, those its weights were trained with. timm and torchvision are imported only when such a
backbone is used (`pip install 'forgeml[vision]'`).

Two folder layouts, told apart by what they hold:
- timm, as `timm.models.save_for_hf(model, folder, safe_serialization=True)` writes it (the Hugging Face hub
  layout): config.json naming the `architecture`, with its `model_args` and `pretrained_cfg` (mean, std, input
  size, the classifier's module), beside model.safetensors;
- torchvision, as torch.hub caches its weights: one `<model name>[-hash].pth` or `.safetensors` file, e.g.
  resnet18-f37072fd.pth; the architecture is the longest torchvision model name the file name starts with.

The plain ResNets (resnet18 ... resnet152, the same weight names in both libraries) are built by forgeml itself
(models/resnet.py), so their checkpoints need neither library, whatever the torch build; other networks need the
library that made them.

Weights are never unpickled: a `.pth` is read with `torch.load(weights_only=True)` (tensors only), and a timm
folder holding only pytorch_model.bin (a pickle) is refused.
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from forgeml.errors import ConfigError
from forgeml.models.cnn import Augment
from forgeml.models.flops import forward_flops
from forgeml.models.resnet import LAYOUTS, ResNet

TIMM, TORCHVISION = "timm", "torchvision"
INSTALL = "pip install 'forgeml[vision]'"
# torchvision's weights are trained on ImageNet images normalised with these (its transforms' defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_CONFIG, TIMM_WEIGHTS, TIMM_PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".pth")
KEY = "model.backbone"
# timm model arguments the built-in ResNets honour (None: any value), as timm's save_for_hf records them.
BUILT_IN_ARGS = {"in_chans": None, "global_pool": "avg"}
SHOWN_KEYS = 5  # weight names listed in an error before "and N more"


@dataclass
class Checkpoint:
    """What a checkpoint folder holds: which network, how it is built and how its inputs are normalised."""

    library: str  # timm or torchvision
    network: str  # the library's model name, e.g. resnet50 (timm's `architecture`)
    model_args: dict[str, Any] = field(default_factory=dict)  # further arguments of the library's model factory
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per channel, pixels scaled to 0..1
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    channels: int = 3  # input channels the network takes
    input_size: list[int] | None = None  # (height, width) the weights were trained at, when the folder says
    fixed_size: bool = False  # the network takes input_size only (e.g. a ViT's position embeddings)
    head: list[str] = field(default_factory=list)  # timm: the classifier module(s); torchvision: found when built
    weights: Path | None = None  # the pre-trained weights' file; None for a saved run rebuilt without them

    def state(self) -> dict[str, Any]:
        """As JSON (for task.json): everything but the weights' file, which a saved run does not need."""
        state = asdict(self)
        del state["weights"]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Checkpoint:
        names = {"library", "network", "model_args", "mean", "std", "channels", "input_size", "fixed_size", "head"}
        return cls(**{name: value for name, value in state.items() if name in names})


def inspect_checkpoint(folder: str | Path) -> Checkpoint:
    """The checkpoint in `folder`, told by its files (timm's config.json, else one torchvision weights file).

    Raises ConfigError naming model.backbone, the folder and the layout expected when it holds neither."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"{KEY}: {folder} is not a folder; task 'image-classification' needs 'resnet_small' or a folder holding "
            "a pre-trained timm or torchvision checkpoint"
        )
    if (folder / TIMM_CONFIG).is_file():
        return _timm_checkpoint(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        _refuse_pickle(folder)
        raise ConfigError(
            f"{KEY}: {folder} holds no checkpoint: expected a timm folder ({TIMM_CONFIG} and {TIMM_WEIGHTS}, as "
            "timm's save_for_hf writes them) or a torchvision one (one .pth or .safetensors file named after its "
            "model, e.g. resnet18-f37072fd.pth)"
        )
    if len(files) > 1:
        raise ConfigError(
            f"{KEY}: {folder} holds {len(files)} weight files ({', '.join(p.name for p in files)}); a torchvision "
            "checkpoint folder holds one"
        )
    return _torchvision_checkpoint(folder, files[0])


def _timm_checkpoint(folder: Path) -> Checkpoint:
    try:
        config = json.loads((folder / TIMM_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{KEY}: {folder / TIMM_CONFIG} is not readable JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ConfigError(
            f"{KEY}: {folder / TIMM_CONFIG} names no 'architecture': not a timm checkpoint (timm's save_for_hf "
            "writes config.json with the architecture and model.safetensors)"
        )
    if not (folder / TIMM_WEIGHTS).is_file():
        _refuse_pickle(folder)
        raise ConfigError(f"{KEY}: {folder} has {TIMM_CONFIG} but no {TIMM_WEIGHTS} (the timm checkpoint's weights)")
    architecture = config["architecture"]
    pretrained = config.get("pretrained_cfg") or {}
    model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}  # the run's own
    if not _built_in(architecture, model_args) and not (timm := _library(TIMM)).is_model(architecture):
        raise ConfigError(
            f"{KEY}: {folder / TIMM_CONFIG} names architecture {architecture!r}, which timm {timm.__version__} does "
            "not know"
        )
    input_size = pretrained.get("input_size")
    channels = int(model_args.get("in_chans") or (input_size[0] if input_size else 3))
    mean = [float(v) for v in pretrained.get("mean", IMAGENET_MEAN)]
    std = [float(v) for v in pretrained.get("std", IMAGENET_STD)]
    if len(mean) != channels or len(std) != channels or not all(0 <= v <= 1 for v in mean) or min(std) <= 0:
        raise ConfigError(
            f"{KEY}: {folder / TIMM_CONFIG}: pretrained_cfg mean {mean} and std {std} should give each of the "
            f"{channels} channels a value in 0..1 (pixels scaled to 0..1)"
        )
    classifier = pretrained.get("classifier") or []
    return Checkpoint(
        library=TIMM,
        network=architecture,
        model_args=model_args,
        mean=mean,
        std=std,
        channels=channels,
        input_size=[int(v) for v in input_size[1:]] if input_size else None,
        fixed_size=bool(pretrained.get("fixed_input_size", False)),
        head=[classifier] if isinstance(classifier, str) else list(classifier),
        weights=folder / TIMM_WEIGHTS,
    )


def _torchvision_checkpoint(folder: Path, file: Path) -> Checkpoint:
    stem = file.name.removesuffix(file.suffix)

    def named_after(name: str) -> bool:
        # A name counts when the file name goes on with something other than a letter or digit (resnet18-f37072fd,
        # efficientnet_b0_rwightman-7f5810bc): resnet10 would not be taken for a resnet101 file.
        return stem.startswith(name) and (len(stem) == len(name) or not stem[len(name)].isalnum())

    names = [name for name in LAYOUTS if named_after(name)]  # built here: torchvision is not needed
    if not names:
        names = [name for name in _library(TORCHVISION).models.list_models() if named_after(name)]
    if not names:
        raise ConfigError(
            f"{KEY}: {file} is named after no torchvision model: a torchvision checkpoint's file name starts with "
            "its model's name as torchvision.models.list_models() gives it (resnet18-f37072fd.pth, "
            "mobilenet_v3_small.safetensors); a timm checkpoint needs config.json beside model.safetensors"
        )
    return Checkpoint(library=TORCHVISION, network=max(names, key=len), weights=file)


def _refuse_pickle(folder: Path) -> None:
    if (folder / TIMM_PICKLE).is_file():
        raise ConfigError(
            f"{KEY}: {folder} holds its weights only as {TIMM_PICKLE}, a pickle, which forgeml never loads; convert "
            f"it to {TIMM_WEIGHTS} (safetensors), e.g. with timm: save_for_hf(model, folder, "
            "safe_serialization=True), or safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{TIMM_WEIGHTS}')"
        )


def _library(name: str) -> ModuleType:
    """timm or torchvision, imported now that a checkpoint needs it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ConfigError(
            f"{KEY}: a pre-trained image checkpoint needs timm and torchvision ({error}): {INSTALL}"
        ) from None
    except Exception as error:  # e.g. a torchvision built for another torch: "operator ... does not exist"
        raise ConfigError(
            f"{KEY}: {name} is installed but does not import ({type(error).__name__}: {error}); install the "
            f"torchvision release built for this torch ({torch.__version__}, CPU or CUDA alike), then {INSTALL}"
        ) from None


def _built_in(network: str, model_args: dict[str, Any]) -> bool:
    """Whether forgeml builds this network itself (models/resnet.py): a plain ResNet with no other options."""
    return network in LAYOUTS and all(
        key in BUILT_IN_ARGS and BUILT_IN_ARGS[key] in (None, value) for key, value in model_args.items()
    )


def build_network(checkpoint: Checkpoint, num_classes: int) -> nn.Module:
    """The checkpoint's network with a new head of `num_classes` outputs, weights random (load them after)."""
    if _built_in(checkpoint.network, checkpoint.model_args):
        return ResNet(checkpoint.network, num_classes, checkpoint.channels)
    try:
        if checkpoint.library == TIMM:
            return _library(TIMM).create_model(
                checkpoint.network, pretrained=False, num_classes=num_classes, **checkpoint.model_args
            )
        return _library(TORCHVISION).models.get_model(
            checkpoint.network, weights=None, num_classes=num_classes, **checkpoint.model_args
        )
    except ConfigError:
        raise
    except Exception as error:  # the library's own message says what it could not build
        raise ConfigError(
            f"{KEY}: {checkpoint.library} cannot build {checkpoint.network!r} with {num_classes} classes "
            f"({type(error).__name__}: {error})"
        ) from None


def head_name(network: nn.Module, checkpoint: Checkpoint, num_classes: int) -> str:
    """The module that gives the class scores: timm's `classifier` (config.json), else the last linear or
    convolution layer with `num_classes` outputs (torchvision's fc, classifier.3, heads.head, ...)."""
    if checkpoint.head:
        return checkpoint.head[0]
    found = None
    for name, module in network.named_modules():
        outputs = getattr(module, "out_features", getattr(module, "out_channels", None))
        if isinstance(module, nn.Linear | nn.Conv2d) and outputs == num_classes:
            found = name
    if found is None:
        raise ConfigError(f"{KEY}: {checkpoint.network} has no layer with {num_classes} outputs to train as its head")
    return found


def load_pretrained(network: nn.Module, checkpoint: Checkpoint, head: str) -> list[str]:
    """Load the checkpoint's weights into `network`, all but its classifier's where their shape differs (the run's
    classes are not the checkpoint's); returns those left to train from scratch. Any other weight missing, left
    over or of another shape is an error naming it: the folder is not that network's checkpoint."""
    assert checkpoint.weights is not None, "a saved run's model is rebuilt from its own weights"
    state = read_weights(checkpoint.weights)
    own = network.state_dict()
    heads = [*checkpoint.head, head]

    def in_head(key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in heads)

    mismatched = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
    dropped = [key for key in mismatched if in_head(key)]
    wrong = [
        f"{key} {tuple(state[key].shape)} (the network's is {tuple(own[key].shape)})"
        for key in mismatched
        if key not in dropped
    ]
    kept = OrderedDict((key, value) for key, value in state.items() if key not in mismatched)
    if hasattr(state, "_metadata"):  # module versions, which some modules read to convert older checkpoints
        kept._metadata = state._metadata  # type: ignore[attr-defined]
    result = network.load_state_dict(kept, strict=False)
    missing = [key for key in result.missing_keys if not in_head(key)]
    unexpected = [key for key in result.unexpected_keys if not in_head(key)]
    problems = [
        f"{label} {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
        if keys
    ]
    if problems:
        raise ConfigError(
            f"{KEY}: {checkpoint.weights} does not fit {checkpoint.library}'s {checkpoint.network}: weights "
            + "; ".join(problems)
        )
    return sorted({*dropped, *(key for key in result.missing_keys if in_head(key))})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pth file read without unpickling anything but tensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable, truncated, or a pickle of more than tensors
        raise ConfigError(
            f"{KEY}: cannot read {path} as a state dict of tensors ({type(error).__name__}: {error}); save the "
            "model's state_dict() (torch.save or safetensors), not the model object"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"{KEY}: {path} is not a state dict (weight names to tensors); save model.state_dict()")
    return state


def _listed(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


class PretrainedImageModel(nn.Module):
    """A pre-trained network behind the small ResNet's front: raw pixels N x C x H x W in 0..255 (uint8 or float),
    augmented while training, normalised with the checkpoint's per-channel `mean` and `std` (on pixels scaled to
    0..1; buffers, saved with the weights), then the network's class scores.

    Grey images (one channel) into a colour network are given their one value on every channel."""

    def __init__(
        self,
        network: nn.Module,
        image_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        head: str,
        augment: dict | None = None,
    ):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.augment = Augment(**(augment or {"crop_padding": 0, "flip": False}))
        self.head_name = head
        channels, height, width = image_shape
        self.grey = channels == 1 and len(mean) > 1
        blank = torch.zeros(1, len(mean), height, width)
        self.forward_flops = forward_flops(network, lambda: network(blank))

    @property
    def head(self) -> nn.Module:
        """The classifier layer (its input is the pooled features: the Fréchet distance reads them there)."""
        return self.network.get_submodule(self.head_name)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        if self.grey:
            x = x.expand(-1, self.mean.numel(), -1, -1)
        x = self.augment(x, self.mean * 255.0)  # cutout paints the mean: zero once normalised
        x = (x / 255.0 - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.network(x)

    def training_flops(self, rows: torch.Tensor | list[int], padded_length: int) -> float:
        return 3.0 * self.forward_flops * len(rows)  # backward ~ twice the forward
