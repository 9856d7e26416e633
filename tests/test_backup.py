"""Workspace backup and restore: a consistent archive taken while the service writes, a restore that gives
the same predictions and a store that points at the new place, damaged or crafted archives refused before
anything is written, encrypted runs kept encrypted, and a PostgreSQL store dumped and restored."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

import forgeml
from forgeml.backup import backup_workspace, read_manifest, restore_workspace
from forgeml.encryption import EncryptionError, encrypt_run, generate_key
from forgeml.errors import ArtifactError, ForgeError
from forgeml.serve.records import RecordStore
from forgeml.store import Store
from forgeml.workspace import RunDir, sha256_file

from conftest import sentiment_rows, write_csv

TEXTS = [row["text"] for row in sentiment_rows(16, seed=5)]
KEY = generate_key()


@pytest.fixture(scope="module")
def trained(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny finished run in its own workspace (with the store's forgeml.db), and its predictions."""
    workspace = tmp_path_factory.mktemp("workspace")
    data = write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", sentiment_rows(160))
    config = {
        "name": "tiny",
        "task": "text-classification",
        "data": {"train": str(data), "split": {"validation": 0.15, "test": 0.15}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None, "threads": 1},
    }
    run_dir = forgeml.run(config, workspace=workspace).run_dir
    # What an interrupted atomic write leaves behind: never archived.
    (run_dir / ".metrics.json.1234.tmp").write_text("half")
    predictions = json.dumps(forgeml.load(run_dir).predict(TEXTS))
    return {"workspace": workspace, "run": run_dir, "predictions": predictions}


@pytest.fixture(scope="module")
def archive(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backup of the trained workspace, for the tests that damage or rebuild it."""
    output = tmp_path_factory.mktemp("archives") / "workspace.tar.zst"
    backup_workspace(trained["workspace"], output)
    return output


def sqlite_count(database: Path, table: str) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def wait_until(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the writer thread stopped writing"
        time.sleep(0.01)  # polling the database, not timing anything


def tree_hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): sha256_file(path) for path in folder.rglob("*") if path.is_file()}


def everything_under(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


# --- a backup while the service writes, restored elsewhere -------------------------------------------


def test_backup_while_writing_restores_the_same_runs_and_a_consistent_store(trained: dict, tmp_path: Path) -> None:
    workspace, database = trained["workspace"], trained["workspace"] / "forgeml.db"
    records = RecordStore(f"sqlite:///{database}")
    stop = threading.Event()

    def serve() -> None:  # what a running server does: predictions, now and then a correction
        count = 0
        while not stop.is_set():
            request = uuid.uuid4().hex
            records.add_predictions("tiny", "1", [(request, [f"text {count}"], [{"label": "positive"}])])
            if count % 4 == 0:
                records.add_feedback(request_id=request, position=0, model="tiny", version="1", inputs="x", label="bad")
            count += 1
            time.sleep(0.001)  # lets the backup thread have the GIL too

    writer = threading.Thread(target=serve, daemon=True)
    writer.start()
    try:
        wait_until(lambda: sqlite_count(database, "predictions") >= 20)
        summary = backup_workspace(workspace, tmp_path / "backup.tar.zst")
        assert (database.parent / "forgeml.db-wal").exists()  # a WAL store was being written meanwhile
        recorded = read_manifest(tmp_path / "backup.tar.zst")["database"]["tables"]
        wait_until(lambda: sqlite_count(database, "predictions") > recorded["predictions"] + 10)  # it kept growing
    finally:
        stop.set()
        writer.join(timeout=30)
        records.close()

    manifest = read_manifest(tmp_path / "backup.tar.zst")
    assert manifest["database"]["kind"] == "sqlite" and summary["rows"] == recorded
    assert recorded["predictions"] >= 20 and recorded["feedback"] >= 5 and recorded["runs"] == 1
    paths = [member["path"] for member in manifest["members"]]
    assert paths[-1] == "forgeml.db" and all(path.startswith("runs/") for path in paths[:-1])
    assert not [path for path in paths if path.endswith(("-wal", "-shm")) or "/." in path]

    target = tmp_path / "restored"
    restored = restore_workspace(tmp_path / "backup.tar.zst", target)
    assert restored["rows"] == recorded and restored["rewritten_paths"] == 1
    assert sqlite_count(target / "forgeml.db", "predictions") == recorded["predictions"]
    assert sqlite_count(target / "forgeml.db", "feedback") == recorded["feedback"]
    assert sqlite_count(database, "predictions") > recorded["predictions"]

    # Every run file came back byte for byte (the dot-file did not), and the run's own manifest verifies.
    source_run, restored_run = trained["run"], target / trained["run"].relative_to(workspace)
    source_files = {name: digest for name, digest in tree_hashes(source_run).items() if not name.startswith(".")}
    assert tree_hashes(restored_run) == source_files
    by_path = {member["path"]: member["sha256"] for member in manifest["members"]}
    for name, digest in source_files.items():
        assert by_path[restored_run.relative_to(target).as_posix() + "/" + name] == digest
    RunDir.open(restored_run).verify()
    assert json.dumps(forgeml.load(restored_run).predict(TEXTS)) == trained["predictions"]

    # The store points at the restored runs, not at the old workspace.
    store = Store(f"sqlite:///{target / 'forgeml.db'}")
    assert [Path(run["path"]) for run in store.runs()] == [restored_run]
    assert store.locate("tiny") == restored_run
    assert Path(Store(f"sqlite:///{database}").runs()[0]["path"]) == source_run  # the source is untouched


def test_backup_leaves_out_temporary_files_and_links_and_keeps_empty_folders(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    run = workspace / "runs" / "toy" / "20260101-000000-abcd"
    (run / "plots").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    for leftover in (".forgeml-process.json", ".metrics.json.1234.tmp", "study.db-wal", "study.db-shm"):
        (run / leftover).write_text("not archived")
    (run / "link").symlink_to(run / "metrics.json")
    (run / "folder-link").symlink_to(run / "plots")

    summary = backup_workspace(workspace, tmp_path / "backup.tar.zst")
    assert summary["database"] == "none" and summary["files"] == 1
    assert sorted(summary["skipped"]) == [
        "runs/toy/20260101-000000-abcd/folder-link (a link or special file)",
        "runs/toy/20260101-000000-abcd/link (a link or special file)",
    ]
    restore_workspace(tmp_path / "backup.tar.zst", tmp_path / "restored")
    restored = {name.removeprefix("runs/toy/20260101-000000-abcd") for name in everything_under(tmp_path / "restored")}
    assert restored == {"runs", "runs/toy", "", "/plots", "/metrics.json"}
    assert (tmp_path / "restored" / "runs" / "toy" / run.name / "plots").is_dir()

    (tmp_path / "nothing").mkdir()
    with pytest.raises(ForgeError, match="no runs/ folder and no database"):
        backup_workspace(tmp_path / "nothing", tmp_path / "nothing.tar.zst")
    assert not (tmp_path / "nothing.tar.zst").exists()


# --- damaged archives ---------------------------------------------------------------------------------


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "one byte flipped": flip_middle_byte,
    "cut in half": lambda data: data[: len(data) // 2],
    "last 3 bytes lost": lambda data: data[:-3],  # only the frame's checksum is incomplete
    "data appended": lambda data: data + b"more",
    "not zstd": lambda data: b"\x00" * 4096,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_archive_is_refused_before_anything_is_written(
    archive: Path, tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    damaged = tmp_path / "damaged.tar.zst"
    damaged.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(ArtifactError, match=r"damaged|truncated|ends early|after the end|decompress"):
        restore_workspace(damaged, tmp_path / "target")
    assert everything_under(tmp_path) == {"damaged.tar.zst"}  # no target, no half-restored temporary folder


def unpack(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The archive's members with their content, to rebuild it changed (decompressed in memory: it is small)."""
    data = zstandard.ZstdDecompressor().decompressobj().decompress(archive.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(member, tar.extractfile(member).read() if member.isreg() else b"") for member in tar.getmembers()]


def repack(members: list[tuple[tarfile.TarInfo, bytes]], output: Path) -> Path:
    """A well-formed .tar.zst of these members: the compression is valid, only the content is what we say."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, content in members:
            if member.isreg():
                member.size = len(content)
            tar.addfile(member, io.BytesIO(content) if member.isreg() else None)
    output.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(buffer.getvalue()))
    return output


def file_member(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), content


def with_manifest(members: list[tuple[tarfile.TarInfo, bytes]], change: Callable[[dict], None]) -> list:
    manifest = json.loads(members[0][1])
    change(manifest)
    return [file_member("manifest.json", json.dumps(manifest).encode()), *members[1:]]


def weights(members: list) -> int:
    return next(i for i, (member, _) in enumerate(members) if member.name.endswith("model.safetensors"))


def change_weights(members: list) -> list:
    index = weights(members)
    member, content = members[index]
    members[index] = (member, flip_middle_byte(content))
    return members


def drop_weights(members: list) -> list:
    return [item for i, item in enumerate(members) if i != weights(members)]


def add_unlisted(members: list) -> list:
    run = members[weights(members)][0].name.rsplit("/model/", 1)[0]
    return [*members, file_member(f"{run}/extra.txt", b"not in the manifest")]


def grow_weights(members: list) -> list:
    index = weights(members)
    members[index] = (members[index][0], members[index][1] + b"\x00")
    return members


def manifest_not_first(members: list) -> list:
    return [*members[1:], members[0]]


ALTERED = {
    "changed member": (change_weights, r"model\.safetensors'?: SHA-256 [0-9a-f]{64} does not match"),
    "missing member": (drop_weights, r"model\.safetensors'? in the manifest but not in the archive"),
    "extra member": (add_unlisted, r"extra\.txt'? is not in the manifest"),
    "longer member": (grow_weights, r"model\.safetensors'?: \d+ bytes, but the manifest records \d+"),
    "manifest not first": (manifest_not_first, "not a forgeml backup"),
}


@pytest.mark.parametrize("alter", ALTERED.values(), ids=ALTERED.keys())
def test_altered_member_is_refused_and_named(archive: Path, tmp_path: Path, alter: tuple) -> None:
    change, message = alter
    altered = repack(change(unpack(archive)), tmp_path / "altered.tar.zst")
    with pytest.raises(ArtifactError, match=message):
        restore_workspace(altered, tmp_path / "target")
    assert everything_under(tmp_path) == {"altered.tar.zst"}


def test_unchanged_repack_restores(archive: Path, tmp_path: Path) -> None:
    """The rebuilt archives above fail because of what was changed, not because of how they were rebuilt."""
    rebuilt = repack(unpack(archive), tmp_path / "rebuilt.tar.zst")
    assert restore_workspace(rebuilt, tmp_path / "target")["files"] == len(read_manifest(archive)["members"])


# --- where a restore may write ------------------------------------------------------------------------


def test_restore_refuses_a_non_empty_folder(archive: Path, tmp_path: Path) -> None:
    target = tmp_path / "workspace"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not empty"):
        restore_workspace(archive, target)
    assert everything_under(tmp_path) == {"workspace", "workspace/notes.txt"}
    (target / "notes.txt").unlink()
    restore_workspace(archive, target)  # an empty folder is fine
    assert (target / "forgeml.db").is_file()


def listed(name: str, content: bytes) -> Callable[[dict], None]:
    """Adds a member to the manifest with its true size and hash: only its path or type is wrong."""

    def change(manifest: dict) -> None:
        manifest["members"].append({"path": name, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()})

    return change


def link(name: str, to: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, to
    return member, b""


CRAFTED = {
    "../evil (listed)": lambda m, evil: with_manifest([*m, file_member("../evil", b"x")], listed("../evil", b"x")),
    "../evil (not listed)": lambda m, evil: [*m, file_member("../evil", b"x")],
    "runs/../../evil": lambda m, evil: [*m, file_member("runs/../../evil", b"x")],
    "absolute path": lambda m, evil: with_manifest([*m, file_member(str(evil), b"x")], listed(str(evil), b"x")),
    "absolute path (not listed)": lambda m, evil: [*m, file_member(str(evil), b"x")],
    "symlink": lambda m, evil: with_manifest(
        [*m, link("runs/tiny/evil", str(evil), tarfile.SYMTYPE)], listed("runs/tiny/evil", b"")
    ),
    "hard link": lambda m, evil: with_manifest(
        [*m, link("runs/tiny/evil", "forgeml.db", tarfile.LNKTYPE)], listed("runs/tiny/evil", b"")
    ),
    "device": lambda m, evil: with_manifest(
        [*m, link("runs/tiny/evil", "", tarfile.CHRTYPE)], listed("runs/tiny/evil", b"")
    ),
}


@pytest.mark.parametrize("craft", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_member_cannot_escape_the_target(archive: Path, tmp_path: Path, craft: Callable) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # Relative to the target tmp_path/outside/target, "../evil" is tmp_path/outside/evil.
    crafted = repack(craft(unpack(archive), outside / "evil"), tmp_path / "crafted.tar.zst")
    with pytest.raises(ArtifactError, match=r"refused|climbs out|absolute|outside runs"):
        restore_workspace(crafted, outside / "target")
    assert everything_under(outside) == set()
    assert not Path("evil").exists() and not (tmp_path / "evil").exists()


# --- encrypted runs -----------------------------------------------------------------------------------


def test_encrypted_run_stays_encrypted(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = tmp_path / "encrypted"
    run = workspace / trained["run"].relative_to(trained["workspace"])
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns(".*"))
    monkeypatch.setenv("FORGEML_KEY", KEY)
    encrypt_run(run)
    sealed = tree_hashes(run)
    assert "model/model.safetensors.enc" in sealed and "model/model.safetensors" not in sealed

    summary = backup_workspace(workspace, tmp_path / "encrypted.tar.zst")  # runs only: this workspace has no store
    assert summary["database"] == "none" and summary["files"] == len(sealed)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress((tmp_path / "encrypted.tar.zst").read_bytes())
    plain_weights = (trained["run"] / "model" / "model.safetensors").read_bytes()
    assert plain_weights[4096:4160] not in raw  # no window of the plaintext weights is in the archive

    target = tmp_path / "restored"
    restore_workspace(tmp_path / "encrypted.tar.zst", target)
    restored_run = target / run.relative_to(workspace)
    assert tree_hashes(restored_run) == sealed  # the same ciphertext, and nothing in plaintext
    assert json.dumps(forgeml.load(restored_run).predict(TEXTS)) == trained["predictions"]
    monkeypatch.delenv("FORGEML_KEY")
    with pytest.raises(EncryptionError, match="encrypted"):
        forgeml.load(restored_run)


# --- a PostgreSQL store -------------------------------------------------------------------------------


def test_postgres_store_is_dumped_and_restored(trained: dict, postgres_url: str, tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("pg_dump / pg_restore not found (Debian: apt-get install postgresql-client)")
    run_dir = trained["run"]
    store = Store(postgres_url)  # the run as the pipeline records it in a PostgreSQL store
    store.start_run(id=run_dir.name, name="tiny", task="text-classification", path=str(run_dir), config_hash="0")
    store.update_run(run_dir.name, status="finished")
    store.engine.dispose()
    records = RecordStore(postgres_url)
    records.add_predictions("tiny", "1", [(uuid.uuid4().hex, ["a", "b", "c"], [{"label": "positive"}] * 3)])
    records.close()

    archive = tmp_path / "pg.tar.zst"
    summary = backup_workspace(trained["workspace"], archive, db_url=postgres_url)
    assert summary["database"] == "postgresql" and summary["rows"]["predictions"] == 3 and summary["rows"]["runs"] == 1
    assert read_manifest(archive)["members"][-1]["path"] == "database.pgdump"

    target = tmp_path / "restored"
    with pytest.raises(ArtifactError, match="PostgreSQL URL"):
        restore_workspace(archive, target)  # a dump needs a database to go into
    with pytest.raises(ArtifactError, match="already has the store's tables"):
        restore_workspace(archive, target, db_url=postgres_url)  # never over an existing store
    assert not target.exists()

    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE DATABASE restored")
    engine.dispose()
    restored_url = postgres_url.rsplit("/", 1)[0] + "/restored"
    restored = restore_workspace(archive, target, db_url=restored_url)
    assert restored["rows"] == summary["rows"] and restored["rewritten_paths"] == 1
    restored_run = target / run_dir.relative_to(trained["workspace"])
    assert Store(restored_url).locate("tiny") == restored_run
    assert RunDir.open(restored_run).verify() is None
    assert not (target / "database.pgdump").exists() and not (target / "forgeml.db").exists()


def test_cli_backup_restore_and_a_refused_archive(trained: dict, tmp_path: Path) -> None:
    from test_cli import forgeml_cli

    workspace = trained["workspace"]
    feedback = workspace / "feedback" / "tiny" / "20260101-000000.jsonl"  # what `forgeml retrain` writes
    feedback.parent.mkdir(parents=True, exist_ok=True)
    feedback.write_text('{"text": "a fine film", "label": "positive"}\n')
    output = tmp_path / "ws.tar.zst"
    made = forgeml_cli("backup", "-o", str(output), "--workspace", str(workspace))
    assert made.returncode == 0, made.stderr
    assert "store rows at the snapshot" in made.stdout
    listed = forgeml_cli("backup", "--list", str(output))
    assert listed.returncode == 0 and "files, made" in listed.stdout
    restored = forgeml_cli("restore", str(output), "--workspace", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "restored" / "feedback" / "tiny" / feedback.name).read_bytes() == feedback.read_bytes()
    damaged = tmp_path / "damaged.tar.zst"
    damaged.write_bytes(flip_middle_byte(output.read_bytes()))
    refused = forgeml_cli("restore", str(damaged), "--workspace", str(tmp_path / "elsewhere"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())
