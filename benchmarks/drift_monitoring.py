"""Drift monitoring: false alarms on windows from the training distribution, detection of real shifts.

Two models are trained here on real data (``../shared/datasets``):

- ``sst2``: MiniLM fine-tuned for one epoch on 2,000 SST-2 training sentences (text-classification);
- ``adult``: the MLP on UCI Adult (tabular-classification), the example config's shape.

Both carve their validation split (and a held-out "test" split) from the training file. A
`DriftMonitor` is built on each run exactly as a server would (training rows and, for the model's own
statistics, the validation rows, as its default `model_reference="auto"` picks). Windows are drawn from
the held-out split, rows the reference never saw, so they come from the training distribution:

- false alarms: 100 windows of 200, 500 and 1,000 rows each for SST-2, 1,000 each for Adult (its checks
  cost ~20 ms, and 100 windows only pin a rate down to about +-5 points); the bar is at most 5 % flagged
  (the monitor's alpha is 0.05 family-wise, Holm over every test of a window);
- detection, 100 windows of 500 rows each, the bar at least 80 % flagged:
  ``sms``: the SST-2 model receives SMS messages (``sms_spam/sms_spam.csv``);
  ``age+15``: Adult rows with ``age`` 15 years older (the model's answers recomputed);
  ``prior``: windows resampled by true label so the positive share moves 30 points from the training
  prior (SST-2: 56 % -> 26 % positive; Adult: 24 % -> 54 % above 50K);
  and, to show where detection fades, milder ones: 20 % SMS mixed in, ``age+3``, a 10-point prior shift.

The pools (held-out rows, SMS, shifted Adult) go through the model once; a window is an index set into
a pool (`Window.take`), so each check costs only its tests. The domain classifier's p-value uses 199
label shufflings per window (`DriftMonitor(permutations=199)`, its default).

Run from the repository root (about 10-15 minutes on a 2-core CPU; the models train first)::

    python benchmarks/drift_monitoring.py
    python benchmarks/drift_monitoring.py --workspace /tmp/drift-ws   # keep (and reuse) the trained runs

Results: a Markdown table on stdout and JSON in ``benchmarks/drift_results.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

import forgeml
from forgeml.data.io import column, read_table
from forgeml.data.prepare import prepare
from forgeml.monitor import DriftMonitor, Window
from forgeml.workspace import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_jiffies, cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "drift_results.json"
SIZES = (200, 500, 1000)
DETECTION_SIZE = 500
SHIFT = 0.30  # the class-prior shift, in points of the positive share

CONFIGS: dict[str, dict[str, Any]] = {
    "sst2": {
        "name": "sst2-drift",
        "task": "text-classification",
        "data": {
            "train": str(DATASETS / "sst2" / "train.csv"),
            "text": "text",
            "label": "label",
            "sample": {"train": 2000, "validation": 1000, "test": 6000},
            "split": {"validation": 0.05, "test": 0.15, "seed": 42},
        },
        "model": {"backbone": "minilm", "max_length": 64},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-4, "warmup_ratio": 0.06, "seed": 42, "early_stopping": None},
    },
    "adult": {
        "name": "adult-drift",
        "task": "tabular-classification",
        "data": {
            "train": str(DATASETS / "adult" / "train.csv"),
            "label": "income",
            "features": [
                "age",
                "workclass",
                "fnlwgt",
                "education",
                "education_num",
                "marital_status",
                "occupation",
                "relationship",
                "race",
                "sex",
                "capital_gain",
                "capital_loss",
                "hours_per_week",
                "native_country",
            ],
            "split": {"validation": 0.1, "test": 0.3, "seed": 42},
            "clean": {"dedupe": False},
        },
        "model": {"backbone": "mlp", "hidden_sizes": [128, 64], "dropout": 0.2},
        "train": {
            "epochs": 10,
            "batch_size": 256,
            "lr": 1e-3,
            "weight_decay": 1e-4,
            "warmup_ratio": 0.0,
            "scheduler": "cosine",
            "early_stopping": {"patience": 3, "metric": "roc_auc"},
        },
    },
}
POSITIVE = {"sst2": "positive", "adult": ">50K"}


def trained_run(name: str, workspace: Path) -> tuple[Path, float, dict[str, Any]]:
    """The run of CONFIGS[name]: reused when the workspace has a finished one, else trained now."""
    config = CONFIGS[name]
    runs = workspace / "runs" / config["name"]
    finished = sorted(p for p in runs.glob("*") if (p / "manifest.json").is_file()) if runs.is_dir() else []
    if finished:
        metrics = json.loads((finished[-1] / "metrics.json").read_text())
        return finished[-1], 0.0, metrics.get("test", {})
    clock = time.perf_counter()
    result = forgeml.run(config, workspace=workspace)
    return result.run_dir, time.perf_counter() - clock, result.metrics.get("test", {})


def concat(first: Window, second: Window) -> Window:
    """Two described pools as one (rows of `first`, then of `second`)."""
    joined = {
        name: None if values is None else np.concatenate([values, getattr(second, name)])
        for name, values in vars(first).items()
        if name not in ("size", "columns")
    }
    columns = {name: np.concatenate([values, second.columns[name]]) for name, values in first.columns.items()}
    return Window(size=first.size + second.size, columns=columns, **joined)


def alarm_rate(
    monitor: DriftMonitor, draws: list[np.ndarray], pool: Window, required: bool | None = None
) -> dict[str, Any]:
    """Share of windows (index sets into `pool`) flagged, with a 95 % interval, which tests fired, and
    the seconds per check. `required`: a detection scenario the acceptance bar applies to."""
    flagged, fired, seconds, aucs = 0, Counter(), [], []
    for rows in draws:
        clock = time.perf_counter()
        result = monitor.compare(pool.take(rows))
        seconds.append(time.perf_counter() - clock)
        flagged += result["drift"]
        fired.update(result["drifted"])
        if "text" in result:
            aucs.append(result["text"]["domain"]["auc"])
    interval = binomtest(flagged, len(draws)).proportion_ci(0.95)
    outcome = {
        "windows": len(draws),
        "rows": len(draws[0]),
        "flagged": flagged,
        "rate": flagged / len(draws),
        "ci95": [round(interval.low, 4), round(interval.high, 4)],
        "tests_fired": dict(fired.most_common()),
        "seconds_per_check": round(float(np.mean(seconds)), 4),
    }
    if aucs:
        outcome["domain_auc_mean"] = round(float(np.mean(aucs)), 4)
    if required is not None:
        outcome["required"] = required
    return outcome


def random_windows(pool_rows: int, size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.choice(pool_rows, size, replace=False) for _ in range(count)]


def prior_windows(
    labels: list[str], positive: str, target: float, size: int, count: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Windows with `target` share of rows whose true label is `positive`, each side drawn at random."""
    truth = np.asarray(labels) == positive
    yes, no = np.flatnonzero(truth), np.flatnonzero(~truth)
    take = round(size * target)
    return [
        np.r_[rng.choice(yes, take, replace=False), rng.choice(no, size - take, replace=False)] for _ in range(count)
    ]


def prior_target(prior: float, points: float) -> float:
    """The prior moved by `points`, upwards unless that leaves [0.05, 0.95]."""
    return prior + points if prior + points <= 0.95 else prior - points


def benchmark_text(monitor: DriftMonitor, count: int, rng: np.random.Generator) -> dict[str, Any]:
    config = monitor.predictor.config
    clock = time.perf_counter()
    reference = monitor.reference
    built = time.perf_counter() - clock
    held_out = prepare(config).splits["test"]
    clock = time.perf_counter()
    pool = monitor.describe(held_out)
    described = time.perf_counter() - clock
    sms_texts = [str(t) for t in column(read_table(DATASETS / "sms_spam" / "sms_spam.csv"), "text")]
    sms = monitor.describe(sms_texts)
    labels = [str(v) for v in column(held_out, config.data.label)]
    prior = float(np.mean(np.asarray([str(v) for v in column(prepare(config).splits["train"], "label")]) == "positive"))
    results: dict[str, Any] = {
        "reference": reference.sources,
        "reference_seconds": round(built, 1),
        "pool": {
            "held_out_rows": pool.size,
            "sms_rows": sms.size,
            "describe_rows_per_s": round(pool.size / described, 1),
        },
        "train_prior_positive": round(prior, 4),
        "false_alarms": {},
        "detection": {},
    }
    for size in SIZES:
        results["false_alarms"][str(size)] = alarm_rate(monitor, random_windows(pool.size, size, count, rng), pool)
        print(f"  sst2 false alarms @ {size}: {results['false_alarms'][str(size)]['rate']:.2%}", flush=True)
    detection = results["detection"]
    detection["sms"] = alarm_rate(monitor, random_windows(sms.size, DETECTION_SIZE, count, rng), sms, required=True)
    for points in (SHIFT, 0.10):
        target = prior_target(prior, -points)  # 56 % positive: moved down keeps both classes plentiful
        detection[f"prior {prior:.0%}->{target:.0%}"] = alarm_rate(
            monitor,
            prior_windows(labels, "positive", target, DETECTION_SIZE, count, rng),
            pool,
            required=points == SHIFT,
        )
    mixed = concat(pool, sms)
    mix_draws = [
        np.r_[rng.choice(pool.size, 400, replace=False), pool.size + rng.choice(sms.size, 100, replace=False)]
        for _ in range(count)
    ]
    detection["sms 20% mixed in"] = alarm_rate(monitor, mix_draws, mixed, required=False)
    for name, outcome in detection.items():
        print(f"  sst2 detection {name}: {outcome['rate']:.2%}", flush=True)
    return results


def benchmark_tabular(
    monitor: DriftMonitor, count: int, rng: np.random.Generator, null_count: int = 1000
) -> dict[str, Any]:
    config = monitor.predictor.config
    clock = time.perf_counter()
    reference = monitor.reference
    built = time.perf_counter() - clock
    splits = prepare(config).splits
    held_out = splits["test"]
    pool = monitor.describe(held_out)
    labels = [str(v) for v in column(held_out, config.data.label)]
    prior = float(np.mean(np.asarray([str(v) for v in column(splits["train"], config.data.label)]) == ">50K"))
    results: dict[str, Any] = {
        "reference": reference.sources,
        "reference_seconds": round(built, 1),
        "pool": {"held_out_rows": pool.size},
        "train_prior_positive": round(prior, 4),
        "false_alarms": {},
        "detection": {},
    }
    for size in SIZES:
        draws = random_windows(pool.size, size, null_count, rng)
        results["false_alarms"][str(size)] = alarm_rate(monitor, draws, pool)
        print(f"  adult false alarms @ {size}: {results['false_alarms'][str(size)]['rate']:.2%}", flush=True)
    detection = results["detection"]
    for years in (15, 3):
        older = held_out.map(lambda row, years=years: {"age": row["age"] + years})
        shifted = monitor.describe(older)  # the model answers the shifted rows
        draws = random_windows(shifted.size, DETECTION_SIZE, count, rng)
        detection[f"age+{years}"] = alarm_rate(monitor, draws, shifted, required=years == 15)
    for points in (SHIFT, 0.10):
        target = prior_target(prior, points)
        detection[f"prior {prior:.0%}->{target:.0%}"] = alarm_rate(
            monitor, prior_windows(labels, ">50K", target, DETECTION_SIZE, count, rng), pool, required=points == SHIFT
        )
    for name, outcome in detection.items():
        print(f"  adult detection {name}: {outcome['rate']:.2%}", flush=True)
    return results


def table(results: dict[str, Any], names: list[str]) -> str:
    lines = [
        "| dataset | rows/window | scenario | flagged | rate (95 % CI) | bar | tests that fired (top 4) | s/check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        for size, outcome in results[name]["false_alarms"].items():
            lines.append(_row(name, size, "training distribution", outcome, "<= 5 %", outcome["rate"] <= 0.05))
        for scenario, outcome in results[name]["detection"].items():
            bar = ">= 80 %" if outcome["required"] else "(extra)"
            passed = outcome["rate"] >= 0.8 or not outcome["required"]
            lines.append(_row(name, str(DETECTION_SIZE), scenario, outcome, bar, passed))
    return "\n".join(lines)


def _row(name: str, size: str, scenario: str, outcome: dict[str, Any], bar: str, passed: bool) -> str:
    low, high = outcome["ci95"]
    fired = ", ".join(f"{test} {n}" for test, n in list(outcome["tests_fired"].items())[:4]) or "-"
    rate = f"{outcome['rate']:.0%} ({low:.0%}-{high:.0%})"
    verdict = f"{bar} {'pass' if passed else 'FAIL'}" if bar != "(extra)" else bar
    flagged = f"{outcome['flagged']}/{outcome['windows']}"
    return (
        f"| {name} | {size} | {scenario} | {flagged} | {rate} | {verdict} | {fired} | {outcome['seconds_per_check']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workspace", type=Path, help="where the runs go (kept, and reused when there); default a temp dir"
    )
    parser.add_argument("--windows", type=int, default=100, help="windows per scenario (default 100)")
    parser.add_argument(
        "--tabular-null-windows",
        type=int,
        default=1000,
        help="windows per size for Adult's false alarms (default 1000: a check costs ~20 ms, and 100 windows "
        "give a 95 %% interval about 10 points wide)",
    )
    parser.add_argument("--datasets", nargs="+", default=["sst2", "adult"], choices=["sst2", "adult"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    steal_start = cpu_jiffies()
    rng = np.random.default_rng(args.seed)
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "alpha": 0.05,
        "correction": "holm",
    }
    with tempfile.TemporaryDirectory() as temporary:
        workspace = args.workspace or Path(temporary)
        for name in args.datasets:
            run_dir, seconds, metrics = trained_run(name, workspace)
            how = f"trained in {seconds:.0f} s" if seconds else "reused"
            print(f"{name}: run {run_dir} ({how})", flush=True)
            monitor = DriftMonitor(run_dir, alpha=0.05)
            clock = time.perf_counter()
            if name == "sst2":
                results[name] = benchmark_text(monitor, args.windows, rng)
            else:
                results[name] = benchmark_tabular(monitor, args.windows, rng, args.tabular_null_windows)
            results[name] |= {
                "run": {
                    "train_seconds": round(seconds, 1),
                    "test_accuracy": metrics.get("accuracy"),
                    "reference_model_split": monitor.reference.sources["model"]["split"],
                },
                "monitor_seconds": round(time.perf_counter() - clock, 1),
                "permutations": monitor._permutations() if name == "sst2" else None,
            }
    steal_end = cpu_jiffies()
    total = steal_end[2] - steal_start[2]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["steal_share"] = round((steal_end[0] - steal_start[0]) / total, 4) if total else None
    atomic_write_json(RESULTS, results)
    print(table(results, args.datasets))
    print(f"\n{results['seconds']:.0f} s in all (CPU steal {results['steal_share']:.1%}); results in {RESULTS}")


if __name__ == "__main__":
    main()
