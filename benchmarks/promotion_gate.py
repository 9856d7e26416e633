"""Type-I error of the promotion gate: candidates that are not better must be refused.

A champion is trained once; then `--seeds` candidates are trained on the very same data and splits with
another training seed (the same model, only the initialisation of the head and the batch order differ).
None of them is better in truth, so every promotion the gate allows is a false one. McNemar's exact test
at alpha 0.05, with the candidate required to win the discordant rows, allows at most 2.5 % of them in
expectation; the acceptance target is at least 9 refusals in 10.

    python benchmarks/promotion_gate.py --dataset sst2 --seeds 10    # MiniLM on 2,000 SST-2 rows (~15 min)
    python benchmarks/promotion_gate.py --dataset adult --seeds 10   # the Adult MLP (~3 min)
    python benchmarks/promotion_gate.py --dataset shakespeare --seeds 10   # a char GPT, 400 steps (~15 min)

For the language model the gate's test is the paired bootstrap of bits per character over pieces of the
held-out text (one-sided, alpha 0.05).

Prints a table and writes benchmarks/promotion_gate_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import forgeml
from forgeml.improve.promote import compare
from forgeml.registry import Registry
from forgeml.store import database_url

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "sst2": HERE.parent / "examples" / "loop" / "sst2.yaml",
    "adult": HERE.parent / "examples" / "adult.yaml",
    "shakespeare": HERE.parent / "examples" / "shakespeare_char.yaml",
}
# nanoGPT's char model, shortened, with a test split for the gate (the example holds out validation only).
OVERRIDES = {"shakespeare": ["data.split.validation=0.05", "data.split.test=0.05", "train.max_steps=400"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="sst2")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workspace", type=Path, default=None)
    args = parser.parse_args()
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="forgeml-gate-"))
    workspace.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[args.dataset]
    clock = time.perf_counter()
    overrides = OVERRIDES.get(args.dataset, [])
    champion = forgeml.run(config, overrides, workspace=workspace).run_dir
    registry = Registry(database_url(workspace))
    registry.register(args.dataset, champion)
    registry.set_alias(args.dataset, "champion", 1, reason="benchmark")
    rows = []
    for seed in range(1, args.seeds + 1):
        candidate = forgeml.run(config, [*overrides, f"train.seed={seed}"], workspace=workspace).run_dir
        report = compare(f"{args.dataset}@champion", candidate, workspace)
        test = report["test"]
        row = {
            "seed": seed,
            "champion": round(report["values"]["champion"], 4),
            "candidate": round(report["values"]["candidate"], 4),
            "gain": round(report["gain"], 4),
            **{key: test[key] for key in ("only_champion_right", "only_candidate_right", "pieces") if key in test},
            "p_value": round(test["p_value"], 4),
            "refused": not report["passed"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    refused = sum(row["refused"] for row in rows)
    summary = {
        "dataset": args.dataset,
        "config": str(config.relative_to(HERE.parent)),
        "test_rows": report["split"]["rows"],
        "seeds": args.seeds,
        "refused": refused,
        "target": "refused in >= 9 of 10",
        "met": refused >= 0.9 * args.seeds,
        "rows": rows,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    (HERE / f"promotion_gate_{args.dataset}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nrefused {refused} of {args.seeds} candidates that are not better ({summary['seconds']:.0f} s)")
    return 0 if summary["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
