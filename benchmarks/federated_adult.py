"""Federated training on UCI Adult against the centralised MLP on the same splits.

Runs, each through `forgeml.run` in a fresh workspace (run it in the federated environment:
`.venv-federated/bin/python benchmarks/federated_adult.py`):
  - centralised: examples/adult.yaml (the reference the issue quotes: test accuracy 0.859);
  - FedAvg and FedProx (mu 0.01): examples/adult_federated.yaml, 10 clients, Dirichlet alpha 0.5,
    20 rounds (early stopping off, so all 20 run; the best round by validation ROC-AUC is kept);
  - one client per `race` value (FedAvg, 20 rounds);
  - client-level DP (FedAvg, Dirichlet as above) at noise multipliers 0.5, 1 and 2, clipping norm 1:
    test accuracy against the epsilon Flower's RDP accountant reports (delta 1e-5).
Reports test accuracy and ROC-AUC, the spread over clients (the final model on each client's own test
rows: min, median, max accuracy) and the training seconds.

    .venv-federated/bin/python benchmarks/federated_adult.py     # ~6 min

Writes benchmarks/federated_adult.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import forgeml
from forgeml.config import load_config

HERE = Path(__file__).resolve().parent
CENTRALISED = HERE.parent / "examples" / "adult.yaml"
FEDERATED = HERE.parent / "examples" / "adult_federated.yaml"
ALL_ROUNDS = ["train.early_stopping=null"]
VARIANTS = {
    "fedavg_dirichlet_0.5": ALL_ROUNDS,
    "fedprox_dirichlet_0.5": [*ALL_ROUNDS, "federated.strategy=fedprox", "federated.proximal_mu=0.01"],
    "fedavg_by_race": [*ALL_ROUNDS, "federated.by_column=race", "federated.clients=null"],
    **{
        f"fedavg_dp_noise_{noise:g}": [*ALL_ROUNDS, f"federated.privacy.noise_multiplier={noise}"]
        for noise in (0.5, 1.0, 2.0)
    },
}


def summarise(metrics: dict) -> dict:
    test = metrics["test"]
    result = {
        "test_accuracy": round(test["accuracy"], 4),
        "test_roc_auc": round(test["roc_auc"], 4),
        "train_seconds": round(metrics["training"]["seconds"], 1),
    }
    federated = metrics["training"].get("federated")
    if federated:
        accuracies = [c["accuracy"] for c in federated["clients_scored"] if "accuracy" in c]
        result.update(
            clients=federated["clients"],
            rounds=federated["rounds"],
            best_round=federated["best_round"],
            client_accuracy={
                "min": round(min(accuracies), 4),
                "median": round(statistics.median(accuracies), 4),
                "max": round(max(accuracies), 4),
            },
            client_train_rows=federated["client_train_rows"],
        )
        if federated.get("privacy"):
            result["epsilon"] = round(federated["privacy"]["epsilon"], 2)
            result["delta"] = federated["privacy"]["delta"]
    return result


def run(config: Path, overrides: list[str]) -> dict:
    workspace = Path(tempfile.mkdtemp(prefix="forgeml-federated-"))
    return summarise(forgeml.run(load_config(config, overrides), workspace=workspace).metrics)


def main() -> int:
    results = {"centralised": run(CENTRALISED, [])}
    print("centralised", results["centralised"], flush=True)
    for name, overrides in VARIANTS.items():
        results[name] = run(FEDERATED, overrides)
        print(name, {k: v for k, v in results[name].items() if k != "client_train_rows"}, flush=True)
    (HERE / "federated_adult.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
