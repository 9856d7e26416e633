"""Does masked-LM continued pre-training help a classifier trained on few labels?

Fine-tunes a text classifier on the same seeded 500 labelled SST-2 training rows from two backbones: the
bundled all-MiniLM-L6-v2, and the same model after `examples/minilm_mlm.yaml` (masked-LM training on the
unlabelled SST-2 training sentences; give its run directory). Three training seeds each; accuracy on the
872 rows of the official validation set, mean and spread, whichever way it goes.

Run from the repository root, after `forgeml run examples/minilm_mlm.yaml` (about 5 minutes)::

    python benchmarks/mlm_downstream.py runs/minilm_mlm/latest
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import forgeml

SEEDS = (1, 2, 3)
SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "sst2"


def config(backbone: str, seed: int) -> dict:
    return {
        "name": "sst2_500",
        "task": "text-classification",
        "data": {
            "train": str(SST2 / "train.csv"),
            "test": str(SST2 / "validation.csv"),
            "sample": {"train": 500},  # the same 500 rows for every run (seeded by data.split.seed)
            "split": {"validation": 0.1, "test": 0.0, "seed": 42},
        },
        "model": {"backbone": backbone, "max_length": 64},
        "train": {"epochs": 5, "batch_size": 16, "lr": 1e-4, "seed": seed},
        "evaluate": {"baseline": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrained", help="the masked-LM run directory (or runs/minilm_mlm/latest)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as workspace:
        for name, backbone in (("minilm", "minilm"), ("minilm + masked-LM", args.pretrained)):
            scores = []
            for seed in SEEDS:
                run = forgeml.run(config(backbone, seed), workspace=workspace)
                scores.append(run.metrics["test"]["accuracy"])
                print(json.dumps({"backbone": name, "seed": seed, "accuracy": scores[-1]}), flush=True)
            results[name] = {
                "accuracies": scores,
                "mean": statistics.mean(scores),
                "stdev": statistics.stdev(scores),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
