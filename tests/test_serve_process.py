"""`forgeml serve` as a process under load: no 5xx, every feedback stored, memory flat, and SIGTERM lets
the requests in flight finish.

The load test sends FORGEML_LOAD_REQUESTS requests (2,000 by default, to keep CI short; the acceptance
run uses 20,000) at concurrency 64.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest

from forgeml.serve.keys import KeyStore
from forgeml.serve.loadgen import closed_loop
from forgeml.serve.records import PredictionRecord, RecordStore
from forgeml.store import database_url

from serving import Client, server_process

REQUESTS = int(os.environ.get("FORGEML_LOAD_REQUESTS", "2000"))
# uvicorn shuts down gracefully on SIGTERM, then re-raises it so process managers see why it ended.
GRACEFUL_EXIT = (0, -signal.SIGTERM)
WORDS = ["great", "fine", "dull", "boring", "superb", "awful", "the", "film", "plot", "was", "a", "and"]


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _texts(i: int) -> list[str]:
    """1 to 4 texts of 3 to 12 words, different for each request."""
    return [
        " ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(3 + (i + j) % 10)) for j in range(1 + i % 4)
    ]


@pytest.fixture
def served_copy(sentiment_model, tmp_path: Path) -> tuple[Path, Path]:
    workspace = tmp_path / "workspace"
    run = shutil.copytree(sentiment_model.run.path, workspace / "runs" / "tiny" / sentiment_model.run.id)
    return run, workspace


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's RSS from /proc")
def test_load_gives_no_5xx_stores_every_feedback_and_keeps_memory_flat(served_copy) -> None:
    run, workspace = served_copy
    key = KeyStore(database_url(workspace)).create(["predict", "feedback"], name="load test")
    headers = {"Authorization": f"Bearer {key}"}

    def request(i: int):
        if i % 10 == 9:  # one request in ten is a correction
            return "POST", "/v1/feedback", {"inputs": _texts(i)[0], "label": "positive"}, headers
        return "POST", "/v1/predict", {"inputs": _texts(i)}, headers

    with server_process(run, workspace) as (process, _):
        warm = closed_loop(_port(process), request, concurrency=64, total=max(500, REQUESTS // 10))
        assert warm.statuses().keys() <= {200, 201}, warm.summary()
        rss_warm = _rss_bytes(process.pid)
        load = closed_loop(_port(process), request, concurrency=64, total=REQUESTS)
        rss_after = _rss_bytes(process.pid)

    print(f"\nload: {load.summary()}; RSS after warm-up {rss_warm / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB")
    assert process.returncode in GRACEFUL_EXIT
    statuses = load.statuses()
    assert not [status for status in statuses if status >= 500 or status == 0], load.summary()
    feedback_sent = sum(1 for e in warm.exchanges + load.exchanges if e.index % 10 == 9)
    predictions_sent = sum(len(_texts(e.index)) for e in warm.exchanges + load.exchanges if e.index % 10 != 9)
    assert statuses == {200: REQUESTS - REQUESTS // 10, 201: REQUESTS // 10}
    store = RecordStore(database_url(workspace))
    assert len(store.feedback()) == feedback_sent  # every feedback posted is in the database
    assert _count(store, PredictionRecord) == predictions_sent
    assert rss_after <= 1.10 * rss_warm, f"RSS grew from {rss_warm / 2**20:.0f} MiB to {rss_after / 2**20:.0f} MiB"


def test_sigterm_lets_in_flight_requests_finish(served_copy) -> None:
    run, workspace = served_copy
    # Batches wait up to 1 s to fill, so the requests below are still in flight when SIGTERM arrives.
    with server_process(run, workspace, "--no-auth", "--max-batch", "1024", "--max-wait-ms", "1000") as (
        process,
        client,
    ):
        answers: list[tuple[int, dict]] = []

        def send(i: int) -> None:
            answers.append(Client(client.port).call("POST", "/v1/predict", {"inputs": _texts(i)}))

        senders = [threading.Thread(target=send, args=(i,)) for i in range(16)]
        for sender in senders:
            sender.start()
        while _in_progress(client) < 16:
            assert all(sender.is_alive() for sender in senders), "a request was answered before all were sent"
        process.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(timeout=60)
        assert process.wait(timeout=60) in GRACEFUL_EXIT
        with pytest.raises(OSError):
            client.call("GET", "/healthz")  # no longer accepting
    assert [status for status, _ in answers] == [200] * 16
    predicted = sum(len(body["predictions"]) for _, body in answers)
    assert _count(RecordStore(database_url(workspace)), PredictionRecord) == predicted  # writes flushed


def _in_progress(client: Client) -> float:
    _, text = client.call("GET", "/metrics")
    return float(re.search(r"^forgeml_requests_in_progress (\S+)$", text, re.MULTILINE).group(1))


def _port(process) -> int:
    return int(process.args[process.args.index("--port") + 1])


def _count(store: RecordStore, table) -> int:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    with Session(store.engine) as session:
        return session.scalar(select(func.count()).select_from(table))


def test_serve_finds_a_run_by_name_or_id_in_the_workspace(sentiment_model) -> None:
    import subprocess
    import sys

    workspace = sentiment_model.run.path.parents[2]  # <workspace>/runs/<name>/<id>
    with server_process("tiny", workspace, "--no-auth") as (_, client):
        status, body = client.call("GET", "/v1/models")
        assert status == 200 and body["models"][0]["version"] == sentiment_model.run.id
    unknown = [sys.executable, "-m", "forgeml.cli", "serve", "no-such-run", "--workspace", str(workspace), "--no-auth"]
    result = subprocess.run(unknown, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nor the name or id of a finished run" in result.stderr
