"""Shared fixtures: a tiny random-initialised BERT with its own small tokenizer, small data files,
and the shared real datasets (skipped with a reason where absent)."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO.parent / "shared" / "datasets"

POSITIVE = ["great", "good", "lovely", "superb", "fine", "happy", "brilliant", "wonderful"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "boring", "sad", "dull", "horrible"]
FILLER = ["the", "film", "was", "a", "plot", "and", "acting", "story", "quite", "very", "movie", "cast"]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a ~100-token WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER, *letters]
    vocab += [f"##{c}" for c in letters] + list(".,!?'")
    vocab = list(dict.fromkeys(vocab))
    BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def sentiment_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Short synthetic reviews whose label is given by the sentiment word they contain."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = [*rng.sample(FILLER, rng.randint(2, 6)), word]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def sentiment_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "reviews.csv", sentiment_rows(400))


@pytest.fixture
def text_config(tiny_backbone: Path, sentiment_csv: Path) -> dict:
    """A fast text-classification config on the tiny backbone."""
    return {
        "name": "tiny",
        "description": "synthetic sentiment for tests",
        "task": "text-classification",
        "data": {"train": str(sentiment_csv), "split": {"validation": 0.15, "test": 0.15}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None},
    }


@pytest.fixture(scope="session")
def sentiment_model(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny BERT fine-tuned on synthetic reviews whose label is given by one sentiment word
    (shared by the explanation and robustness tests, which only read it)."""
    import forgeml

    folder = tmp_path_factory.mktemp("sentiment-model")
    config = {
        "name": "tiny",
        "task": "text-classification",
        "data": {"train": str(write_csv(folder / "reviews.csv", sentiment_rows(400))), "split": {"test": 0.15}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None, "threads": 1},
    }
    result = forgeml.run(config, workspace=folder)
    assert (
        result.metrics["test"]["accuracy"] >= 0.9
    )  # explanations and probes of a model that has not learned mean nothing
    return forgeml.load(result.run_dir)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {DATASETS} (they live in ../shared/datasets beside the checkout)")
    return DATASETS


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Models this small run faster on one thread: waking a second one costs more than the work.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_causal_lm(style: str, tokenizer, folder: Path, key_value_heads: int = 2) -> nn.Module:
    """A random 2-layer, 32-wide Llama or Qwen2 model for `tokenizer`, saved with it in `folder` as a
    Hugging Face checkpoint (the hub path: `from_pretrained` of a local folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": key_value_heads,
        "max_position_embeddings": 64,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**sizes)) if style == "llama" else Qwen2ForCausalLM(Qwen2Config(**sizes))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def kill_at_checkpoint(config_path: Path, workspace: Path, checkpoint: str) -> Path:
    """Start `forgeml run CONFIG` in a subprocess, SIGKILL it once `checkpoint` (a glob below the workspace,
    e.g. "runs/tiny/*/checkpoints/step-00000070") exists, and return the killed run's directory."""
    command = [sys.executable, "-m", "forgeml.cli", "run", str(config_path), "--quiet", "--workspace", str(workspace)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    found: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None and not found:
        found = list(workspace.glob(checkpoint))
        if not found:
            time.sleep(0.02)  # polling for the checkpoint file, not timing anything
    assert process.poll() is None, f"run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert found, "no checkpoint appeared within 300 s"
    return found[0].parent.parent


def resume_run(run_dir: Path) -> None:
    """`forgeml run --resume RUN_DIR` in a subprocess; it must succeed."""
    resumed = subprocess.run(
        [sys.executable, "-m", "forgeml.cli", "run", "--resume", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def killed_and_resumed(config: dict, tmp_path: Path, checkpoint: str) -> tuple[dict, dict, Path]:
    """Run `config` uninterrupted, then again SIGKILLed once `checkpoint` (a glob below its workspace) exists and
    resumed; return (uninterrupted metrics, resumed metrics, the resumed run's directory)."""
    import forgeml

    reference = forgeml.run(config, workspace=tmp_path / "reference")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = kill_at_checkpoint(config_path, tmp_path / "killed", checkpoint)
    assert not (run_dir / "metrics.json").exists()  # killed before it finished
    resume_run(run_dir)
    return reference.metrics, json.loads((run_dir / "metrics.json").read_text()), run_dir


def postgres_binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@contextlib.contextmanager
def throwaway_postgres(binaries: Path) -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 made from the server `binaries`, deleted on exit (also used by
    benchmarks/tune_workers.py)."""
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` system user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="forgeml-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "forgeml")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        yield f"postgresql://forgeml@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1, one per test module (skipped where there is none)."""
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'forgeml[postgres]')")
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    with throwaway_postgres(binaries) as url:
        yield url
