"""The store on a real PostgreSQL server (a throwaway cluster on 127.0.0.1): API keys, predictions and
feedback written by the service, read back by `forgeml keys list` and `forgeml feedback export --db`."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeml.serve.app import create_app
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.serve.runtime import ModelRuntime

from serving import free_port, serving


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'forgeml[postgres]')")
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` system user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="forgeml-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    port = free_port()
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


def test_service_keeps_keys_predictions_and_feedback_in_postgres(sentiment_model, postgres_url, tmp_path) -> None:
    keys = KeyStore(postgres_url)
    key = keys.create(["predict", "feedback"], name="pg")
    records = RecordStore(postgres_url)
    with serving(create_app(ModelRuntime(sentiment_model.run.path), keys, records=records)) as client:
        status, body = client.call("POST", "/v1/predict", {"inputs": ["the film was great", "so boring"]}, key)
        assert status == 200, body
        feedback = {"request_id": body["request_id"], "position": 1, "label": "positive", "comment": "sarcasm"}
        assert client.call("POST", "/v1/feedback", feedback, key)[0] == 201
        assert client.call("POST", "/v1/predict", {"inputs": "x"}, "fml_000000000000_nope")[0] == 401

    stored = RecordStore(postgres_url).feedback()
    assert [(s["inputs"], s["predicted"], s["label"]) for s in stored] == [("so boring", "negative", "positive")]
    output = tmp_path / "feedback.csv"
    command = [sys.executable, "-m", "forgeml.cli", "feedback", "export", "-o", str(output), "--db", postgres_url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert output.read_text().splitlines()[1].startswith("so boring,positive,negative,sarcasm")
    listed = subprocess.run(
        [sys.executable, "-m", "forgeml.cli", "keys", "list", "--db", postgres_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "pg" in listed.stdout and key.split("_", 2)[2] not in listed.stdout


def test_a_missing_database_driver_is_named() -> None:
    from forgeml.errors import ForgeError
    from forgeml.store import connect

    with pytest.raises(ForgeError, match="driver is not installed"):
        connect("postgresql+psycopg2://user@127.0.0.1/db")  # psycopg2 is not a dependency
