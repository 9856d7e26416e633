"""The `forgeml` command end to end on a tiny model: every verb, every artefact, every user error."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import forgeml
from forgeml.errors import ArtifactError
from forgeml.workspace import sha256_file

from conftest import sentiment_rows, write_csv

try:
    import chromium
except ImportError:  # pragma: no cover
    from tests import chromium

SCRIPT = Path(sys.executable).with_name("forgeml")


def forgeml_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "forgeml.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def finished(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real run through the CLI, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("cli")
    write_csv(root / "reviews.csv", sentiment_rows(300))
    config = {
        "name": "tiny",
        "description": "Synthetic sentiment for tests.",
        "task": "text-classification",
        "data": {"train": "reviews.csv", "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    workspace = root / "ws"
    result = forgeml_cli("run", str(root / "cfg.yaml"), "train.epochs=2", "--workspace", str(workspace), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.split("run directory:")[1].split()[0])
    return {"root": root, "workspace": workspace, "run_dir": run_dir, "stdout": result.stdout}


def test_run_prints_test_metrics_and_applies_overrides(finished: dict) -> None:
    assert "test metrics" in finished["stdout"] and "accuracy" in finished["stdout"]
    saved = yaml.safe_load((finished["run_dir"] / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2  # the override, in the resolved config
    assert Path(saved["data"]["train"]).is_absolute()


def test_run_directory_holds_every_artefact(finished: dict) -> None:
    run = finished["run_dir"]
    for name in (
        "config.yaml",
        "data_profile.json",
        "metrics.json",
        "train.log",
        "card.md",
        "card.html",
        "manifest.json",
        "model/model.safetensors",
        "model/task.json",
        "model/encoder/config.json",
        "model/tokenizer/tokenizer.json",
    ):
        assert (run / name).is_file(), name
    for plot in ("class_balance", "lengths", "curves", "confusion_matrix", "calibration"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 5000, plot
    assert list((run / "checkpoints").glob("step-*/optimizer.safetensors"))
    events = [json.loads(line) for line in (run / "train.log").read_text().splitlines()]
    assert {"train", "eval"} <= {e["event"] for e in events}
    profile = json.loads((run / "data_profile.json").read_text())
    assert set(profile["sha256"]) == {"train", "validation", "test"}
    assert profile["splits"]["train"]["class_counts"] and profile["tokens"]["train"]["p50"] > 0
    manifest = json.loads((run / "manifest.json").read_text())["files"]
    assert manifest["model/model.safetensors"] == sha256_file(run / "model/model.safetensors")


def test_nothing_is_pickled(finished: dict) -> None:
    suffixes = {path.suffix for path in finished["run_dir"].rglob("*") if path.is_file()}
    assert not suffixes & {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
    for path in finished["run_dir"].rglob("*.safetensors"):
        assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON


def test_runs_table_and_show(finished: dict) -> None:
    listed = forgeml_cli("runs", "--workspace", str(finished["workspace"]))
    assert listed.returncode == 0
    run_id = finished["run_dir"].name
    assert run_id in listed.stdout and "finished" in listed.stdout
    assert not list(finished["run_dir"].glob(".forgeml-process*"))  # the running-process marker is gone
    shown = forgeml_cli("runs", "--workspace", str(finished["workspace"]), "show", run_id[:17])
    record = json.loads(shown.stdout)
    assert record["status"] == "finished" and record["task"] == "text-classification"
    assert set(record["split_hashes"]) == {"train", "validation", "test"}
    assert len(record["config_hash"]) == 64 and record["versions"]["torch"]
    assert record["metrics"]["test"]["accuracy"] > 0.5


def test_evaluate_on_another_file(finished: dict) -> None:
    other = write_csv(finished["root"] / "other.csv", sentiment_rows(80, seed=9))
    result = forgeml_cli("evaluate", str(finished["run_dir"]), "--data", str(other))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
    saved = list((finished["run_dir"] / "evaluations").glob("other-*/metrics.json"))
    assert json.loads(saved[0].read_text())["accuracy"] >= 0.6


def test_predict_writes_labels_and_probabilities(finished: dict) -> None:
    rows = [{"id": i, "text": r["text"]} for i, r in enumerate(sentiment_rows(30, seed=5))]
    source = write_csv(finished["root"] / "inputs.csv", rows)
    out = finished["root"] / "predictions.csv"
    result = forgeml_cli("predict", str(finished["run_dir"]), str(source), "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    with open(out, encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 30 and [r["id"] for r in written] == [str(i) for i in range(30)]
    assert {"prediction", "p_negative", "p_positive"} <= set(written[0])
    assert all(abs(float(r["p_negative"]) + float(r["p_positive"]) - 1) < 1e-4 for r in written)
    jsonl = finished["root"] / "predictions.jsonl"
    assert forgeml_cli("predict", str(finished["run_dir"]), str(source), "-o", str(jsonl)).returncode == 0
    assert json.loads(jsonl.read_text().splitlines()[0])["prediction"] in {"positive", "negative"}
    printed = forgeml_cli("predict", str(finished["run_dir"]), str(source))  # no -o: JSON lines on stdout
    assert printed.returncode == 0, printed.stderr
    assert [json.loads(line) for line in printed.stdout.splitlines()] == [
        json.loads(line) for line in jsonl.read_text().splitlines()
    ]


def test_report_rewrites_the_card_and_keeps_the_manifest_valid(finished: dict) -> None:
    card = finished["run_dir"] / "card.md"
    card.write_text("stale")
    result = forgeml_cli("report", str(finished["run_dir"]))
    assert result.returncode == 0, result.stderr
    assert "Model card: tiny" in card.read_text()
    forgeml.load(finished["run_dir"])  # every recorded hash still matches


def test_card_renders_in_headless_chromium(finished: dict, tmp_path: Path) -> None:
    if chromium.find_chromium() is None:
        pytest.skip("chromium not installed; `make test` installs it")
    card = finished["run_dir"] / "card.html"
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { document.title += ' | images=' + "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });</script>"
    )
    probe.write_text(card.read_text().replace("</body>", script + "</body>"))
    dom = chromium.dump_dom(probe)
    assert "<title>Model card: tiny | images=" in dom
    images = int(dom.split("| images=")[1].split("<")[0])
    assert images >= 5  # class balance, lengths, curves, confusion matrix, calibration


def test_tampered_model_is_refused(finished: dict, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished["run_dir"], copy)
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        forgeml.load(copy)
    result = forgeml_cli("predict", str(copy), str(finished["root"] / "reviews.csv"), "-o", str(tmp_path / "p.csv"))
    assert result.returncode == 2
    assert "model.safetensors" in result.stderr and "SHA-256" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.csv").exists()


def test_init_and_schema() -> None:
    starter = forgeml_cli("init", "text-pair-classification")
    assert starter.returncode == 0 and yaml.safe_load(starter.stdout)["data"]["text_pair"] == "hypothesis"
    schema = json.loads(forgeml_cli("config", "schema").stdout)
    assert "train" in schema["properties"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train": {"lrr": 0.1}}, ["train.lrr", "did you mean 'train.lr'"]),
        ({"data": {"train": "reviews.csv", "text": "sentence"}}, ["'sentence'", "available columns: text, label"]),
        ({"data": {"train": "missing.csv"}}, ["data file not found", "missing.csv"]),
        ({"data": {"train": "latin1.csv"}}, ["not UTF-8", "line 2"]),
        ({"model": {"max_length": 2}}, ["model.max_length", "greater than or equal to 8"]),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(change: dict, expected: list[str], tmp_path: Path) -> None:
    write_csv(tmp_path / "reviews.csv", sentiment_rows(20))
    (tmp_path / "latin1.csv").write_bytes("text,label\ncr\u00e8me br\u00fbl\u00e9e,positive\n".encode("latin-1"))
    config = {"name": "bad", "task": "text-classification", "data": {"train": "reviews.csv"}, **change}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = forgeml_cli("run", str(tmp_path / "cfg.yaml"), "--workspace", str(tmp_path / "ws"), "--quiet")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)
    debug = forgeml_cli("--debug", "run", str(tmp_path / "cfg.yaml"), "--workspace", str(tmp_path / "ws"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nosuchverb"], "No such command 'nosuchverb'"),
        (["run", "--bogus"], "No such option: --bogus"),
        (["serve"], "Missing argument"),
        (["predict", "runs/x"], "Missing argument 'data'"),
        (["serve", "runs/x", "--port", "eighty"], "Invalid value for '--port'"),
        (["keys", "create", "--scope"], "requires an argument"),
    ],
)
def test_usage_errors_exit_2_with_click_usage_and_no_traceback(args: list[str], expected: str) -> None:
    """Unknown verb, unknown option, missing argument or option, bad value: the real console script."""
    result = forgeml_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "Error:" in result.stderr and expected in result.stderr, result.stderr


def test_failed_run_is_recorded_as_failed(tmp_path: Path) -> None:
    write_csv(tmp_path / "one.csv", [{"text": f"t{i}", "label": "only"} for i in range(10)])
    config = {"name": "onecls", "task": "text-classification", "data": {"train": str(tmp_path / "one.csv")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = forgeml_cli("run", str(tmp_path / "cfg.yaml"), "--workspace", str(tmp_path))
    assert result.returncode == 2 and "single class" in result.stderr
    record = forgeml.runs(tmp_path)[0]
    assert record["status"] == "failed" and "single class" in record["error"]


def test_cross_validation_reports_mean_and_spread(tmp_path: Path) -> None:
    from test_train import tabular_config, tabular_rows

    path = write_csv(tmp_path / "t.csv", tabular_rows(300))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"]["epochs"] = 8
    config["evaluate"] = {"cross_validation": 3}
    result = forgeml.run(config, workspace=tmp_path)
    folds = result.metrics["cross_validation"]
    assert folds["k"] == 3
    accuracy = folds["metrics"]["accuracy"]
    assert len(accuracy["folds"]) == 3 and accuracy["mean"] >= 0.8 and 0 < accuracy["std"] < 0.2
    assert "±" in (result.run_dir / "card.md").read_text()


def test_evaluate_redacts_pii_when_the_run_does(sentiment_model, tmp_path: Path) -> None:
    run = shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("redact: false", "redact: true", 1))
    rows = [
        {**row, "text": f"{row['text']} mail jo{i}@example.com"} for i, row in enumerate(sentiment_rows(40, seed=4))
    ]
    metrics = forgeml.api.evaluate(run, write_csv(tmp_path / "with-emails.csv", rows))
    saved = json.loads(next((run / "evaluations").glob("with-emails-*/metrics.json")).read_text())
    assert saved["pii_redacted"] == {"EMAIL": 40} and metrics["accuracy"] >= 0.8


def test_a_run_whose_process_died_is_shown_as_interrupted(tmp_path: Path) -> None:
    from forgeml.store import Store, database_url
    from forgeml.workspace import PROCESS_FILE, mark_running

    store = Store(database_url(tmp_path))

    def started(run_id: str) -> Path:
        folder = tmp_path / "runs" / "r" / run_id
        folder.mkdir(parents=True)
        store.start_run(id=run_id, name="r", task="regression", path=str(folder), config_hash="0" * 64, versions={})
        return folder

    mark_running(started("alive"))  # this process: alive
    gone = started("gone")
    mark_running(gone)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = json.loads((gone / PROCESS_FILE).read_text())
    (gone / PROCESS_FILE).write_text(json.dumps({**marker, "pid": int(ended.stdout)}))  # a process that has ended
    started("unmarked")  # killed before it could even write the marker, or run by an older forgeml

    assert {r["id"]: r["status"] for r in store.runs()} == {
        "alive": "running",
        "gone": "interrupted",
        "unmarked": "interrupted",
    }
    record = Store(database_url(tmp_path)).run("gone")  # recorded, not only shown
    assert record["status"] == "interrupted" and "--resume" in record["error"]
