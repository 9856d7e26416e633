"""Tuning the Adult MLP: does the search beat the default config, and what does pruning save?

1. The default config (examples/adult.yaml's settings) is run once: its validation ROC-AUC is the bar.
2. Study A: `--trials` TPE trials with the median pruner (examples/adult_tune.yaml).
3. Study B: the same trials, seed and space without pruning.
4. Study A's best config is run again as a normal run: its test metrics are reported (the search never
   read the test split).

Reports the best validation ROC-AUC of each study, the summed trial time of each (pruning should save at
least 40 % at an equal-or-better best value), and the steal time of the machine while it ran.

    python benchmarks/tune_adult.py --trials 30       # ~30 min on 2 cores

Writes benchmarks/tune_adult.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import forgeml
from forgeml.tuning import BEST_CONFIG, STUDIES

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "adult_tune.yaml"


def steal() -> tuple[int, int]:
    """(steal, total) jiffies from /proc/stat: how much of the machine another tenant took."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7], sum(fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--workspace", type=Path, default=None)
    args = parser.parse_args()
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="forgeml-tune-"))
    started, steal_before = time.perf_counter(), steal()

    default = forgeml.run(CONFIG, ["name=adult_default"], workspace=workspace)
    print(f"default: validation roc_auc {default.metrics['validation']['roc_auc']:.4f}", flush=True)
    studies = {}
    for study, pruner in (("adult_pruned", "median"), ("adult_unpruned", "none")):
        clock = time.perf_counter()
        overrides = [f"tune.study={study}", f"tune.pruner={pruner}", f"tune.trials={args.trials}"]
        summary = forgeml.tune(CONFIG, overrides, workspace=workspace)
        studies[study] = {
            "pruner": pruner,
            "best_validation_roc_auc": round(summary["best"]["value"], 4),
            "best_params": summary["best"]["params"],
            "states": summary["states"],
            "trial_seconds": summary["trial_seconds"],
            "wall_seconds": round(time.perf_counter() - clock, 1),
        }
        print(json.dumps({study: studies[study]}), flush=True)
    best = forgeml.run(workspace / STUDIES / "adult_pruned" / BEST_CONFIG, ["name=adult_best"], workspace=workspace)
    steal_after = steal()
    pruned, unpruned = studies["adult_pruned"], studies["adult_unpruned"]
    summary = {
        "config": str(CONFIG.relative_to(HERE.parent)),
        "trials": args.trials,
        "default": {
            "validation_roc_auc": round(default.metrics["validation"]["roc_auc"], 4),
            "test": {k: round(v, 4) for k, v in default.metrics["test"].items() if isinstance(v, float)},
        },
        "studies": studies,
        "best_retrained_test": {k: round(v, 4) for k, v in best.metrics["test"].items() if isinstance(v, float)},
        "best_retrained_validation_roc_auc": round(best.metrics["validation"]["roc_auc"], 4),
        "pruning_saves": round(1 - pruned["trial_seconds"] / unpruned["trial_seconds"], 3),
        "pruned_best_at_least_unpruned": pruned["best_validation_roc_auc"] >= unpruned["best_validation_roc_auc"],
        "search_beats_default": pruned["best_validation_roc_auc"] > round(default.metrics["validation"]["roc_auc"], 4),
        "steal_share": round((steal_after[0] - steal_before[0]) / max(1, steal_after[1] - steal_before[1]), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (HERE / "tune_adult.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
