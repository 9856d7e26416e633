"""Encryption at rest: no plaintext left, clear errors without or with the wrong key, identical
predictions and bytes with the right one, tampering refused, interrupted encryption finished."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import forgeml
from forgeml import api
from forgeml.encryption import (
    METADATA,
    EncryptionError,
    decrypt_run,
    encrypt_file,
    encrypt_run,
    fingerprint,
    generate_key,
    parse_key,
)
from forgeml.workspace import RunDir, sha256_file

from conftest import sentiment_rows, write_csv

KEY, OTHER_KEY = generate_key(), generate_key()
SCRIPT = Path(sys.executable).with_name("forgeml")
TEXTS = [row["text"] for row in sentiment_rows(24, seed=3)]


def forgeml_cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "forgeml.cli"]
    env = {name: value for name, value in os.environ.items() if name not in ("FORGEML_KEY", "FORGEML_ENCRYPT")}
    if key is not None:
        env["FORGEML_KEY"] = key
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)


def file_hashes(run: Path) -> dict[str, str]:
    return {path.relative_to(run).as_posix(): sha256_file(path) for path in run.rglob("*") if path.is_file()}


def views() -> set[Path]:
    """Temporary plaintext copies that forgeml has not cleaned up."""
    return {*Path("/dev/shm").glob("forgeml-view-*"), *Path(tempfile.gettempdir()).glob("forgeml-view-*")}


@pytest.fixture
def plain_run(sentiment_model: forgeml.Predictor, tmp_path: Path) -> Path:
    """A private copy of the shared tiny model's finished run (the tests change it)."""
    source = sentiment_model.run.path
    copy = tmp_path / "ws" / "runs" / source.parent.name / source.name
    shutil.copytree(source, copy)
    return copy


@pytest.fixture
def encrypted(plain_run: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    before = file_hashes(plain_run)
    monkeypatch.setenv("FORGEML_KEY", KEY)
    done = encrypt_run(plain_run)
    monkeypatch.delenv("FORGEML_KEY")
    assert set(done) == set(before)
    return {"run": plain_run, "before": before}


def test_encrypt_leaves_no_plaintext(encrypted: dict) -> None:
    run, before = encrypted["run"], encrypted["before"]
    checkpoint_weights = [name for name in before if name.startswith("checkpoints/step-")]
    assert checkpoint_weights and "manifest.json" in before  # everything is covered
    remaining = {path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file()}
    assert remaining == {METADATA} | {name + ".enc" for name in before}
    # Windows of every original file, and well-known plaintext markers, appear in no file on disk.
    samples = {b'"dtype"', b"text-classification", b"\x89PNG", b"[CLS]"}
    for relative in before:
        assert (run / (relative + ".enc")).read_bytes().startswith(b"FORGEML-AESGCM1\n")
    blob = b"".join(path.read_bytes() for path in run.rglob("*") if path.is_file())
    assert not any(sample in blob for sample in samples)
    metadata = json.loads((run / METADATA).read_text())
    assert metadata["state"] == "encrypted" and metadata["key_fingerprint"] == fingerprint(parse_key(KEY))
    assert sorted(metadata["files"]) == sorted(before)
    assert KEY not in (run / METADATA).read_text()


def test_no_window_of_any_original_file_survives(sentiment_model: forgeml.Predictor, encrypted: dict) -> None:
    source = sentiment_model.run.path
    windows = set()
    for relative in encrypted["before"]:
        data = (source / relative).read_bytes()
        for start in (0, len(data) // 3, len(data) // 2, max(len(data) - 24, 0)):
            window = data[start : start + 24]
            if len(window) == 24 and len(set(window)) > 6:  # skip runs of zeros a file may share with noise
                windows.add(window)
    assert len(windows) > 50
    sealed = [path for path in encrypted["run"].rglob("*") if path.is_file() and path.name != METADATA]
    blob = b"".join(path.read_bytes() for path in sealed)  # (encryption.json holds file names, by design)
    assert not [window for window in windows if window in blob]


def test_loading_without_the_key_fails_clearly(encrypted: dict, tmp_path: Path) -> None:
    with pytest.raises(forgeml.ForgeError, match="this run is encrypted; set FORGEML_KEY"):
        forgeml.load(encrypted["run"])
    inputs = write_csv(tmp_path / "inputs.csv", [{"text": text} for text in TEXTS])
    output = tmp_path / "predictions.csv"
    result = forgeml_cli("predict", str(encrypted["run"]), str(inputs), "-o", str(output))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "this run is encrypted; set FORGEML_KEY to the key it was encrypted with" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_a_wrong_or_malformed_key_is_named(encrypted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEML_KEY", OTHER_KEY)
    expected = fingerprint(parse_key(KEY))
    with pytest.raises(
        EncryptionError, match=rf"does not match the key this run was encrypted with \(fingerprint {expected}"
    ):
        forgeml.load(encrypted["run"])
    with pytest.raises(EncryptionError, match="does not match"):
        decrypt_run(encrypted["run"])
    monkeypatch.setenv("FORGEML_KEY", "not-a-key")
    with pytest.raises(EncryptionError, match="FORGEML_KEY is not a valid key"):
        forgeml.load(encrypted["run"])


def test_with_the_key_predictions_are_identical(
    sentiment_model: forgeml.Predictor, encrypted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEML_KEY", KEY)
    left_behind = views()
    loaded = forgeml.load(encrypted["run"])
    assert views() == left_behind  # the plaintext copy is gone once the model is in memory
    assert loaded.predict(TEXTS) == sentiment_model.predict(TEXTS)  # exactly equal probabilities
    assert loaded.run.path == encrypted["run"]
    assert not [path for path in encrypted["run"].rglob("*") if path.is_file() and path.suffix == ".safetensors"]


def test_decrypt_restores_identical_bytes(encrypted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEML_KEY", KEY)
    assert encrypt_run(encrypted["run"]) == []  # already encrypted: nothing to do
    assert set(decrypt_run(encrypted["run"])) == set(encrypted["before"])
    assert file_hashes(encrypted["run"]) == encrypted["before"]
    assert decrypt_run(encrypted["run"]) == []  # not encrypted any more
    forgeml.load(encrypted["run"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_tampered_ciphertext_is_refused_naming_the_file(
    damage: str, encrypted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEML_KEY", KEY)
    target = encrypted["run"] / "model" / "task.json.enc"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:-1]
    else:  # another file of the same run, under this name
        data = bytearray((encrypted["run"] / "model" / "encoder" / "config.json.enc").read_bytes())
    target.write_bytes(bytes(data))
    left_behind = views()
    with pytest.raises(EncryptionError, match=r"task\.json\.enc: cannot be decrypted: the file was changed"):
        forgeml.load(encrypted["run"])
    assert views() == left_behind


def test_an_interrupted_encryption_is_finished_without_loss(
    plain_run: Path, sentiment_model: forgeml.Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = file_hashes(plain_run)
    names, key = sorted(before), parse_key(KEY)
    for relative in names[::2]:
        encrypt_file(plain_run, relative, key)
    # Killed after writing one .enc, before its plaintext was wiped: both are on disk.
    encrypt_file(plain_run, names[1], key)
    shutil.copy2(sentiment_model.run.path / names[1], plain_run / names[1])
    monkeypatch.setenv("FORGEML_KEY", KEY)
    with pytest.raises(EncryptionError, match="did not finish; run `forgeml encrypt"):
        forgeml.load(plain_run)
    assert set(encrypt_run(plain_run)) == set(names[1::2])
    assert {path.name for path in plain_run.rglob("*") if path.is_file() and not path.name.endswith(".enc")} == {
        METADATA
    }
    assert forgeml.load(plain_run).predict(TEXTS) == sentiment_model.predict(TEXTS)
    decrypt_run(plain_run)
    assert file_hashes(plain_run) == before


def test_commands_that_write_into_an_encrypted_run_keep_it_encrypted(
    encrypted: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = encrypted["run"]
    monkeypatch.setenv("FORGEML_KEY", KEY)
    card_before = (run / "card.md.enc").read_bytes()
    left_behind = views()
    md, html = api.report(run)
    assert (md, html) == (run / "card.md.enc", run / "card.html.enc")
    assert md.read_bytes() != card_before  # rewritten, and encrypted again
    metrics = api.evaluate(run, write_csv(tmp_path / "other.csv", sentiment_rows(60, seed=9)))
    assert metrics["accuracy"] >= 0.8
    assert "membership_auc" in api.audit(run)
    assert (run / "trust" / "summary.json.enc").is_file()
    assert views() == left_behind
    plaintext = [path for path in run.rglob("*") if path.is_file() and not path.name.endswith(".enc")]
    assert [path.name for path in plaintext] == [METADATA]
    assert list(run.glob("evaluations/other-*/metrics.json.enc"))
    assert "evaluations" in " ".join(json.loads((run / METADATA).read_text())["files"])
    decrypt_run(run)
    RunDir(run).verify()  # the manifest records the rewritten card
    assert "Model card: tiny" in (run / "card.md").read_text()
    assert json.loads((run / "trust" / "summary.json").read_text())
    assert json.loads(next(run.glob("evaluations/other-*/metrics.json")).read_text())["accuracy"] == metrics["accuracy"]


def test_resume_refuses_an_encrypted_run(encrypted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEML_KEY", KEY)
    with pytest.raises(EncryptionError, match="decrypt it first"):
        forgeml.resume(encrypted["run"])


def test_cli_keygen_encrypt_decrypt(plain_run: Path) -> None:
    generated = forgeml_cli("keygen")
    assert generated.returncode == 0 and "secret store" in generated.stderr
    key = generated.stdout.strip()
    assert len(parse_key(key)) == 32
    before = file_hashes(plain_run)
    missing = forgeml_cli("encrypt", str(plain_run))
    assert missing.returncode == 2 and "needs a key: set FORGEML_KEY" in missing.stderr
    assert "Traceback" not in missing.stderr and file_hashes(plain_run) == before
    assert forgeml_cli("encrypt", str(plain_run), key=key).returncode == 0
    assert not (plain_run / "config.yaml").exists() and (plain_run / "config.yaml.enc").is_file()
    wrong = forgeml_cli("decrypt", str(plain_run), key=KEY)
    assert wrong.returncode == 2 and "does not match" in wrong.stderr
    assert forgeml_cli("decrypt", str(plain_run), key=key).returncode == 0
    assert file_hashes(plain_run) == before


def cli_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """`forgeml ARGS` through the console script's entry point, in this process (torch is already loaded)."""
    from forgeml import cli

    monkeypatch.setattr(sys, "argv", ["forgeml", *args])
    try:
        cli.entrypoint()
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_run_encrypt_writes_an_encrypted_run(
    tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = {
        "name": "secret",
        "task": "text-classification",
        "data": {"train": str(write_csv(tmp_path / "reviews.csv", sentiment_rows(120))), "split": {"test": 0.2}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    workspace = tmp_path / "ws"
    monkeypatch.delenv("FORGEML_KEY", raising=False)
    code, output = cli_in_process(
        monkeypatch, capsys, "run", str(tmp_path / "cfg.yaml"), "-w", str(workspace), "-q", "--encrypt"
    )
    assert code == 2 and "needs a key: set FORGEML_KEY" in output
    assert not (workspace / "runs").exists()  # refused before any training

    monkeypatch.setenv("FORGEML_KEY", KEY)
    code, output = cli_in_process(
        monkeypatch, capsys, "run", str(tmp_path / "cfg.yaml"), "-w", str(workspace), "-q", "--encrypt"
    )
    assert code == 0, output
    run = Path(output.split("run directory:")[1].split()[0])
    names = {path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file()}
    assert {"model/model.safetensors.enc", "manifest.json.enc"} <= names
    assert any(name.startswith("checkpoints/step-") and name.endswith("/model.safetensors.enc") for name in names)
    assert all(name.endswith(".enc") for name in names - {METADATA})
    assert len(forgeml.load(run).predict(TEXTS)) == len(TEXTS)
