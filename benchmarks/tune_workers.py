"""Several `forgeml tune` workers on one study: SQLite, then PostgreSQL; and a worker killed mid-trial.

The study is examples/adult_tune.yaml shortened (4,000 training rows, 4 epochs, no pruning) so a trial
takes seconds. For each store: two worker processes start at once with `--trials 15`; then every trial of
the study is checked: 30 of them, numbered 0-29 (none lost, none twice), each COMPLETE, each with a run
in the store. Then a worker is SIGKILLed while its trial trains (heartbeat 2 s) and another worker runs
3 trials: the killed trial must end FAIL and the study go on.

    python benchmarks/tune_workers.py          # ~5 min; PostgreSQL where its server binaries are installed

Writes benchmarks/tune_workers.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna

from forgeml.store import Store, database_url
from forgeml.tuning import storage

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "adult_tune.yaml"
SHORT = ["data.sample={train: 4000}", "train.epochs=4", "tune.pruner=none", "tune.heartbeat_s=2"]


def worker(workspace: Path, trials: int, environment: dict[str, str], *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "forgeml.cli", "tune", str(CONFIG), *SHORT, *extra]
    command += ["--trials", str(trials), "--workspace", str(workspace), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)


def check_study(workspace: Path, url: str) -> dict:
    study = optuna.load_study(study_name="adult_tune", storage=storage(url))
    numbers = sorted(trial.number for trial in study.trials)
    states = {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    runs = {record["id"] for record in Store(url).runs("adult_tune", limit=1000)}
    linked = sum(trial.user_attrs.get("run_id") in runs for trial in study.trials)
    return {"trials": len(numbers), "numbers_0_to_n": numbers == list(range(len(numbers))), "states": states,
            "trials_with_a_run_in_the_store": linked}  # fmt: skip


def two_workers(url: str | None) -> dict:
    workspace = Path(tempfile.mkdtemp(prefix="forgeml-workers-"))
    environment = {**os.environ, **({"FORGEML_DB_URL": url} if url else {})}
    url = url or database_url(workspace)
    started = time.perf_counter()
    workers = [worker(workspace, 15, environment) for _ in range(2)]
    for process in workers:
        _, err = process.communicate(timeout=3600)
        if process.returncode:
            raise SystemExit(err[-3000:])
    return {
        "store": url.split(":")[0],
        "seconds": round(time.perf_counter() - started, 1),
        **check_study(workspace, url),
    }


def killed_worker() -> dict:
    workspace = Path(tempfile.mkdtemp(prefix="forgeml-killed-"))
    url = database_url(workspace)
    victim = worker(workspace, 5, {**os.environ}, "train.epochs=200")
    while victim.poll() is None:
        with contextlib.suppress(KeyError):
            trials = optuna.load_study(study_name="adult_tune", storage=storage(url)).trials
            if any(t.state.name == "RUNNING" and t.user_attrs.get("run_id") for t in trials):
                break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finisher = worker(workspace, 3, {**os.environ})
    _, err = finisher.communicate(timeout=3600)
    if finisher.returncode:
        raise SystemExit(err[-3000:])
    return check_study(workspace, url)


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (None where no server binaries are installed)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import postgres_binaries, throwaway_postgres

    binaries = postgres_binaries()
    if binaries is None:
        yield None
        return
    with throwaway_postgres(binaries) as url:
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    results = {"sqlite": two_workers(None)}
    print(json.dumps(results["sqlite"]), flush=True)
    with postgres() as url:
        if url is not None:
            results["postgresql"] = two_workers(url)
            print(json.dumps(results["postgresql"]), flush=True)
    results["killed_worker"] = killed_worker()
    print(json.dumps(results["killed_worker"]), flush=True)
    (HERE / "tune_workers.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
