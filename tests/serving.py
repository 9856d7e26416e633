"""Real servers for tests: the app on uvicorn in a thread, or `forgeml serve` in a process; a small client."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.port = port
        self.headers: dict[str, str] = {}  # of the last response

    def call(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        """(status, parsed JSON or text) of one request; bodies given as bytes are sent as they are."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = {"Content-Type": "application/json", **(headers or {})}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            self.headers = {name.lower(): value for name, value in response.getheaders()}
            text = response.read().decode("utf-8")
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, json.loads(text) if is_json else text
        finally:
            connection.close()


@contextmanager
def serving(app) -> Iterator[Client]:
    """`app` on a real uvicorn server on 127.0.0.1, in a thread, for the duration of the block."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)  # waiting for the server to come up, not timing anything
    assert server.started, "uvicorn did not start"
    try:
        yield Client(port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def server_process(run: Path | str, workspace: Path, *options: str) -> Iterator[tuple[subprocess.Popen, Client]]:
    """`forgeml serve run` in its own process, ready (GET /readyz answered 200) when the block starts."""
    port = free_port()
    command = [sys.executable, "-m", "forgeml.cli", "serve", str(run), "--port", str(port)]
    command += ["--workspace", str(workspace), *options]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    client = Client(port)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.call("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)  # not listening yet: waiting for start-up, not timing anything
        else:
            output = process.stdout.read() if process.poll() is not None else ""
            raise AssertionError(f"forgeml serve did not become ready: {output[-3000:]}")
        yield process, client
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
