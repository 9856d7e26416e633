"""The store on a real PostgreSQL server (a throwaway cluster on 127.0.0.1): API keys, predictions and
feedback written by the service, read back by `forgeml keys list` and `forgeml feedback export --db`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from forgeml.serve.app import create_app
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.serve.runtime import ModelRuntime

from serving import serving


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


def test_registry_on_postgres_numbers_versions_and_keeps_the_log_append_only(sentiment_model, postgres_url) -> None:
    from sqlalchemy import text

    from forgeml.registry import Registry

    registry = Registry(postgres_url)
    run = sentiment_model.run.path
    first = registry.register("pg_model", run)
    assert first["version"] == 1 and registry.resolve("pg_model@1")["run_path"] == str(run.resolve())
    registry.set_alias("pg_model", "champion", 1, reason="first")
    assert registry.resolve("pg_model@champion")["version"] == 1
    for statement in ("UPDATE promotion_log SET reason = 'rewritten'", "DELETE FROM promotion_log"):
        with registry.engine.begin() as connection, pytest.raises(Exception, match="append-only"):
            connection.execute(text(statement))
    assert [entry["reason"] for entry in registry.log("pg_model")] == ["first"]
    Registry(postgres_url)  # a second process's start-up finds the trigger already there
