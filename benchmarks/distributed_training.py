"""`forgeml run --nproc 2` against one process, on the Adult MLP and on MiniLM (2,000 SST-2 rows).

For each config: one process with 2 threads (`train.threads=2`), then 2 processes with 1 thread each
(`--nproc 2 train.threads=1`), alternated `--repeats` times, each through the CLI in a fresh workspace.
Reports the optimizer steps (must be equal: the same global batch), the validation metrics (target:
within 0.5 point), and the wall time of each, honestly: on 2 cores, 2 x 1 thread has no more arithmetic
to spend than 1 x 2, and pays for gradient all-reduces and a second copy of the data and model.

    python benchmarks/distributed_training.py            # ~15 min

Writes benchmarks/distributed_training.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from forgeml.store import Store, database_url
from forgeml.workspace import read_json

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "adult": (HERE.parent / "examples" / "adult.yaml", "roc_auc"),
    "sst2_minilm": (HERE.parent / "examples" / "loop" / "sst2.yaml", "accuracy"),
}


def timed_run(config: Path, processes: int, threads: int) -> dict:
    workspace = Path(tempfile.mkdtemp(prefix="forgeml-ddp-"))
    command = [sys.executable, "-m", "forgeml.cli", "run", str(config), f"train.threads={threads}"]
    command += ["--nproc", str(processes), "--workspace", str(workspace), "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    (record,) = Store(database_url(workspace)).runs()
    metrics = read_json(Path(record["path"]) / "metrics.json")
    return {
        "processes": processes,
        "threads": threads,
        "wall_seconds": round(seconds, 1),
        "train_seconds": round(metrics["training"]["seconds"], 1),
        "steps": metrics["training"]["steps"],
        "validation": {k: round(v, 4) for k, v in metrics["validation"].items() if isinstance(v, float)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None)
    args = parser.parse_args()
    results = {}
    for name, (config, metric) in CONFIGS.items():
        if args.only and name != args.only:
            continue
        runs = []
        for _ in range(args.repeats):
            for processes, threads in ((1, 2), (2, 1)):
                runs.append(timed_run(config, processes, threads))
                print(json.dumps({name: runs[-1]}), flush=True)
        one = [run for run in runs if run["processes"] == 1]
        two = [run for run in runs if run["processes"] == 2]
        results[name] = {
            "config": str(config.relative_to(HERE.parent)),
            "metric": metric,
            "runs": runs,
            "same_steps": all(run["steps"] == one[0]["steps"] for run in runs),
            "metric_difference_points": round(100 * (two[0]["validation"][metric] - one[0]["validation"][metric]), 2),
            "wall_ratio_2x1_over_1x2": round(
                sum(r["wall_seconds"] for r in two) / sum(r["wall_seconds"] for r in one), 2
            ),
        }
    (HERE / "distributed_training.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
