"""An 8-trial study of MiniLM on 2,000 SST-2 sentences (examples/sst2_tune.yaml) against its default config.

The default config (the study's base: lr 1e-4, warm-up 6 %, batch 32) is run once; then the study runs;
both validation accuracies are reported (the target: the best trial beats or ties the default), with the
study's trial states and time, and the test accuracy of the best trial's run.

    python benchmarks/tune_minilm.py          # ~25 min on 2 cores

Writes benchmarks/tune_minilm.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import forgeml
from forgeml.workspace import read_json

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "sst2_tune.yaml"


def main() -> int:
    workspace = Path(tempfile.mkdtemp(prefix="forgeml-tune-minilm-"))
    started = time.perf_counter()
    default = forgeml.run(CONFIG, ["name=sst2_default"], workspace=workspace)
    print(f"default: validation accuracy {default.metrics['validation']['accuracy']:.4f}", flush=True)
    summary = forgeml.tune(CONFIG, workspace=workspace)
    best = summary["best"]
    best_metrics = read_json(Path(best["run_dir"]) / "metrics.json")
    result = {
        "config": str(CONFIG.relative_to(HERE.parent)),
        "default": {
            "validation_accuracy": round(default.metrics["validation"]["accuracy"], 4),
            "test_accuracy": round(default.metrics["test"]["accuracy"], 4),
        },
        "study": {
            "trials": summary["trials"],
            "states": summary["states"],
            "trial_seconds": summary["trial_seconds"],
            "best_trial": best["number"],
            "best_params": best["params"],
            "best_validation_accuracy": round(best["value"], 4),
            "best_run_test_accuracy": round(best_metrics["test"]["accuracy"], 4),
        },
        "best_beats_or_ties_default": round(best["value"], 4) >= round(default.metrics["validation"]["accuracy"], 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (HERE / "tune_minilm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
