"""Two `forgeml serve` processes on one store behave as one service (API keys, revocation, rate limits).

An Adult MLP (2 epochs) is trained into a fresh workspace, then two servers on ports P and P+1 share its
SQLite store (or the PostgreSQL store $FORGEML_DB_URL names):
1. Load: 5,000 requests from 16 clients, alternating the servers, with one key: every status counted
   (the target is 0 5xx).
2. Revocation: a second key is revoked with `forgeml keys revoke` (a third process); both servers are
   polled until they refuse it: the time until the second one does (target <= 2 s).
3. Rate limit: the servers restart with `--rate-limit 60` (burst 10); one key sends 4 requests a second
   for 60 s, alternating the servers: the accepted count against the bucket's 10 + 60 (target within 10 %).

    python benchmarks/serve_two_workers.py          # ~3 min

Writes benchmarks/serve_two_workers.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import forgeml
from forgeml.serve.keys import KeyStore
from forgeml.serve.loadgen import closed_loop
from forgeml.store import database_url

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "adult.yaml"
ROW = {
    "age": 39, "workclass": "State-gov", "fnlwgt": 77516, "education": "Bachelors", "education_num": 13,
    "marital_status": "Never-married", "occupation": "Adm-clerical", "relationship": "Not-in-family",
    "race": "White", "sex": "Male", "capital_gain": 2174, "capital_loss": 0, "hours_per_week": 40,
    "native_country": "United-States",
}  # fmt: skip


def serve(run: Path, workspace: Path, port: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "forgeml.cli", "serve", str(run), "--port", str(port)]
    command += ["--workspace", str(workspace), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
        if process.poll() is not None:
            break
    raise SystemExit(f"serve did not start: {process.stderr.read()[-2000:] if process.poll() is not None else ''}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


def status_of(port: int, key: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict",
        data=json.dumps({"inputs": [ROW]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8610)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--limit-seconds", type=float, default=60.0)
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="forgeml-two-"))
    run = forgeml.run(CONFIG, ["train.epochs=2"], workspace=workspace).run_dir
    keys = KeyStore(database_url(workspace))
    user, doomed = keys.create(["predict"]), keys.create(["predict"])
    ports = (args.port, args.port + 1)
    results: dict = {"store": database_url(workspace).split(":")[0]}

    servers = [serve(run, workspace, port) for port in ports]
    try:
        halves = {}

        def load(port: int) -> None:
            def request(index: int):
                return "POST", "/v1/predict", {"inputs": [ROW]}, {"Authorization": f"Bearer {user}"}

            halves[port] = closed_loop(port, request, concurrency=8, total=args.requests // 2)

        threads = [threading.Thread(target=load, args=(port,)) for port in ports]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses: dict[int, int] = {}
        for half in halves.values():
            for status, count in half.statuses().items():
                statuses[status] = statuses.get(status, 0) + count
        results["load"] = {
            "requests": sum(statuses.values()),
            "statuses": statuses,
            "server_errors": sum(count for status, count in statuses.items() if status >= 500 or status == 0),
            "requests_per_second": round(sum(h.requests_per_second for h in halves.values()), 1),
        }
        print(json.dumps({"load": results["load"]}), flush=True)

        assert all(status_of(port, doomed) == 200 for port in ports)
        revoked_at = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "forgeml.cli",
                "keys",
                "revoke",
                doomed.split("_")[1],
                "--workspace",
                str(workspace),
            ],
            check=True,
            capture_output=True,
        )
        refused_after = {}
        while len(refused_after) < 2 and time.perf_counter() - revoked_at < 30:
            for port in ports:
                if port not in refused_after and status_of(port, doomed) == 401:
                    refused_after[port] = round(time.perf_counter() - revoked_at, 3)
        results["revocation"] = {"refused_after_s": refused_after, "by_both_within_s": max(refused_after.values())}
        print(json.dumps({"revocation": results["revocation"]}), flush=True)
    finally:
        for server in servers:
            stop(server)

    servers = [serve(run, workspace, port, "--rate-limit", "60") for port in ports]
    try:
        fresh = keys.create(["predict"])
        accepted = limited = 0
        started = time.perf_counter()
        sent = 0
        while time.perf_counter() - started < args.limit_seconds:
            status = status_of(ports[sent % 2], fresh)
            accepted += status == 200
            limited += status == 429
            sent += 1
            time.sleep(max(0.0, started + sent * 0.25 - time.perf_counter()))  # 4 requests a second
        seconds = time.perf_counter() - started
        expected = 10 + 60 * seconds / 60.0  # the burst, then one a second
        results["rate_limit"] = {
            "per_minute": 60,
            "burst": 10,
            "seconds": round(seconds, 1),
            "sent": sent,
            "accepted": accepted,
            "refused_429": limited,
            "expected": round(expected, 1),
            "deviation": round(accepted / expected - 1, 3),
        }
        print(json.dumps({"rate_limit": results["rate_limit"]}), flush=True)
    finally:
        for server in servers:
            stop(server)
    (HERE / "serve_two_workers.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
