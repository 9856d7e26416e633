"""Training on several processes: `forgeml run --nproc 2` (torchrun + DDP with gloo) takes the same optimizer
steps at the same global batch as one process, two torchrun "nodes" on 127.0.0.1 train alike, and a killed
launcher resumes to the uninterrupted run's metrics. Only rank 0 writes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import forgeml
from forgeml.store import Store, database_url
from forgeml.workspace import read_json

from conftest import write_csv
from test_train import tabular_config, tabular_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tabular config (no dropout: the processes' random streams differ) and its one-process run."""
    root = tmp_path_factory.mktemp("ddp")
    rows = write_csv(root / "rows.csv", tabular_rows(600))
    config = tabular_config(rows, "tabular-classification", "label", dropout=0.0)
    config["train"].update(epochs=5, batch_size=64, threads=1, checkpoint_every=10)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    single = forgeml.run(path, workspace=root / "single")
    return {"root": root, "config": path, "single": single}


def _cli(*args: str, workspace: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "forgeml.cli", *args, "--workspace", str(workspace), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finished_run(workspace: Path) -> dict:
    (record,) = Store(database_url(workspace)).runs()
    assert record["status"] == "finished", record
    return read_json(Path(record["path"]) / "metrics.json")


def _same_training(metrics: dict, reference: dict) -> None:
    assert metrics["training"]["steps"] == reference["training"]["steps"]
    for name in ("accuracy", "roc_auc", "log_loss"):
        assert metrics["validation"][name] == pytest.approx(reference["validation"][name], abs=0.005), name


def test_two_processes_take_the_same_steps_as_one(setup: dict) -> None:
    workspace = setup["root"] / "two"
    launcher = _cli("run", str(setup["config"]), "--nproc", "2", workspace=workspace)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert out.count("run directory:") == 1  # rank 0 reports; rank 1 prints nothing
    metrics = _finished_run(workspace)  # one run in the store: rank 1 created none
    _same_training(metrics, setup["single"].metrics)
    setup["two"] = metrics


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_loopback_train_like_one_machine(setup: dict) -> None:
    workspace = setup["root"] / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        command += ["--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
        command += ["--rdzv-id", "forgeml-test", "-m", "forgeml", "run", str(setup["config"])]
        command += ["--workspace", str(workspace), "--quiet"]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        )
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    _same_training(_finished_run(workspace), setup["single"].metrics)


def test_a_killed_launcher_resumes_to_the_uninterrupted_metrics(setup: dict) -> None:
    workspace = setup["root"] / "killed"
    launcher = _cli("run", str(setup["config"]), "--nproc", "2", workspace=workspace)
    deadline, found = time.monotonic() + 300, []
    while time.monotonic() < deadline and launcher.poll() is None and not found:
        found = list(workspace.glob("runs/*/*/checkpoints/step-00000020"))
        if not found:
            time.sleep(0.02)  # polling for the checkpoint file, not timing anything
    assert found and launcher.poll() is None, "the run ended (or never checkpointed) before it could be killed"
    launcher.send_signal(signal.SIGKILL)  # the launcher alone: its torchrun and workers must die with it
    launcher.wait(timeout=30)
    run_dir = found[0].parent.parent
    for _ in range(600):  # the workers go down with their parent (polling a state, not timing)
        if not _workers_alive(setup["config"]):
            break
        time.sleep(0.05)
    assert not _workers_alive(setup["config"]), "workers outlived the killed launcher"
    resumed = _cli("run", "--resume", str(run_dir), "--nproc", "2", workspace=workspace)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    metrics = read_json(run_dir / "metrics.json")
    _same_training(metrics, setup["single"].metrics)


def _workers_alive(config: Path) -> bool:
    """Whether any process still runs `forgeml run` on this config (torchrun or its workers)."""
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any("run" in line and str(config) in line for line in listing.splitlines())
