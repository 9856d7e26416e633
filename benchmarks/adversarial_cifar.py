"""PGD adversarial training on the CIFAR-10 subset: clean and robust accuracy of a normal and a PGD-trained model.

Both runs are `forgeml run` on the same data with the same CPU-affordable recipe (examples/cifar10.yaml with a
narrower ResNet and fewer epochs); the second adds `train.adversarial: {method: pgd, epsilon: 8/255, steps: 2}`
(Madry et al. with a 2-step attack to fit this CPU). Both are then attacked on the same test images with the
same seeded attacks (what `forgeml audit RUN --baseline OTHER` does): FGSM and PGD-10 (random start, step
2.5 * epsilon / 10) at every epsilon of the curve.

    python benchmarks/adversarial_cifar.py            # ~6 min on a quiet 2-vCPU machine

Writes benchmarks/adversarial_cifar.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_jiffies

import forgeml
from forgeml.data.prepare import prepare
from forgeml.trust.image_attacks import epsilon_label, robustness_curve

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "datasets" / "cifar10_subset" / "cifar10_subset.npz"
EPSILONS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]


def recipe(name: str, width: int, epochs: int, adversarial: dict | None) -> dict:
    """examples/cifar10.yaml, narrower and shorter; early stopping off so both runs train the same epochs."""
    return {
        "name": name,
        "task": "image-classification",
        "data": {
            "train": str(DATA),
            "test": str(DATA),
            "split": {"validation": 0.1, "test": 0.0, "seed": 42},
            "augment": {"crop_padding": 4, "flip": True},
        },
        "model": {"backbone": "resnet_small", "width": width, "depths": [1, 1, 1]},
        "train": {"epochs": epochs, "early_stopping": None, "adversarial": adversarial, "seed": 42},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=2, help="PGD steps per training batch")
    parser.add_argument("--examples", type=int, default=1000, help="test images attacked")
    parser.add_argument("--pgd-steps", type=int, default=10)
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    steal_before, _, total_before = cpu_jiffies()
    started = time.perf_counter()
    adversarial = {"method": "pgd", "epsilon": 8 / 255, "steps": arguments.train_steps}
    runs = {
        "normal": recipe("cifar10_small", arguments.width, arguments.epochs, None),
        "pgd": recipe("cifar10_small_pgd", arguments.width, arguments.epochs, adversarial),
    }
    results: dict = {"recipe": {**vars(arguments), "epsilons": EPSILONS, "train_adversarial": adversarial}}
    with tempfile.TemporaryDirectory() as workspace:
        test = None
        for name, config in runs.items():
            clock = time.perf_counter()
            run = forgeml.run(config, workspace=workspace)
            train_seconds = time.perf_counter() - clock
            predictor = forgeml.load(run.run_dir)
            if test is None:  # the same rows for both models (the fixed test split, its first N images)
                split = prepare(predictor.config).splits["test"]
                test = predictor.task.encode(split.select(range(min(arguments.examples, len(split)))), "test")
            clock = time.perf_counter()
            curve = robustness_curve(
                predictor.model, test.inputs["pixels"], test.targets, EPSILONS, arguments.pgd_steps, seed=0
            )
            results[name] = {
                "run_seconds": round(train_seconds, 1),
                "attack_seconds": round(time.perf_counter() - clock, 1),
                "test_accuracy_full_split": run.metrics["test"]["accuracy"],
                "training_images_per_s": run.metrics.get("training", {}).get("samples_per_second"),
                "curve": curve,
            }
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "curve"}), flush=True)
    steal_after, _, total_after = cpu_jiffies()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["steal_share"] = round((steal_after - steal_before) / max(1, total_after - total_before), 3)
    (HERE / "adversarial_cifar.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'':22}" + "".join(f"{name:>10}" for name in runs))
    print(f"{'clean':22}" + "".join(f"{results[n]['curve']['clean']['accuracy']:>10.4f}" for n in runs))
    for index, row in enumerate(results["normal"]["curve"]["results"]):
        label = f"{row['attack']} {epsilon_label(row['epsilon'])}"
        print(f"{label:22}" + "".join(f"{results[n]['curve']['results'][index]['accuracy']:>10.4f}" for n in runs))
    print(f"whole script: {results['seconds']:.0f} s, steal {results['steal_share']:.1%}")


if __name__ == "__main__":
    main()
