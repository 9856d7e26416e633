"""Canary share and shadow cost, measured on `forgeml serve` processes serving two registered SST-2 models.

    python benchmarks/canary_shadow.py --workspace WS     # WS: the workspace of examples/loop/loop.py

WS must hold a model `sst2` with versions 1 and 2 (loop.py leaves exactly that). Both runs are exported
to ONNX first when they are not (`forgeml export`), and served with `--engine onnx`.

- Canary: `forgeml serve sst2@champion --canary sst2@challenger:10` with champion -> 1, challenger -> 2;
  `--requests` requests (5,000), each from its own caller (the X-Forgeml-Route header), then 200 callers
  five times each: the share answered by the canary (target 10 +/- 2 %) and whether every caller always
  got the same version (sticky).
- Shadow: `forgeml serve sst2@champion` without and with `--shadow sst2@candidate` (every request scored
  on version 2 too), alternating, `--rounds` rounds of `--seconds` of closed-loop load at each
  `--concurrency`; p50/p95 latency and req/s of the answers (target: p50 with shadow within 10 % of
  without). One SST-2 validation sentence per request.

Writes benchmarks/canary_shadow.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from forgeml.registry import Registry
from forgeml.serve.loadgen import closed_loop
from forgeml.store import database_url

HERE = Path(__file__).resolve().parent
SENTENCES = HERE.parent.parent / "shared" / "datasets" / "sst2" / "validation.csv"


def serve(workspace: Path, port: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "forgeml.cli", "serve", "sst2@champion", "--port", str(port), "--no-auth"]
    command += ["--engine", "onnx", "--workspace", str(workspace), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if closed_loop(port, lambda i: ("GET", "/readyz", None, {}), 1, total=1).exchanges[0].status == 200:
            return process
        time.sleep(0.5)
    raise SystemExit(f"serve did not start: {process.stderr.read()[-2000:] if process.poll() is not None else ''}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    registry = Registry(database_url(workspace))
    versions = registry.versions("sst2")
    if len(versions) < 2:
        raise SystemExit(
            f"{workspace}: needs sst2 versions 1 and 2 (run examples/loop/loop.py --workspace {workspace})"
        )
    for version in versions[:2]:
        if not (Path(version["run_path"]) / "export" / "model.int8.onnx").is_file():
            subprocess.run([sys.executable, "-m", "forgeml.cli", "export", version["run_path"]], check=True)
    champion_before = registry.alias_version("sst2", "champion")
    registry.set_alias("sst2", "champion", 1, reason="benchmark")
    registry.set_alias("sst2", "challenger", 2, reason="benchmark")
    registry.set_alias("sst2", "candidate", 2, reason="benchmark")
    with open(SENTENCES, newline="", encoding="utf-8") as handle:
        sentences = [row["text"] for row in csv.DictReader(handle)]
    second = versions[1]["run_id"]
    report: dict = {"machine_cores": os.cpu_count(), "engine": "onnx (int8)"}

    # Canary: one caller per request, then a few callers again and again.
    server = serve(workspace, args.port, "--canary", "sst2@challenger:10")
    try:

        def one_each(index: int):
            body = {"inputs": sentences[index % len(sentences)]}
            return "POST", "/v1/predict", body, {"X-Forgeml-Route": f"caller-{index}"}

        spread = closed_loop(args.port, one_each, concurrency=8, total=args.requests, keep_bodies=True)
        answered = [e.body["version"] for e in spread.exchanges if e.status == 200]

        def repeated(index: int):
            return "POST", "/v1/predict", {"inputs": "a fine film"}, {"X-Forgeml-Route": f"again-{index % 200}"}

        again = closed_loop(args.port, repeated, concurrency=8, total=1000, keep_bodies=True)
        by_caller: dict[int, set[str]] = {}
        for exchange in again.exchanges:
            by_caller.setdefault(exchange.index % 200, set()).add(exchange.body["version"])
    finally:
        stop(server)
    report["canary"] = {
        "requests": len(spread.exchanges),
        "statuses": spread.statuses(),
        "share_percent": round(100 * answered.count(second) / len(answered), 2),
        "target_percent": "10 +/- 2",
        "sticky_callers": sum(len(v) == 1 for v in by_caller.values()),
        "callers_checked": len(by_caller),
    }
    print(json.dumps(report["canary"]), flush=True)

    # Shadow: the answers' latency without and with a shadow scoring every request.
    rounds: dict = {}
    for concurrency in args.concurrency:
        for round_index in range(args.rounds):
            for label, options in (("no_shadow", ()), ("shadow", ("--shadow", "sst2@candidate"))):
                server = serve(workspace, args.port, *options)
                try:

                    def request(index: int):
                        return "POST", "/v1/predict", {"inputs": sentences[index % len(sentences)]}, {}

                    closed_loop(args.port, request, concurrency, duration_s=3)  # warm-up, untimed
                    result = closed_loop(args.port, request, concurrency, duration_s=args.seconds)
                    models = closed_loop(
                        args.port, lambda i: ("GET", "/v1/models", None, {}), 1, total=1, keep_bodies=True
                    )
                finally:
                    stop(server)
                summary = result.summary()
                shadow = next((m for m in models.exchanges[0].body["models"] if m["role"] == "shadow"), None)
                if shadow:
                    summary["shadow_scored"] = shadow["requests"]
                    summary["agreement"] = shadow["agreement_with_primary"]
                    summary["shadow_skipped_while_behind"] = shadow.get("skipped_while_behind", 0)
                rounds.setdefault(str(concurrency), []).append({"label": label, "round": round_index, **summary})
                print(json.dumps({"concurrency": concurrency, "label": label, **summary}), flush=True)
    report["shadow"] = {}
    for concurrency, runs in rounds.items():
        p50 = {label: median(r["p50_ms"] for r in runs if r["label"] == label) for label in ("no_shadow", "shadow")}
        rps = {label: median(r["requests_per_second"] for r in runs if r["label"] == label) for label in p50}
        report["shadow"][concurrency] = {
            "p50_ms": p50,
            "requests_per_second": rps,
            "p50_ratio_shadow_over_none": round(p50["shadow"] / p50["no_shadow"], 3),
            "rounds": runs,
        }
    if champion_before is not None:
        registry.set_alias("sst2", "champion", champion_before, reason="benchmark done")
    (HERE / "canary_shadow.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "shadow"}, indent=2))
    for concurrency, figures in report["shadow"].items():
        print(f"concurrency {concurrency}: p50 {figures['p50_ms']} -> ratio {figures['p50_ratio_shadow_over_none']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
