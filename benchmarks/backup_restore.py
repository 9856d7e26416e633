"""Backup while a server writes, restore elsewhere, and check that nothing changed.

    python benchmarks/backup_restore.py --workspace /tmp/loopws     # the workspace of examples/loop/loop.py

1. `forgeml serve sst2@champion` on the workspace, with 8 clients sending predictions (and one in ten a
   correction) the whole time;
2. `forgeml backup -o ws.tar.zst` while they do;
3. `forgeml restore ws.tar.zst --workspace EMPTY`: every member's hash is checked before anything is
   written;
4. checks: the restored store's predictions and feedback row counts equal the manifest's (the backup's
   moment), while the source kept growing; `forgeml predict` of the restored champion on the 872 SST-2
   validation sentences is byte-identical to the source's; an archive with one byte flipped is refused
   with exit code 2 and nothing is written.

Writes benchmarks/backup_restore.json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from forgeml.backup import read_manifest
from forgeml.registry import Registry
from forgeml.serve.loadgen import closed_loop
from forgeml.store import database_url

HERE = Path(__file__).resolve().parent
VALIDATION = HERE.parent.parent / "shared" / "datasets" / "sst2" / "validation.csv"


def forgeml(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forgeml.cli", *args], capture_output=True, text=True)


def counts(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as connection:
        return {t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("predictions", "feedback")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8798)
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="forgeml-backup-"))
    command = [sys.executable, "-m", "forgeml.cli", "serve", "sst2@champion", "--no-auth", "--port", str(args.port)]
    server = subprocess.Popen([*command, "--workspace", str(workspace)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while closed_loop(args.port, lambda i: ("GET", "/readyz", None, {}), 1, total=1).exchanges[0].status != 200:
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.5)
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        def request(index: int):
            if index % 10 == 0:
                return "POST", "/v1/feedback", {"inputs": f"a correction {index}", "label": "positive"}, {}
            return "POST", "/v1/predict", {"inputs": f"a fine film, number {index}"}, {}

        while not stop.is_set():
            statuses.extend(e.status for e in closed_loop(args.port, request, 8, duration_s=2).exchanges)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(5)  # the load is running before the backup starts
    archive = scratch / "ws.tar.zst"
    started = time.perf_counter()
    made = forgeml("backup", "-o", str(archive), "--workspace", str(workspace))
    backup_seconds = time.perf_counter() - started
    time.sleep(3)  # and goes on after it
    stop.set()
    loader.join()
    server.terminate()
    server.wait(timeout=60)
    assert made.returncode == 0, made.stderr
    manifest = read_manifest(archive)
    source_after = counts(workspace / "forgeml.db")

    target = scratch / "restored"
    started = time.perf_counter()
    restored = forgeml("restore", str(archive), "--workspace", str(target))
    restore_seconds = time.perf_counter() - started
    assert restored.returncode == 0, restored.stderr
    restored_counts = counts(target / "forgeml.db")
    at_backup = manifest["database"]["tables"]

    champion = Path(Registry(database_url(workspace)).resolve("sst2@champion")["run_path"])
    copy = target / champion.relative_to(workspace)
    outputs = []
    for run in (champion, copy):
        output = scratch / f"{run.parent.parent.parent.name}-predictions.csv"
        done = forgeml("predict", str(run), str(VALIDATION), "-o", str(output), "--quiet")
        assert done.returncode == 0, done.stderr
        outputs.append(output.read_bytes())

    damaged = scratch / "damaged.tar.zst"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    refused = forgeml("restore", str(damaged), "--workspace", str(scratch / "elsewhere"))
    elsewhere = scratch / "elsewhere"
    report = {
        "archive_bytes": archive.stat().st_size,
        "backup_seconds": round(backup_seconds, 1),
        "restore_seconds": round(restore_seconds, 1),
        "requests_during": len(statuses),
        "non_2xx": sum(s not in (200, 201) for s in statuses),
        "rows_at_backup": {t: at_backup[t] for t in ("predictions", "feedback")},
        "rows_restored": restored_counts,
        "rows_in_source_after": source_after,
        "counts_equal": all(restored_counts[t] == at_backup[t] for t in restored_counts),
        "predictions_byte_identical": outputs[0] == outputs[1],
        "damaged_exit_code": refused.returncode,
        "damaged_wrote_nothing": not elsewhere.exists() or not any(elsewhere.iterdir()),
    }
    (HERE / "backup_restore.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = report["counts_equal"] and report["predictions_byte_identical"] and report["damaged_exit_code"] == 2
    return 0 if ok and report["damaged_wrote_nothing"] else 1


if __name__ == "__main__":
    sys.exit(main())
