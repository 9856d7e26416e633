"""Training images/s of `forgeml run examples/cifar10.yaml` against the plain PyTorch loop a user would write.

The peer trains the same model (forgeml's ResNetSmall, its own augmentation switched off) on the same
training rows with the same optimiser, schedule and epochs, through a `DataLoader` over the uint8 arrays
whose `Dataset` augments each image as torchvision's RandomCrop(32, padding=4, reflect) and
RandomHorizontalFlip would (written in torch, torchvision not being installed). Both run in this process,
one after the other, on the same threads; each reports its training images/s (training steps only) and
its test accuracy.

    python benchmarks/image_throughput.py --epochs 3      # ~8 min

Writes benchmarks/image_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional
from torch.utils.data import DataLoader, Dataset

import forgeml
from forgeml.config import load_config
from forgeml.models.cnn import ResNetSmall
from forgeml.tasks import build_task, prepare_data
from forgeml.train.loop import make_optimizer, make_scheduler, seed_everything

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "cifar10.yaml"


class AugmentedImages(Dataset):
    """Per-image augmentation in __getitem__, as a torchvision transform pipeline does it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 4):
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float()
        padded = functional.pad(image[None], (self.padding,) * 4, mode="reflect")[0]
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
        if torch.rand(()) < 0.5:
            image = image.flip(2)
        return image, self.labels[index]


def peer(config, epochs: int, workers: int) -> dict:
    data = prepare_data(config)
    seed_everything(config.train.seed)
    task = build_task(config, data.input_columns)
    task.fit(data.train)
    train = task.encode(data.train, "train")
    test = task.encode(data.test, "test")
    height, width, channels = task.image_shape
    model = ResNetSmall(
        task.target.num_outputs, (channels, height, width), task.mean, task.std, config.model.width, config.model.depths
    )  # no augmentation inside: the DataLoader's Dataset does it
    loader = DataLoader(
        AugmentedImages(train.inputs["pixels"], train.targets),
        batch_size=config.train.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    train_config = config.train.model_copy(update={"epochs": epochs})
    optimizer = make_optimizer(model, train_config)
    scheduler = make_scheduler(optimizer, train_config, epochs * math.ceil(len(train) / config.train.batch_size))
    model.train()
    seconds, images = 0.0, 0
    tick = time.perf_counter()
    for _ in range(epochs):
        for pixels, labels in loader:
            loss = functional.cross_entropy(model(pixels), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            images += len(labels)
    seconds = time.perf_counter() - tick
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test.inputs["pixels"][i : i + 256]).argmax(1) for i in range(0, len(test), 256)])
    accuracy = float((predicted == test.targets).float().mean())
    return {
        "images_per_second": round(images / seconds, 1),
        "train_seconds": round(seconds, 1),
        "test_accuracy": accuracy,
    }


def ours(config) -> dict:
    result = forgeml.run(config, workspace=Path(tempfile.mkdtemp(prefix="forgeml-images-")))
    training = result.metrics["training"]
    return {
        "images_per_second": round(training["samples_per_second"], 1),
        "train_seconds": round(training["seconds"], 1),
        "test_accuracy": result.metrics["test"]["accuracy"],
        "mfu": round(training["mfu"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="the peer's DataLoader workers")
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}", "train.early_stopping=null", "evaluate.baseline=false"]
    config = load_config(CONFIG, overrides)
    results = {"epochs": args.epochs, "forgeml": ours(config), "peer": peer(config, args.epochs, args.workers)}
    results["speed_ratio"] = round(results["forgeml"]["images_per_second"] / results["peer"]["images_per_second"], 2)
    print(json.dumps(results, indent=1))
    (HERE / "image_throughput.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
