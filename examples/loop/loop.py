"""The whole improvement loop on SST-2, step by step, with the `forgeml` commands a user would type.

    python examples/loop/loop.py                       # 2,000 rows, 3,000 corrections, 30 s of load
    python examples/loop/loop.py --train-rows 300 --corrections 300 --seconds 15   # a quick look

1. train a champion on `--train-rows` SST-2 sentences and register it as sst2@champion;
2. serve sst2@champion (API keys on) and post `--corrections` corrections through /v1/feedback: other
   SST-2 training sentences with their labels, as users would send them;
3. `forgeml retrain sst2`: the champion's config and data plus the corrections, on the same test split;
4. `forgeml models compare`: McNemar's exact test on the fixed test split;
5. under load (16 clients for `--seconds`), `forgeml models promote` moves the alias and the running
   server switches to the new version;
6. checks: no request failed, and every stored prediction names the version that answered it.

The summary is printed as JSON (and written to `--report`); the exit status is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SST2_TRAIN = HERE.parent.parent.parent / "shared" / "datasets" / "sst2" / "train.csv"


def forgeml(*args: str, workspace: Path, quiet: bool = False) -> str:
    """Run one `forgeml` command as a user would, echo it, and return its output."""
    command = [str(Path(sys.executable).with_name("forgeml")), *args, "--workspace", str(workspace)]
    if not Path(command[0]).is_file():
        command[:1] = [sys.executable, "-m", "forgeml.cli"]
    print("$ forgeml " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if not quiet and done.stdout.strip():
        print(done.stdout.rstrip(), flush=True)
    if done.returncode != 0 and not (args[:2] == ("models", "compare") and done.returncode == 1):
        sys.exit(f"forgeml {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def run_directory(output: str) -> Path:
    return Path(output.split("run directory:")[1].split()[0])


def start_server(workspace: Path, port: int) -> subprocess.Popen:
    from forgeml.serve.loadgen import closed_loop

    command = [sys.executable, "-m", "forgeml.cli", "serve", "sst2@champion", "--port", str(port)]
    print(f"$ forgeml serve sst2@champion --port {port} &", flush=True)
    server = subprocess.Popen(
        [*command, "--workspace", str(workspace)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        probe = closed_loop(port, lambda i: ("GET", "/readyz", None, {}), 1, total=1)
        if probe.exchanges[0].status == 200:
            return server
        time.sleep(0.5)
    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:] if server.poll() is not None else ''}")


def corrections_for(champion: Path, count: int, seed: int) -> list[dict[str, str]]:
    """SST-2 training sentences the champion never saw (neither trained nor validated on), with their labels."""
    import forgeml as api
    from forgeml.data.io import column
    from forgeml.data.prepare import prepare

    prepared = prepare(api.load(champion).config)
    seen = set(column(prepared.train, "text")) | set(column(prepared.validation, "text"))
    seen |= set(column(prepared.test, "text"))
    with open(SST2_TRAIN, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["text"] not in seen]
    random.Random(seed).shuffle(rows)
    return [{"inputs": row["text"], "label": row["label"]} for row in rows[:count]]


def post_all(port: int, key: str, bodies: list[dict], path: str) -> list[int]:
    from forgeml.serve.loadgen import closed_loop

    headers = {"Authorization": f"Bearer {key}"}
    result = closed_loop(port, lambda i: ("POST", path, bodies[i], headers), concurrency=8, total=len(bodies))
    return [exchange.status for exchange in result.exchanges]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--corrections", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=30.0, help="load around the switch (promoted at a third)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workspace", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    if not SST2_TRAIN.is_file():
        print(f"SST-2 not found at {SST2_TRAIN} (../shared/datasets beside the checkout)", file=sys.stderr)
        return 2
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="forgeml-loop-"))
    workspace.mkdir(parents=True, exist_ok=True)
    summary: dict = {"workspace": str(workspace), "train_rows": args.train_rows}
    clock = time.perf_counter()

    # 1. The champion.
    config = str(HERE / "sst2.yaml")
    champion = run_directory(forgeml("run", config, f"data.sample.train={args.train_rows}", "-q", workspace=workspace))
    forgeml("models", "register", "sst2", str(champion), "--alias", "champion", workspace=workspace)
    key = forgeml("keys", "create", "--scope", "predict", "--scope", "feedback", workspace=workspace, quiet=True)
    key = key.strip()

    # 2. Serve it; users send corrections.
    server = start_server(workspace, args.port)
    try:
        bodies = corrections_for(champion, args.corrections, seed=7)
        started = time.perf_counter()
        statuses = post_all(args.port, key, bodies, "/v1/feedback")
        summary["corrections"] = {
            "sent": len(bodies),
            "accepted": statuses.count(201),
            "per_second": round(len(bodies) / (time.perf_counter() - started), 1),
        }
        print(f"posted {len(bodies)} corrections through /v1/feedback: {statuses.count(201)} accepted", flush=True)

        # 3. Retrain with them; 4. compare on the fixed test split.
        candidate = run_directory(forgeml("retrain", "sst2", "-q", workspace=workspace))
        compared = forgeml("models", "compare", "sst2@champion", str(candidate), workspace=workspace)
        report = json.loads((candidate / "gate" / "report.json").read_text())
        summary["gate"] = {
            "accuracy": report["values"],
            "gain": round(report["gain"], 4),
            "p_value": report["test"]["p_value"],
            "discordant": [report["test"]["only_champion_right"], report["test"]["only_candidate_right"]],
            "passed": report["passed"],
        }
        if "PASSED" not in compared:
            print("the gate refused the candidate; the loop stops here (nothing is promoted)", flush=True)
            summary["switch"] = None
            return _finish(summary, args.report, clock, ok=False)

        # 5. Promote under load; the running server follows the alias.
        from forgeml.serve.loadgen import closed_loop

        sentences = [body["inputs"] for body in bodies]
        headers = {"Authorization": f"Bearer {key}"}
        load = {}

        def request(index: int):
            return "POST", "/v1/predict", {"inputs": sentences[index % len(sentences)]}, headers

        loader = threading.Thread(
            target=lambda: load.setdefault(
                "result", closed_loop(args.port, request, args.concurrency, duration_s=args.seconds, keep_bodies=True)
            )
        )
        loader.start()
        time.sleep(args.seconds / 3)  # promote part-way through the load
        forgeml("models", "promote", "sst2", str(candidate), "--alias", "champion", workspace=workspace)
        loader.join()
        result = load["result"]
    finally:
        server.terminate()
        server.wait(timeout=60)

    # 6. Checks.
    answered = {e.body["request_id"]: e.body["version"] for e in result.exchanges if e.status == 200}
    versions = [e.body["version"] for e in result.exchanges if e.status == 200]
    failed = [e for e in result.exchanges if e.status != 200]
    stored = _stored_versions(workspace, set(answered))
    summary["switch"] = {
        **result.summary(),
        "failed": len(failed),
        "answered_by": {champion.name: versions.count(champion.name), candidate.name: versions.count(candidate.name)},
        "switched": bool(versions) and versions[-1] == candidate.name and versions[0] == champion.name,
        "stored_rows_naming_the_answering_version": sum(stored.get(r) == v for r, v in answered.items()),
        "answered_requests": len(answered),
    }
    ok = (
        not failed
        and summary["switch"]["switched"]
        and summary["switch"]["stored_rows_naming_the_answering_version"] == len(answered)
    )
    return _finish(summary, args.report, clock, ok)


def _stored_versions(workspace: Path, request_ids: set[str]) -> dict[str, str]:
    from sqlalchemy import text

    from forgeml.serve.records import RecordStore
    from forgeml.store import database_url

    store = RecordStore(database_url(workspace))
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT request_id, version FROM predictions")).all()
    return {request_id: version for request_id, version in rows if request_id in request_ids}


def _finish(summary: dict, report: Path | None, clock: float, ok: bool) -> int:
    summary["seconds"] = round(time.perf_counter() - clock, 1)
    summary["ok"] = ok
    text = json.dumps(summary, indent=2)
    print(text)
    if report:
        report.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
