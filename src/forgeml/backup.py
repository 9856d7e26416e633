"""A workspace in one file, and back: `backup_workspace` writes a `.tar.zst` archive of the run folders and
a consistent snapshot of the store; `restore_workspace` checks every byte of it before writing anything.

Archive layout (a tar stream, PAX format, in one zstandard frame with its content checksum):

    manifest.json        first, so `read_manifest` is cheap: format, when, forgeml version, the source
                         workspace, the database kind and its row counts per table, and the path, size
                         and SHA-256 of every member below
    runs/<name>/<id>/... the run folders' files as they are on disk (encrypted runs stay encrypted)
    forgeml.db           SQLite: a snapshot taken with SQLite's online backup API, or
    database.pgdump      PostgreSQL: `pg_dump --format=custom` of the store's database

The manifest must come first but hashes are known only after reading, so a backup reads everything
twice: once to hash (after snapshotting the database to a temporary file, so the snapshot does not move
under it) and once to stream. Restoring also reads twice: the first pass checks every member against the
manifest (hash, size, nothing missing or extra, only plain files and folders at safe paths) and writes
nothing; only then the second pass extracts into a temporary folder beside the target, checking again
what it writes, and moves it into place.

What the archive's checks protect against is damage (a bad disk, a truncated copy, an edited member),
not a forger: whoever can rewrite a member can rewrite the manifest too. Keep backups where only you can
write, and encrypt runs (`forgeml run --encrypt`) whose weights must stay private.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any
from urllib.parse import quote

import zstandard
from sqlalchemy import Connection, MetaData, String, Table, create_engine, func, inspect, literal, or_, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DatabaseError, OperationalError

from forgeml import __version__
from forgeml.errors import ArtifactError, ForgeError
from forgeml.store import connect, database_url
from forgeml.workspace import fsync_directory

FORMAT = "forgeml-backup"
FORMAT_VERSION = 1
MANIFEST_MEMBER = "manifest.json"
SQLITE_MEMBER = "forgeml.db"
POSTGRES_MEMBER = "database.pgdump"
RUNS = "runs"
# The workspace's folders a backup holds: the runs, and the corrections files `forgeml retrain` wrote (a
# retrained run's config names its file there).
FOLDERS = (RUNS, "feedback")
COMPRESSION_LEVEL = 3  # zstd's default: near gzip -9's ratio at several times its speed
BLOCK = 1 << 20
# Compressed bytes fed to the decoder per step. zstd expands 4 bytes into up to 128 KiB (a block of one
# repeated byte, e.g. a file of zeros), so a step of 512 bytes decodes to 16 MiB at most, whatever the
# input; the extra calls cost about 0.2 s per 100 MB.
COMPRESSED_STEP = 1 << 9
MANIFEST_LIMIT = 256 << 20  # a manifest larger than this is not one we wrote
SQLITE_SIDECARS = ("-wal", "-shm")  # SQLite's write-ahead log and its index: the snapshot already holds their pages


# --- backup ----------------------------------------------------------------------------------


def backup_workspace(workspace: Path, output: Path, db_url: str | None = None) -> dict[str, Any]:
    """Write the workspace's runs and store database into one `.tar.zst` archive at `output`.

    `db_url` is the store to back up; by default the workspace's (`$FORGEML_DB_URL`, else its
    `forgeml.db`). Safe while a server or a training run keeps writing: the database is copied as one
    consistent snapshot, and a run file that changes between the two reads fails the backup instead of
    producing an archive that does not match its manifest. `output` appears complete or not at all.

    Returns {"path", "files", "bytes" (uncompressed), "archive_bytes", "database", "rows", "skipped"}.
    """
    workspace, output = Path(workspace).resolve(), Path(output).resolve()
    if not workspace.is_dir():
        raise ForgeError(f"backup: workspace {workspace} is not a folder")
    if output.is_dir():
        raise ForgeError(
            f"backup: {output} is a folder; give the archive's file name, e.g. {output / 'backup.tar.zst'}"
        )
    for name in FOLDERS:
        if output.is_relative_to(workspace / name):
            raise ForgeError(
                f"backup: write the archive outside {workspace / name} (it would end up in the next backup)"
            )
    url = db_url or database_url(workspace)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".scratch"))
    try:
        database = _snapshot_database(url, scratch, explicit=db_url is not None)
        # Listed after the snapshot: a run's folder exists before the store records it, so every run the
        # snapshot knows has its files in the archive.
        files, directories, skipped = _run_files(workspace)
        if not files and not directories and database["kind"] == "none":
            raise ForgeError(f"backup: {workspace} has no {RUNS}/ folder and no database; is it a forgeml workspace?")
        sources = dict(files)
        if database["kind"] != "none":
            sources[database["member"]] = scratch / database["member"]
        members = []
        for relative, path in sources.items():  # first pass: hashes, for the manifest that goes first
            digest, size = _hash_file(path, relative)
            members.append({"path": relative, "size": size, "sha256": digest})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "forgeml_version": __version__,
            "workspace": str(workspace),  # lets a restore rewrite the store's absolute run paths
            "database": database,
            "members": members,
            "directories": directories,
        }
        with _atomic_output(output) as handle:
            _write_archive(handle, manifest, sources)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "path": str(output),
        "files": len(members),
        "bytes": sum(member["size"] for member in members),
        "archive_bytes": output.stat().st_size,
        "database": database["kind"],
        "rows": database["tables"],
        "skipped": skipped,
    }


def _run_files(workspace: Path) -> tuple[dict[str, Path], list[str], list[str]]:
    """The files to archive under runs/ (by archive path), its empty folders, and what was left out and why.

    Left out silently: names starting with '.' (temporary files of interrupted writes, the running-process
    marker) and SQLite's -wal/-shm sidecars. Left out and reported: links and special files, which a
    restore would refuse.
    """
    files: dict[str, Path] = {}
    directories: list[str] = []
    skipped: list[str] = []
    for root in (workspace / name for name in FOLDERS):
        if root.is_dir():
            _walk_folder(workspace, root, files, directories, skipped)
    return files, directories, skipped


def _walk_folder(
    workspace: Path, root: Path, files: dict[str, Path], directories: list[str], skipped: list[str]
) -> None:
    for folder, subfolders, names in os.walk(root):  # os.walk does not follow links to folders
        folder_path = Path(folder)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        kept = 0
        for name in sorted(names) + [name for name in subfolders if (folder_path / name).is_symlink()]:
            path = folder_path / name
            relative = path.relative_to(workspace).as_posix()
            if name.startswith(".") or name.endswith(SQLITE_SIDECARS):
                continue
            if path.is_symlink() or not path.is_file():
                skipped.append(f"{relative} (a link or special file)")
                continue
            files[relative] = path
            kept += 1
        subfolders[:] = [name for name in subfolders if not (folder_path / name).is_symlink()]
        if not kept and not subfolders and folder_path != root:
            directories.append(folder_path.relative_to(workspace).as_posix())


def _snapshot_database(url: str, scratch: Path, explicit: bool) -> dict[str, Any]:
    """Copy the store into `scratch` as it is at one moment, with the row count of each table at that moment."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        if not path or path == ":memory:":
            raise ForgeError(f"backup: {url} is not a database file")
        if not Path(path).is_file():
            if explicit:
                raise ForgeError(f"backup: database {path} does not exist")
            return {"kind": "none", "member": None, "tables": {}}
        snapshot = scratch / SQLITE_MEMBER
        _sqlite_snapshot(Path(path), snapshot)
        engine = create_engine(f"sqlite:///{snapshot}")
        try:
            with engine.connect() as connection:
                tables = _row_counts(connection)
        finally:
            engine.dispose()
        return {"kind": "sqlite", "member": SQLITE_MEMBER, "tables": tables}
    if url.startswith("postgresql"):
        tables = _pg_dump(url, scratch / POSTGRES_MEMBER)
        return {"kind": "postgresql", "member": POSTGRES_MEMBER, "format": "pg_dump custom", "tables": tables}
    raise ForgeError(f"backup: the store at {url.split('://')[0]}://... cannot be backed up; SQLite and PostgreSQL can")


def _sqlite_snapshot(source_path: Path, snapshot: Path) -> None:
    # The online backup API copies every page inside one read transaction: in WAL mode writers go on
    # writing meanwhile, and the copy is the database as of the moment the transaction began.
    try:
        # mode=rw: never creates a database; quote(): a path may hold '?' or '#'
        source = sqlite3.connect(f"file:{quote(str(source_path))}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as error:
        raise ForgeError(f"backup: cannot open the database {source_path}: {error}") from None
    copy = sqlite3.connect(snapshot)
    try:
        source.backup(copy)
        # One self-contained file (no -wal beside it); the store switches it back to WAL when it opens it.
        copy.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as error:
        raise ForgeError(f"backup: copying the database {source_path} failed: {error}") from None
    finally:
        copy.close()
        source.close()


def _pg_dump(url: str, target: Path) -> dict[str, int]:
    """Dump the PostgreSQL database at `url`; returns its row counts in the very snapshot that was dumped."""
    if shutil.which("pg_dump") is None:
        raise ForgeError(
            "backup: the store is PostgreSQL and `pg_dump` is not installed "
            "(Debian/Ubuntu: apt-get install postgresql-client; its major version must be at least the server's)"
        )
    dsn, env = _libpq_target(url)
    with _server(url, "backup") as engine, engine.connect() as connection:
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            # pg_dump reads the snapshot this transaction exported, so the counts and the dump agree
            # although other clients keep writing.
            snapshot = connection.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
            tables = _row_counts(connection)
            command = ["pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}"]
            _run_postgres_tool([*command, f"--file={target}", f"--dbname={dsn}"], env, "backup")
    return tables


def _write_archive(handle: IO[bytes], manifest: dict[str, Any], sources: dict[str, Path]) -> None:
    """Second pass: stream manifest.json, then every member, through tar into one zstd frame."""
    compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL, write_checksum=True)
    with (
        compressor.stream_writer(handle, closefd=False) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        data = json.dumps(manifest, indent=2).encode("utf-8") + b"\n"
        tar.addfile(_tar_info(MANIFEST_MEMBER, len(data), datetime.now(UTC).timestamp()), io.BytesIO(data))
        for directory in manifest["directories"]:
            info = _tar_info(directory, 0, datetime.now(UTC).timestamp(), mode=0o755)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for member in manifest["members"]:
            _add_file(tar, member, sources[member["path"]])


def _add_file(tar: tarfile.TarFile, member: dict[str, Any], path: Path) -> None:
    relative = member["path"]
    changed = ForgeError(
        f"backup: {path} changed while the backup was being written (is a run still writing it?); "
        "run the backup again, or when the run has finished"
    )
    try:
        with open(path, "rb") as source:
            info = os.fstat(source.fileno())
            reader = _HashingReader(source)
            tar.addfile(_tar_info(relative, member["size"], info.st_mtime, info.st_mode & 0o755), reader)
    except FileNotFoundError:
        raise ForgeError(f"backup: {path} disappeared while the backup was being written; run it again") from None
    except OSError as error:
        if "unexpected end of data" in str(error):  # tarfile: the file is shorter than it was when hashed
            raise changed from None
        raise
    if reader.digest.hexdigest() != member["sha256"]:
        raise changed


def _tar_info(name: str, size: int, mtime: float, mode: int = 0o644) -> tarfile.TarInfo:
    # Owner and group are left out: they mean nothing on the machine that restores.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), mode | 0o600
    return info


class _HashingReader:
    """A file that hashes what is read from it (tarfile reads exactly the member's size)."""

    def __init__(self, source: IO[bytes]):
        self.source, self.digest = source, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data


def _hash_file(path: Path, relative: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(BLOCK), b""):
                digest.update(block)
                size += len(block)
    except FileNotFoundError:
        raise ForgeError(f"backup: {relative} disappeared while the backup was being written; run it again") from None
    return digest.hexdigest(), size


@contextmanager
def _atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """Stream into a temporary file beside `path`, then rename (as `workspace.atomic_write_bytes` does)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # The archive keeps mkstemp's mode 0600: it holds the store (API key hashes, served inputs, feedback).
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


# --- reading an archive ----------------------------------------------------------------------


def read_manifest(archive: Path) -> dict[str, Any]:
    """The manifest of a backup (it is the archive's first member, so this reads only the start)."""
    archive = Path(archive)
    with _open_tar(archive) as tar:
        return _read_manifest_member(archive, tar)


@contextmanager
def _open_tar(archive: Path, to_the_end: bool = False) -> Iterator[tarfile.TarFile]:
    """The archive as a tar stream; damage found while reading it becomes an ArtifactError that says so.

    With `to_the_end`, what follows the tar's end marker is read too, so that the zstd frame's checksum
    is checked and a frame cut short, even by a few bytes, is noticed.
    """
    if not archive.is_file():
        raise ArtifactError(f"{archive}: no such backup archive")
    try:
        with open(archive, "rb") as raw:
            reader = _ZstdReader(raw, archive)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                yield tar
            while to_the_end and reader.read(BLOCK):
                pass
    except (tarfile.TarError, EOFError) as error:
        raise ArtifactError(f"{archive}: damaged or truncated archive ({error})") from None


class _ZstdReader:
    """Decompresses one zstd frame for tarfile, refusing a frame that ends early or has data after it.

    zstandard's own stream readers end quietly on a truncated frame; the decompression object says
    whether the frame was complete (`eof`) and checks its content checksum.
    """

    def __init__(self, raw: IO[bytes], archive: Path):
        self.raw, self.archive = raw, archive
        self.decoder = zstandard.ZstdDecompressor().decompressobj()
        self.buffer = bytearray()
        self.finished = False

    def read(self, size: int = -1) -> bytes:
        while not self.finished and (size < 0 or len(self.buffer) < size):
            chunk = self.raw.read(COMPRESSED_STEP)
            if not chunk:
                self.finished = True
                if not self.decoder.eof:
                    raise ArtifactError(f"{self.archive}: the archive ends early (truncated); it is incomplete")
                break
            if self.decoder.eof:
                raise ArtifactError(f"{self.archive}: unexpected data after the end of the archive")
            try:
                self.buffer += self.decoder.decompress(chunk)
            except zstandard.ZstdError as error:
                raise ArtifactError(
                    f"{self.archive}: cannot be decompressed ({error}); it is damaged or not a forgeml backup"
                ) from None
            if self.decoder.eof and self.decoder.unused_data:
                raise ArtifactError(f"{self.archive}: unexpected data after the end of the archive")
        taken = bytes(self.buffer if size < 0 else self.buffer[:size])
        del self.buffer[: len(taken)]
        return taken


def _read_manifest_member(archive: Path, tar: tarfile.TarFile) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST_MEMBER or not first.isreg() or first.size > MANIFEST_LIMIT:
        raise ArtifactError(f"{archive}: not a forgeml backup (its first member is not {MANIFEST_MEMBER})")
    handle = tar.extractfile(first)
    assert handle is not None  # a regular member always has a file
    try:
        manifest = json.loads(handle.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{archive}: {MANIFEST_MEMBER} is not valid JSON ({error})") from None
    _check_manifest(archive, manifest)
    return manifest


def _check_manifest(archive: Path, manifest: Any) -> None:
    """The manifest has what a restore relies on, and describes only safe, non-overlapping paths."""

    def refuse(problem: str) -> ArtifactError:
        return ArtifactError(f"{archive}: {MANIFEST_MEMBER} {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise refuse(f"does not say format {FORMAT!r}: not a forgeml backup")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise refuse(f"has format_version {version!r}; this forgeml reads up to {FORMAT_VERSION} (upgrade forgeml)")
    database = manifest.get("database")
    if not isinstance(database, dict) or database.get("kind") not in ("none", "sqlite", "postgresql"):
        raise refuse("does not say which database it holds (database.kind: none, sqlite or postgresql)")
    expected_member = {"none": None, "sqlite": SQLITE_MEMBER, "postgresql": POSTGRES_MEMBER}[database["kind"]]
    if database.get("member") != expected_member or not isinstance(database.get("tables"), dict):
        raise refuse(f"database.member should be {expected_member!r} for a {database['kind']} database")
    members, directories = manifest.get("members"), manifest.get("directories", [])
    if not isinstance(members, list) or not isinstance(directories, list):
        raise refuse("has no list of members")
    if not isinstance(manifest.get("workspace"), str):
        raise refuse("does not record the source workspace")
    seen: set[str] = set()
    for member in members:
        if not (
            isinstance(member, dict)
            and isinstance(member.get("path"), str)
            and isinstance(member.get("size"), int)
            and member["size"] >= 0
            and isinstance(member.get("sha256"), str)
            and len(member["sha256"]) == 64
        ):
            raise refuse(f"has a malformed member entry: {member!r:.200}")
    paths = [member["path"] for member in members] + list(directories)
    for path in paths:
        problem = _unsafe_path(path, expected_member)
        if problem:
            raise refuse(f"lists {path!r}: {problem}")
        if path in seen:
            raise refuse(f"lists {path!r} twice")
        seen.add(path)
    files = {member["path"] for member in members}
    for path in paths:  # a file cannot also be a folder that holds something
        for parent in PurePosixPath(path).parents:
            if parent.as_posix() in files:
                raise refuse(f"lists {parent.as_posix()!r} as a file and {path!r} inside it")


def _unsafe_path(name: str, database_member: str | None) -> str | None:
    """Why a member path must not be extracted, or None: only relative paths under runs/ (or the database)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return "not a plain relative path"
    if name.startswith("/") or PureWindowsPath(name).drive:
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "it climbs out of the workspace ('..')"
    if any(part in ("", ".") for part in parts):
        return "not a normalised path"
    if name != database_member and (parts[0] not in FOLDERS or len(parts) < 2):
        return f"outside {'/, '.join(FOLDERS)}/ (a backup holds only those folders and the database)"
    return None


def _walk(archive: Path, extract_to: Path | None = None) -> dict[str, Any]:
    """Read the whole archive and check every member against the manifest; with `extract_to`, also write
    each member there (after checking its path and type, and checking its content again while writing).

    Raises ArtifactError naming the first problem: damaged compression, a truncated archive, a member
    whose size or SHA-256 differs from the manifest's, a member missing, extra, duplicated, at an unsafe
    path, or not a plain file or folder.
    """
    with _open_tar(archive, to_the_end=True) as tar:
        manifest = _read_manifest_member(archive, tar)
        files = {member["path"]: member for member in manifest["members"]}
        directories = set(manifest["directories"])
        seen: set[str] = set()
        while (member := tar.next()) is not None:
            name = member.name
            where = f"{archive}: member {name!r}"
            problem = _unsafe_path(name, manifest["database"].get("member"))
            if problem:
                raise ArtifactError(f"{where} is refused: {problem}")
            if name in seen:
                raise ArtifactError(f"{where} appears twice")
            seen.add(name)
            if member.isdir():
                if name not in directories:
                    raise ArtifactError(f"{where} is not in the manifest (extra folder; the archive was altered)")
                if extract_to is not None:
                    (extract_to / name).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg() or member.issparse():
                raise ArtifactError(f"{where} is refused: a link, device or other special file (only plain files)")
            expected = files.get(name)
            if expected is None:
                raise ArtifactError(f"{where} is not in the manifest (extra member; the archive was altered)")
            if member.size != expected["size"]:
                raise ArtifactError(f"{where}: {member.size} bytes, but the manifest records {expected['size']}")
            digest = _copy_member(tar, member, extract_to / name if extract_to is not None else None)
            if digest != expected["sha256"]:
                raise ArtifactError(
                    f"{where}: SHA-256 {digest} does not match the manifest's {expected['sha256']}; "
                    "the member was changed or damaged"
                )
    missing = sorted((files.keys() | directories) - seen)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ArtifactError(f"{archive}: {missing[0]!r}{more} in the manifest but not in the archive (truncated?)")
    return manifest


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path | None) -> str:
    """The SHA-256 of a member's content, written to `destination` (a new file) when one is given."""
    source = tar.extractfile(member)
    assert source is not None  # a regular member always has a file
    digest = hashlib.sha256()
    with ExitStack() as stack:
        sink: IO[bytes] | None = None
        if destination is not None:
            destination.parent.mkdir(parents=True, exist_ok=True)
            # Exclusive creation: never writes through something already there.
            sink = stack.enter_context(open(destination, "xb"))
        for block in iter(lambda: source.read(BLOCK), b""):
            digest.update(block)
            if sink is not None:
                sink.write(block)
        if sink is not None:
            sink.flush()
            os.fsync(sink.fileno())
    if destination is not None:
        os.chmod(destination, (member.mode & 0o755) | 0o600)
        os.utime(destination, (member.mtime, member.mtime))
    return digest.hexdigest()


# --- restore ---------------------------------------------------------------------------------


def restore_workspace(archive: Path, target: Path, db_url: str | None = None) -> dict[str, Any]:
    """Recreate a workspace from a backup at `target` (a folder that is empty or does not exist yet).

    Nothing is written before the whole archive has been checked against its manifest. A SQLite
    store becomes `target/forgeml.db`; a PostgreSQL dump is restored into `db_url` (required for one,
    and its database must not hold the store's tables yet). Run paths the store records under the old
    workspace are rewritten to `target`, so `forgeml runs` and `Store.locate` find the restored runs.

    Returns {"path", "files", "bytes", "database", "rows", "rewritten_paths"}.
    """
    archive, target = Path(archive), Path(target).resolve()
    _refuse_non_empty(target)
    manifest = _walk(archive)  # first pass: checks everything, writes nothing
    database = manifest["database"]
    _check_database_destination(database, db_url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its folder is private (0700), and a restored workspace gets a normal folder's mode.
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.restoring"
    staging.mkdir()
    try:
        _walk(archive, extract_to=staging)  # second pass: the same checks, while writing
        old, new = manifest["workspace"], str(target)
        if database["kind"] == "sqlite":
            rows, rewritten = _finish_sqlite(staging / SQLITE_MEMBER, database, old, new)
        elif database["kind"] == "postgresql":
            assert db_url is not None  # checked by _check_database_destination
            dump = staging / POSTGRES_MEMBER
            rows, rewritten = _pg_restore(dump, db_url, old, new)
            dump.unlink()  # the workspace's store is the server now; the dump stays in the archive
        else:
            rows, rewritten = {}, 0
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "path": str(target),
        "files": len(manifest["members"]),
        "bytes": sum(member["size"] for member in manifest["members"]),
        "database": database["kind"],
        "rows": rows,
        "rewritten_paths": rewritten,
    }


def _refuse_non_empty(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"restore: {target} exists and is not a folder; restore into a new or empty folder")
    if target.is_dir() and any(target.iterdir()):
        raise ArtifactError(
            f"restore: {target} is not empty; restore into a new or empty folder "
            "(a restore never overwrites a workspace)"
        )


def _check_database_destination(database: dict[str, Any], db_url: str | None, target: Path) -> None:
    """Refuse, before anything is written, a database that cannot go where it is asked to."""
    kind = database["kind"]
    if kind == "postgresql":
        if not db_url or not db_url.startswith("postgresql"):
            raise ArtifactError(
                "restore: this backup's store is a PostgreSQL dump; give the PostgreSQL URL to restore it into "
                "(an empty database, e.g. postgresql://user@host/forgeml_restored)"
            )
        if shutil.which("pg_restore") is None:
            raise ForgeError(
                "restore: `pg_restore` is not installed (Debian/Ubuntu: apt-get install postgresql-client)"
            )
        with _server(db_url, "restore") as engine, engine.connect() as connection:
            clashes = sorted(set(inspect(connection).get_table_names()) & set(database["tables"]))
        if clashes:
            raise ArtifactError(
                f"restore: the database at {_hide_password(db_url)} already has the store's tables "
                f"({', '.join(clashes)}); restore into an empty database (a restore never overwrites one)"
            )
    elif kind == "sqlite" and db_url and db_url != f"sqlite:///{target / SQLITE_MEMBER}":
        raise ArtifactError(
            f"restore: this backup's store is SQLite; it is restored as {target / SQLITE_MEMBER} "
            "(leave the database URL out; moving a store to another database is not supported)"
        )


def _finish_sqlite(path: Path, database: dict[str, Any], old: str, new: str) -> tuple[dict[str, int], int]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            rewritten = _rewrite_paths(connection, old, new)
            rows = _row_counts(connection)
    except DatabaseError as error:  # its hash matched: the archive was made from an unreadable file
        raise ArtifactError(
            f"restore: the archive's {SQLITE_MEMBER} cannot be read as a database ({error.orig})"
        ) from None
    finally:
        engine.dispose()
    if rows != database["tables"]:
        raise ArtifactError(
            f"restore: the database snapshot holds {rows} rows per table, the manifest records "
            f"{database['tables']}; the archive is inconsistent"
        )
    return rows, rewritten


def _pg_restore(dump: Path, db_url: str, old: str, new: str) -> tuple[dict[str, int], int]:
    dsn, env = _libpq_target(db_url)
    # One transaction: a failure leaves the database as it was.
    command = ["pg_restore", "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error"]
    _run_postgres_tool([*command, f"--dbname={dsn}", str(dump)], env, "restore")
    with _server(db_url, "restore") as engine, engine.begin() as connection:
        rewritten = _rewrite_paths(connection, old, new)
        rows = _row_counts(connection)
    return rows, rewritten


def _move_into_place(staging: Path, target: Path) -> None:
    _refuse_non_empty(target)  # again: something may have appeared there while the archive was read
    if target.is_dir():
        # Move the contents, not the folder: `target` may be a mount point, and its owner and mode stay.
        for entry in staging.iterdir():
            os.replace(entry, target / entry.name)
        staging.rmdir()
        fsync_directory(target)
    else:
        os.replace(staging, target)
    fsync_directory(target.parent)


# --- store helpers ---------------------------------------------------------------------------


def _row_counts(connection: Connection) -> dict[str, int]:
    """Rows per table, counted in the connection's current transaction."""
    counts = {}
    for name in sorted(inspect(connection).get_table_names()):
        table = Table(name, MetaData())
        counts[name] = connection.execute(select(func.count()).select_from(table)).scalar_one()
    return counts


def _is_path_column(name: str) -> bool:
    # The store's tables keep run folders as absolute paths (`runs.path`); tables added later follow the
    # same naming (`*_path`, `*_dir`), so they are rewritten too without this module knowing them.
    return name == "path" or name.endswith(("_path", "_dir"))


def _rewrite_paths(connection: Connection, old: str, new: str) -> int:
    """Point text columns holding paths under the old workspace at the new one; returns the rows changed."""
    if old == new:
        return 0
    inspector = inspect(connection)
    changed = 0
    for name in inspector.get_table_names():
        columns = [
            column["name"]
            for column in inspector.get_columns(name)
            if _is_path_column(column["name"]) and isinstance(column["type"], String)
        ]
        if not columns:
            continue
        table = Table(name, MetaData(), autoload_with=connection)
        for column_name in columns:
            column = table.c[column_name]
            prefix = old.rstrip("/") + "/"
            # substr counts characters in both SQLite and PostgreSQL, as len() does.
            moved = literal(new, String()) + func.substr(column, len(old.rstrip("/")) + 1, type_=String())
            statement = (
                update(table)
                .where(or_(column == old, func.substr(column, 1, len(prefix)) == prefix))
                .values({column_name: moved})
            )
            changed += connection.execute(statement).rowcount
    return changed


@contextmanager
def _server(url: str, action: str) -> Iterator[Engine]:
    """An engine for a database server; "cannot connect" becomes an error that names the server."""
    engine = connect(url)
    try:
        yield engine
    except OperationalError as error:
        raise ForgeError(f"{action}: the database at {_hide_password(url)} failed: {error.orig}") from None
    finally:
        engine.dispose()


def _libpq_target(url: str) -> tuple[str, dict[str, str]]:
    """A libpq connection URI for pg_dump/pg_restore, with the password moved out of the command line
    (where `ps` shows it) into PGPASSWORD."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    return parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def _run_postgres_tool(command: list[str], env: dict[str, str], action: str) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()[-2000:]
        raise ForgeError(f"{action}: {command[0]} failed (exit code {result.returncode}): {message}")


def _hide_password(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
