"""Ensembles: three MiniLM runs of one SST-2 recipe that differ only in their seed, combined by
`forgeml ensemble` (mean, vote, stack), against their members; then each served by `forgeml serve`.

1. Trains the members: `examples/sst2.yaml` with `train.seed` 1, 2, 3 (the data section, and so the
   sample and the splits, unchanged; `--train-rows` sets `data.sample.train`).
2. `forgeml ensemble` with each method; reports every member's and every ensemble's test accuracy (the
   SST-2 validation set, 872 sentences, as in the demo).
3. Serving: `forgeml serve RUN --no-auth --engine pytorch` of the best member and of the mean ensemble,
   each in its own process, closed loop (`--concurrency` clients, one SST-2 sentence a request, the
   same seeded order) for `--seconds`, alternating over `--rounds` rounds because the shared VM's speed
   drifts; the ratio of the medians is the ensemble's share of a single model's req/s.

    python benchmarks/ensemble_sst2.py                       # writes benchmarks/ensemble_sst2.json
    python benchmarks/ensemble_sst2.py --serve-only --train-rows 500   # step 3 again, into the same JSON

`--serve-only` retrains small members (a request costs the same whatever the weights learnt), builds the
mean ensemble only and replaces the `serving` section of an existing JSON, keeping its accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve_throughput import free_port, load_sentences, running, wait_ready

import forgeml
from forgeml.serve.loadgen import closed_loop

REPO = Path(__file__).resolve().parent.parent
SST2_VALIDATION = REPO.parent / "shared" / "datasets" / "sst2" / "validation.csv"


def train_members(workspace: Path, rows: int, seeds: list[int]) -> list[Path]:
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        overrides = [f"train.seed={seed}", f"data.sample.train={rows}"]
        result = forgeml.run(REPO / "examples" / "sst2.yaml", overrides=overrides, workspace=workspace)
        print(
            f"member seed {seed}: test accuracy {result.metrics['test']['accuracy']:.4f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        runs.append(result.run_dir)
    return runs


def serve_rate(run: Path, sentences: list[str], concurrency: int, seconds: float, log: Path) -> dict:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "forgeml.cli",
        "serve",
        str(run),
        "--no-auth",
        "--engine",
        "pytorch",
        "--port",
        str(port),
    ]
    with running(run.parent.name, command, port, log) as server:
        wait_ready(server)

        def request(index: int):
            return "POST", "/v1/predict", {"inputs": [sentences[index % len(sentences)]]}, {}

        closed_loop(port, request, concurrency, duration_s=3)  # warm-up, untimed
        result = closed_loop(port, request, concurrency, duration_s=seconds)
    summary = result.summary()
    if set(summary["statuses"]) != {200}:
        raise RuntimeError(f"{run}: answers other than 200: {summary['statuses']}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/forgeml-ensemble-bench"))
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "ensemble_sst2.json")
    parser.add_argument("--serve-only", action="store_true", help="measure serving only (see above)")
    args = parser.parse_args()

    started = time.perf_counter()
    members = train_members(args.workspace, args.train_rows, args.seeds)
    if args.serve_only:
        ensemble = forgeml.ensemble(members, "mean", name="sst2-mean", workspace=args.workspace).run_dir
        report = json.loads(args.output.read_text())
        report["serving"] = serving_report(members[0], ensemble, args)
        report["serving"]["members_train_rows"] = args.train_rows
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(
            json.dumps(report["serving"]["median_requests_per_second"]), report["serving"]["ensemble_share_of_single"]
        )
        return
    report: dict = {"train_rows": args.train_rows, "seeds": args.seeds, "members": [], "ensembles": {}}
    for run in members:
        metrics = json.loads((run / "metrics.json").read_text())
        report["members"].append({"run": str(run), "test_accuracy": metrics["test"]["accuracy"]})
    ensembles = {}
    for method in ("mean", "vote", "stack"):
        clock = time.perf_counter()
        result = forgeml.ensemble(members, method, name=f"sst2-{method}", workspace=args.workspace)
        ensembles[method] = result.run_dir
        report["ensembles"][method] = {
            "run": str(result.run_dir),
            "test_accuracy": result.metrics["test"]["accuracy"],
            "validation_accuracy": result.metrics["validation"]["accuracy"],
            "seconds": round(time.perf_counter() - clock, 1),
        }
        print(f"ensemble {method}: test accuracy {result.metrics['test']['accuracy']:.4f}", flush=True)
    best = max(range(len(members)), key=lambda i: report["members"][i]["test_accuracy"])
    report["best_member_test_accuracy"] = report["members"][best]["test_accuracy"]

    report["serving"] = serving_report(members[best], ensembles["mean"], args)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in report.items() if k != "serving"}
            | {
                "serving": report["serving"]["median_requests_per_second"],
                "share": report["serving"]["ensemble_share_of_single"],
            },
            indent=1,
        )
    )


def serving_report(single: Path, ensemble: Path, args: argparse.Namespace) -> dict:
    """Req/s of one member and of the ensemble, alternating rounds; the ratio of the medians."""
    sentences = load_sentences(SST2_VALIDATION, seed=0)
    rates: dict[str, list[dict]] = {"single": [], "ensemble": []}
    for round_index in range(args.rounds):
        for name, run in (("single", single), ("ensemble", ensemble)):
            log = args.workspace / f"serve-{name}-{round_index}.log"
            summary = serve_rate(run, sentences, args.concurrency, args.seconds, log)
            rates[name].append(summary)
            print(
                f"round {round_index + 1} {name}: {summary['requests_per_second']} req/s, "
                f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms",
                flush=True,
            )
    medians = {name: statistics.median(s["requests_per_second"] for s in runs) for name, runs in rates.items()}
    return {
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": rates,
        "median_requests_per_second": medians,
        "ensemble_share_of_single": round(medians["ensemble"] / medians["single"], 3),
    }


if __name__ == "__main__":
    main()
