"""The HTTP service on a real uvicorn server on 127.0.0.1: predictions, API keys and scopes, a battery of
bad requests that each get the right 4xx with a JSON body, Prometheus metrics, and keys stored hashed."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import forgeml
from forgeml.config import ServeConfig
from forgeml.serve.app import create_app
from forgeml.serve.keys import KeyStore
from forgeml.serve.records import RecordStore
from forgeml.serve.runtime import ModelRuntime
from forgeml.store import database_url

from serving import Client, serving


@pytest.fixture(scope="module")
def service(sentiment_model, tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("serve")
    run = shutil.copytree(sentiment_model.run.path, workspace / "runs" / "tiny" / sentiment_model.run.id)
    keys = KeyStore(database_url(workspace))
    issued = {
        "predict": keys.create(["predict"], name="app"),
        "feedback": keys.create(["feedback"]),
        "revoked": keys.create(["predict"]),
        "expired": keys.create(["predict"], expires_in_days=1e-9),  # about 0.1 ms: expired by the first request
    }
    keys.revoke(issued["revoked"].split("_")[1])
    records = RecordStore(database_url(workspace))
    limits = ServeConfig(max_inputs=8, max_chars=500, max_body_bytes=200_000)
    with serving(create_app(ModelRuntime(run), keys, limits, records)) as client:
        yield client, issued, workspace, run


def test_predict_answers_with_labels_probabilities_version_and_request_id(service) -> None:
    client, keys, _, run = service
    assert client.call("GET", "/readyz") == (200, {"ready": True})
    status, body = client.call(
        "POST", "/v1/predict", {"inputs": ["the film was great", "a dull and boring plot"]}, keys["predict"]
    )
    assert status == 200, body
    assert [p["label"] for p in body["predictions"]] == ["positive", "negative"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in body["predictions"])
    assert all("value" not in p for p in body["predictions"])  # no empty fields of other tasks
    assert body["version"] == run.name and len(body["request_id"]) == 32
    status, single = client.call("POST", "/v1/predict", {"inputs": "the film was great"}, keys["predict"])
    assert status == 200 and len(single["predictions"]) == 1
    # what `curl -d '{...}'` sends: form encoding in the header, JSON in the body
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, curled = client.call("POST", "/v1/predict", {"inputs": ["so boring"]}, keys["predict"], headers=form)
    assert status == 200 and curled["predictions"][0]["label"] == "negative"
    status, models = client.call("GET", "/v1/models", key=keys["predict"])
    assert status == 200 and models["models"][0]["labels"] == ["negative", "positive"]


BAD_REQUESTS = [
    # (name, method, path, body, key name, expected status)
    ("no key", "POST", "/v1/predict", {"inputs": ["x"]}, None, 401),
    ("malformed key", "POST", "/v1/predict", {"inputs": ["x"]}, "not-a-key", 401),
    ("unknown key", "POST", "/v1/predict", {"inputs": ["x"]}, "fml_000000000000_secret", 401),
    ("revoked key", "POST", "/v1/predict", {"inputs": ["x"]}, "revoked", 401),
    ("expired key", "POST", "/v1/predict", {"inputs": ["x"]}, "expired", 401),
    ("wrong scope", "POST", "/v1/predict", {"inputs": ["x"]}, "feedback", 403),
    ("models without key", "GET", "/v1/models", None, None, 401),
    ("malformed JSON", "POST", "/v1/predict", b'{"inputs": ["x"', "predict", 422),
    ("invalid UTF-8", "POST", "/v1/predict", b'{"inputs": ["\xff\xfe"]}', "predict", 400),
    ("not an object", "POST", "/v1/predict", b"[1, 2, 3]", "predict", 422),
    ("empty body", "POST", "/v1/predict", b"", "predict", 422),
    ("missing inputs", "POST", "/v1/predict", {}, "predict", 422),
    ("unknown field", "POST", "/v1/predict", {"inputs": ["x"], "temperature": 2}, "predict", 422),
    ("wrong type", "POST", "/v1/predict", {"inputs": 42}, "predict", 422),
    ("null inputs", "POST", "/v1/predict", {"inputs": None}, "predict", 422),
    ("list of numbers", "POST", "/v1/predict", {"inputs": [1, 2]}, "predict", 422),
    ("empty list", "POST", "/v1/predict", {"inputs": []}, "predict", 422),
    ("too many inputs", "POST", "/v1/predict", {"inputs": ["x"] * 9}, "predict", 413),
    ("too long a text", "POST", "/v1/predict", {"inputs": ["x" * 501]}, "predict", 413),
    ("1 MB body", "POST", "/v1/predict", {"inputs": ["x" * 1_000_000]}, "predict", 413),
    ("record without the text column", "POST", "/v1/predict", {"inputs": [{"review": "x"}]}, "predict", 422),
    ("pair for a single-text model", "POST", "/v1/predict", {"inputs": [["a", "b"]]}, "predict", 422),
    ("mixed value types", "POST", "/v1/predict", {"inputs": [{"text": "a"}, {"text": 5}]}, "predict", 422),
    ("unknown route", "GET", "/v1/nothing", None, "predict", 404),
    ("wrong method", "GET", "/v1/predict", None, "predict", 405),
    ("predict with PUT", "PUT", "/v1/predict", {"inputs": ["x"]}, "predict", 405),
    ("feedback with a predict key", "POST", "/v1/feedback", {"inputs": "x", "label": "positive"}, "predict", 403),
    ("feedback for an unknown class", "POST", "/v1/feedback", {"inputs": "x", "label": "meh"}, "feedback", 422),
    (
        "feedback for an unknown request",
        "POST",
        "/v1/feedback",
        {"request_id": "0" * 32, "label": "positive"},
        "feedback",
        404,
    ),
    ("feedback without a record", "POST", "/v1/feedback", {"label": "positive"}, "feedback", 422),
    ("feedback without a label", "POST", "/v1/feedback", {"inputs": "x"}, "feedback", 422),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "key", "expected"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_the_right_4xx_with_a_json_body(service, name, method, path, body, key, expected) -> None:
    client, keys, _, _ = service
    status, answer = client.call(method, path, body, keys.get(key, key))
    assert status == expected, (name, answer)
    assert isinstance(answer, dict) and answer.get("detail"), (name, answer)
    assert client.call("GET", "/healthz") == (200, {"status": "ok"})  # and the server is fine afterwards


def test_metrics_count_requests_by_route_and_status(service) -> None:
    client, keys, _, run = service
    client.call("POST", "/v1/predict", {"inputs": ["x"]})  # a 401
    client.call("POST", "/v1/predict", {"inputs": ["fine"]}, keys["predict"])
    status, text = client.call("GET", "/metrics")
    assert status == 200
    assert 'forgeml_requests_total{route="/v1/predict",status="401"}' in text
    assert 'forgeml_requests_total{route="/v1/predict",status="200"}' in text
    assert f'forgeml_model_info{{engine="pytorch",name="tiny",role="primary",version="{run.name}"}} 1.0' in text
    assert "forgeml_request_seconds_bucket" in text and "forgeml_batch_size_count" in text


def test_keys_are_stored_hashed(service) -> None:
    _, keys, workspace, _ = service
    database = (workspace / "forgeml.db").read_bytes()
    for key in keys.values():
        secret = key.split("_", 2)[2]
        assert secret.encode() not in database and key.encode() not in database
    listed = KeyStore(database_url(workspace)).list()
    assert {"id", "name", "scopes", "created_at", "expires_at", "revoked_at"} == set(listed[0])
    assert sum(1 for key in listed if key["revoked_at"]) == 1


def test_onnx_engine_gives_the_pytorch_labels(sentiment_model, tmp_path: Path) -> None:
    run = shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)
    forgeml.api.export(run)
    onnx, torch_runtime = ModelRuntime(run, "onnx"), ModelRuntime(run, "pytorch")
    fp32 = ModelRuntime(run, "onnx_fp32")
    assert (onnx.engine, fp32.engine) == ("onnxruntime (onnx_int8)", "onnxruntime (onnx_fp32)")
    assert torch_runtime.engine == "pytorch"
    texts = ["the film was great", "a dull and boring plot", "fine"]
    assert [a["label"] for a in onnx.predict(texts)] == [a["label"] for a in torch_runtime.predict(texts)]
    exact = zip(fp32.predict(texts), torch_runtime.predict(texts), strict=True)
    assert all(abs(a["probabilities"]["positive"] - b["probabilities"]["positive"]) < 1e-5 for a, b in exact)


def test_no_auth_is_refused_off_loopback(sentiment_model) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forgeml.cli", "serve", str(sentiment_model.run.path), "--host", "0.0.0.0", "--no-auth"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "only on 127.0.0.1" in result.stderr and "Traceback" not in result.stderr


def test_feedback_is_stored_for_earlier_predictions_and_exported(service, tmp_path: Path) -> None:
    client, keys, workspace, _ = service
    status, body = client.call("POST", "/v1/predict", {"inputs": ["the film was great", "so boring"]}, keys["predict"])
    assert status == 200
    request_id = body["request_id"]
    sent = [
        {"request_id": request_id, "position": 1, "label": "positive", "comment": "sarcasm"},
        {"inputs": "an unseen review", "label": "negative"},
    ]
    for feedback in sent:
        status, answer = client.call("POST", "/v1/feedback", feedback, keys["feedback"])
        assert status == 201, answer
    stored = RecordStore(database_url(workspace)).feedback()
    assert len(stored) == len(sent)  # every feedback posted is in the database
    assert (stored[0]["inputs"], stored[0]["predicted"], stored[0]["label"]) == ("so boring", "negative", "positive")
    assert stored[1]["inputs"] == "an unseen review" and stored[1]["predicted"] is None

    output = tmp_path / "feedback.csv"
    result = subprocess.run(
        [sys.executable, "-m", "forgeml.cli", "feedback", "export", "-o", str(output), "--workspace", str(workspace)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = output.read_text().splitlines()
    assert lines[0].startswith("text,label,predicted,comment") and len(lines) == 3
    assert lines[1].startswith("so boring,positive,negative,sarcasm")


def test_stored_inputs_are_redacted_when_the_run_redacts_pii(sentiment_model, tmp_path: Path) -> None:
    run = shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)
    config = (run / "config.yaml").read_text()
    assert "redact: false" in config
    (run / "config.yaml").write_text(config.replace("redact: false", "redact: true", 1))
    runtime = ModelRuntime(run)
    stored = runtime.storable(["mail jane@example.com a great film", {"text": "call +44 20 7946 0123"}])
    assert stored == ["mail [EMAIL] a great film", {"text": "call [PHONE]"}]
    plain = ModelRuntime(sentiment_model.run.path)
    assert plain.storable(["mail jane@example.com"]) == [
        "mail jane@example.com"
    ]  # the run keeps PII: so does the store


def test_explain_gives_each_word_a_score_toward_the_prediction(service) -> None:
    client, keys, _, _ = service
    texts = ["the film was great", "a dull and boring plot"]
    status, body = client.call("POST", "/v1/explain", {"inputs": texts}, keys["predict"])
    assert status == 200, body
    first, second = body["explanations"]
    assert [w["word"] for w in first["words"]] == ["the", "film", "was", "great"]
    assert (first["label"], second["label"]) == ("positive", "negative")
    # the sentiment word carries the prediction in these synthetic reviews
    assert max(first["words"], key=lambda w: w["score"])["word"] == "great"
    assert max(second["words"], key=lambda w: w["score"])["word"] in {"dull", "boring"}
    status, body = client.call("POST", "/v1/explain", {"inputs": texts}, keys["feedback"])
    assert status == 403


def test_demo_page_is_self_contained(service) -> None:
    client, _, _, run = service
    status, page = client.call("GET", "/")
    assert status == 200 and client.headers["content-type"].startswith("text/html")
    assert "<title>forgeml · tiny</title>" in page and f'"version": "{run.name}"' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN: works offline
    assert '"auth": true' in page  # it asks for a key, since this server wants one


def test_rate_limit_answers_429_with_retry_after_per_key(sentiment_model, tmp_path: Path) -> None:
    keys = KeyStore(database_url(tmp_path))
    first, second = keys.create(["predict"]), keys.create(["predict"])
    settings = ServeConfig(rate_limit=6, rate_burst=3)  # 3 at once, then one every 10 s
    with serving(create_app(ModelRuntime(sentiment_model.run.path), keys, settings)) as client:
        statuses = [client.call("POST", "/v1/predict", {"inputs": "fine"}, first)[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        status, body = client.call("POST", "/v1/predict", {"inputs": "fine"}, first)
        assert status == 429 and "6 requests a minute" in body["detail"]
        assert 1 <= int(client.headers["retry-after"]) <= 10
        assert client.call("POST", "/v1/predict", {"inputs": "fine"}, second)[0] == 200  # other keys unaffected


def test_two_servers_on_one_store_share_revocation_and_rate_limits(sentiment_model, tmp_path: Path) -> None:
    """Two server processes' worth of apps (each with its own store connection) on one database: a key
    revoked through either is refused by both at once, and one key's rate limit is spent across both."""
    url = database_url(tmp_path)
    keys = [KeyStore(url), KeyStore(url)]
    limited, revoked = keys[0].create(["predict"]), keys[0].create(["predict"])
    settings = ServeConfig(rate_limit=6, rate_burst=4)  # 4 at once, then one every 10 s
    runtime = ModelRuntime(sentiment_model.run.path)
    with serving(create_app(runtime, keys[0], settings)) as one, serving(create_app(runtime, keys[1], settings)) as two:
        statuses = [server.call("POST", "/v1/predict", {"inputs": "fine"}, limited)[0] for server in (one, two) * 3]
        assert statuses == [200, 200, 200, 200, 429, 429]  # four tokens in all, not four per server
        assert two.call("POST", "/v1/predict", {"inputs": "fine"}, revoked)[0] == 200
        keys[1].revoke(revoked.split("_")[1])  # through the second store connection
        for server in (one, two):
            status, body = server.call("POST", "/v1/predict", {"inputs": "fine"}, revoked)
            assert status == 401 and "revoked" in body["detail"]


def test_chunked_upload_over_the_limit_is_refused_without_reading_it_all(service) -> None:
    client, keys, _, _ = service
    total, sent = 10_000_000, 0

    def chunks() -> Iterator[bytes]:
        """A valid request padded with whitespace to 10 MB (far over the 200 kB limit), without a length."""
        nonlocal sent
        yield b'{"inputs": ["fine"]'
        while sent < total:
            sent += 10_000
            yield b" " * 10_000
        yield b"}"

    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {keys['predict']}"}
    try:
        connection.request("POST", "/v1/predict", body=chunks(), headers=headers, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "200,000 bytes" in json.loads(response.read())["detail"]
    except (BrokenPipeError, ConnectionResetError):
        assert sent < total  # the server refused and closed before the upload ended
    finally:
        connection.close()
    assert client.call("GET", "/healthz") == (200, {"status": "ok"})


def test_an_encrypted_run_is_served_by_onnxruntime(sentiment_model, tmp_path: Path, monkeypatch) -> None:
    from forgeml.encryption import encrypt_run, generate_key

    run = shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)
    forgeml.api.export(run)
    monkeypatch.setenv("FORGEML_KEY", generate_key())
    encrypt_run(run)
    assert not (run / "export" / "model.int8.onnx").exists()
    views = lambda: {*Path("/dev/shm").glob("forgeml-view-*"), *Path(tempfile.gettempdir()).glob("forgeml-view-*")}  # noqa: E731
    before = views()
    runtime = ModelRuntime(run, "onnx")
    assert runtime.engine.startswith("onnxruntime")
    texts = ["the film was great", "a dull and boring plot"]
    assert [a["label"] for a in runtime.predict(texts)] == ["positive", "negative"]
    assert views() <= before  # the decrypted copy is gone


def test_explanations_run_beside_onnx_predictions(sentiment_model, tmp_path: Path) -> None:
    import threading

    run = shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)
    forgeml.api.export(run)
    runtime = ModelRuntime(run, "onnx")
    assert not runtime.explains_with_the_predicting_model  # its own thread: predictions need not wait
    with serving(create_app(runtime, None)) as client:
        answers: list[tuple[int, dict]] = []

        def send(path: str, text: str) -> None:
            answers.append(Client(client.port).call("POST", path, {"inputs": [text]}))

        calls = [("/v1/explain", "the film was great")] + [("/v1/predict", f"a dull plot {i}") for i in range(8)]
        threads = [threading.Thread(target=send, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert [status for status, _ in answers] == [200] * len(calls)
    explained = next(body for _, body in answers if "explanations" in body)["explanations"][0]
    assert max(explained["words"], key=lambda w: w["score"])["word"] == "great"
