"""A small run end to end: the whole `forgeml run` command against the HF Trainer script doing the same work.

Both fine-tune all-MiniLM-L6-v2 on the same seeded 2,000 rows of SST-2's training set for one epoch
(batch 32, lr 5e-5, linear schedule with 6 % warm-up, weight decay 0.01, max length 128,
length-grouped batches) and evaluate on all 872 rows of the official validation set:

- ``forgeml``: ``forgeml run CONFIG --quiet`` in a fresh workspace, as a user runs it: it also profiles
  the data, fits the TF-IDF baseline, draws the plots, writes the model card, the manifest and the
  store record, and keeps a resumable checkpoint;
- ``trainer``: ``python benchmarks/trainer_script.py`` (`datasets` + `AutoModelForSequenceClassification`
  + `Trainer` with ``train_sampling_strategy="group_by_length"``, then `evaluate` and `save_model`).

Each command is timed whole, from process start to exit (interpreter start-up and imports included), as
a user waits for it. The commands alternate (forgeml, trainer, forgeml, trainer, ...) for ``--repeats``
rounds because the shared 2-core VM's speed drifts; the report gives the median wall time of each, the
ratio trainer/forgeml of the medians and per round, and each command's phases: forgeml's from the
``durations`` of its run record, the script's from its own JSON line, "start-up and the rest" being the
wall time the phases do not cover (interpreter start, imports, writing the record). CPU steal and other
processes' CPU share during each run (from /proc/stat) are recorded beside it.

Run from the repository root (about 1.5 minutes a round)::

    python benchmarks/run_wall_time.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_jiffies

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "datasets" / "sst2"
DEFAULT_OUT = REPO / "benchmarks" / "out" / "run_wall_time.json"

CONFIG = """\
name: sst2_small
task: text-classification
data:
  train: {train}
  validation: {validation}
  text: text
  label: label
  sample: {{train: {rows}}}
  split: {{validation: 0.0, test: 0.0, seed: 42}}
model: {{backbone: minilm, max_length: 128}}
train: {{epochs: 1, batch_size: 32, lr: 5.0e-5, warmup_ratio: 0.06, weight_decay: 0.01, seed: 42}}
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str, dict[str, float]]:
    """(wall seconds, stdout, CPU shares) of one command run to its end; raises if it fails."""
    steal_before, idle_before, total_before = cpu_jiffies()
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    steal_after, idle_after, total_after = cpu_jiffies()
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {finished.returncode}:\n{finished.stderr[-3000:]}")
    elapsed = max(total_after - total_before, 1)
    shares = {
        "steal": (steal_after - steal_before) / elapsed,
        "busy": 1 - (idle_after - idle_before) / elapsed,  # this command's CPU is most of it
    }
    return wall, finished.stdout, shares


def run_forgeml(config: Path, workspace: Path, env: dict[str, str]) -> dict[str, Any]:
    command = [
        str(Path(sys.executable).parent / "forgeml"),
        "run",
        str(config),
        "--workspace",
        str(workspace),
        "--quiet",
    ]
    wall, _, shares = timed(command, env)
    from forgeml.store import Store, database_url

    record = Store(database_url(workspace)).runs(limit=1)[0]
    metrics = json.loads((Path(record["path"]) / "metrics.json").read_text())
    phases = {name.removesuffix("_s"): seconds for name, seconds in record["durations"].items()}
    return {"wall_s": wall, "phases": phases, "accuracy": metrics["validation"]["accuracy"], **shares}


def run_trainer(out: Path, rows: int, env: dict[str, str]) -> dict[str, Any]:
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "trainer_script.py"),
        "--train",
        str(SST2 / "train.csv"),
        "--validation",
        str(SST2 / "validation.csv"),
        "--rows",
        str(rows),
        "--out",
        str(out),
    ]
    wall, stdout, shares = timed(command, env)
    result = json.loads(stdout.strip().splitlines()[-1])
    phases = {name.removesuffix("_s"): seconds for name, seconds in result["phases"].items()}
    return {"wall_s": wall, "phases": phases, "accuracy": result["accuracy"], **shares}


def phase_table(name: str, runs: list[dict[str, Any]]) -> list[str]:
    """Median seconds per phase, plus the wall time the phases do not cover."""
    phases = list(runs[0]["phases"])
    lines = [f"{name}: " + ", ".join(f"{p} {statistics.median(r['phases'][p] for r in runs):.1f} s" for p in phases)]
    rest = statistics.median(r["wall_s"] - sum(r["phases"].values()) for r in runs)
    lines[0] += f", start-up and the rest {rest:.1f} s"
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (SST2 / "train.csv").is_file():
        sys.exit(f"needs the SST-2 files in {SST2}")
    env = {
        **os.environ,
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    results: dict[str, list[dict[str, Any]]] = {"forgeml": [], "trainer": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        config = folder / "sst2_small.yaml"
        config.write_text(
            CONFIG.format(train=SST2 / "train.csv", validation=SST2 / "validation.csv", rows=args.rows),
            encoding="utf-8",
        )
        for round_index in range(args.repeats):
            results["forgeml"].append(run_forgeml(config, folder / f"workspace-{round_index}", env))
            results["trainer"].append(run_trainer(folder / f"trainer-{round_index}", args.rows, env))
            ours, peer = results["forgeml"][-1], results["trainer"][-1]
            print(
                f"round {round_index + 1}: forgeml {ours['wall_s']:.1f} s (accuracy {ours['accuracy']:.4f}, "
                f"steal {ours['steal']:.1%}), trainer {peer['wall_s']:.1f} s (accuracy {peer['accuracy']:.4f}, "
                f"steal {peer['steal']:.1%}): {peer['wall_s'] / ours['wall_s']:.2f}x",
                flush=True,
            )
    ours = statistics.median(r["wall_s"] for r in results["forgeml"])
    peer = statistics.median(r["wall_s"] for r in results["trainer"])
    paired = [p["wall_s"] / o["wall_s"] for o, p in zip(results["forgeml"], results["trainer"], strict=True)]
    print(f"\nmedian wall time: forgeml {ours:.1f} s, trainer script {peer:.1f} s: forgeml is {peer / ours:.2f}x")
    print("per round: " + ", ".join(f"{ratio:.2f}x" for ratio in paired))
    for name, runs in results.items():
        print("\n".join(phase_table(name, runs)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"rows": args.rows, "median_wall_s": {"forgeml": ours, "trainer": peer}, "ratio": peer / ours}
    args.out.write_text(json.dumps({**summary, "paired_ratios": paired, "runs": results}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
