"""Run directories: where they live, atomic writes, and the SHA-256 manifest checked on load."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forgeml.errors import ArtifactError

MANIFEST = "manifest.json"
LINEAGE = "lineage.json"  # where a run comes from: its parent model version and the corrections it learned
SAMPLES = "samples.jsonl"  # a generative run's sample generations, one JSON object per line
# Checkpoints are rewritten while training and are only read by `resume`, which checks them itself.
UNHASHED_DIRS = ("checkpoints",)


def workspace_root(explicit: str | Path | None = None) -> Path:
    """The folder holding `runs/` and `forgeml.db`: `--workspace`, else $FORGEML_WORKSPACE, else cwd."""
    root = Path(explicit or os.environ.get("FORGEML_WORKSPACE") or Path.cwd())
    return root.resolve()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_directory(folder: str | Path) -> None:
    """Make a rename or delete in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"missing file: {path}") from None
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not valid JSON (line {error.lineno}): was it edited or truncated?") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """A file's SHA-256; for a folder (e.g. images in class folders), the SHA-256 of its files' relative paths
    and SHA-256s, sorted, so renaming, adding, removing or changing any file inside changes it."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def new_run_id() -> str:
    """Sortable by time, unique across processes: 20261123-142501-3f9a."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunDir:
    """One run's folder: `runs/<name>/<run-id>/` and the names of what goes in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    @classmethod
    def create(cls, workspace: Path, name: str) -> RunDir:
        run = cls(workspace / "runs" / name / new_run_id())
        run.path.mkdir(parents=True, exist_ok=False)
        run.plots.mkdir()
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not (run.path / "config.yaml").is_file():
            raise ArtifactError(f"{path} is not a run directory (no config.yaml in it)")
        return run

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def name(self) -> str:
        return self.path.parent.name

    config = property(lambda self: self.path / "config.yaml")
    model = property(lambda self: self.path / "model")
    checkpoints = property(lambda self: self.path / "checkpoints")
    plots = property(lambda self: self.path / "plots")
    metrics = property(lambda self: self.path / "metrics.json")
    profile = property(lambda self: self.path / "data_profile.json")
    train_log = property(lambda self: self.path / "train.log")
    trust = property(lambda self: self.path / "trust")

    def write_manifest(self) -> dict[str, str]:
        """Record the SHA-256 of every artefact (checkpoints excepted) in manifest.json."""
        hashes = {}
        for file in sorted(self.path.rglob("*")):
            relative = file.relative_to(self.path)
            if not file.is_file() or relative.name == MANIFEST or relative.parts[0] in UNHASHED_DIRS:
                continue
            if relative.name.startswith("."):  # temp files of an interrupted write
                continue
            hashes[relative.as_posix()] = sha256_file(file)
        atomic_write_json(self.path / MANIFEST, {"algorithm": "sha256", "files": hashes})
        return hashes

    def record(self, files: list[Path] | tuple[Path, ...]) -> None:
        """Update the manifest entries of files a later command rewrote (e.g. the model card)."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            return
        manifest = read_json(manifest_path)
        for file in files:
            manifest["files"][Path(file).resolve().relative_to(self.path).as_posix()] = sha256_file(file)
        atomic_write_json(manifest_path, manifest)

    def verify(self, under: str = "") -> None:
        """Refuse to go on if any recorded artefact (below `under`) changed or disappeared."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{self.path}: no {MANIFEST}; the run did not finish, so its artefacts are unverified")
        recorded = read_json(manifest_path)["files"]
        for relative, expected in recorded.items():
            if not relative.startswith(under):
                continue
            file = self.path / relative
            if not file.is_file():
                raise ArtifactError(f"{file}: recorded in {MANIFEST} but missing")
            if sha256_file(file) != expected:
                raise ArtifactError(
                    f"{file}: SHA-256 does not match {MANIFEST}; the file was changed after the run wrote it. "
                    "Refusing to load it."
                )


def latest_run(runs: Path) -> Path:
    """The newest finished run (it has a manifest) in a run name's folder, e.g. runs/sst2_lm."""
    finished = sorted(p for p in runs.iterdir() if (p / MANIFEST).is_file()) if runs.is_dir() else []
    if not finished:
        raise ArtifactError(f"{runs / 'latest'}: no finished run in {runs}; run its config first")
    return finished[-1]


def resolve_run_path(path: str | Path, workspace: str | Path | None = None) -> Path:
    """`path` itself; for `.../<run name>/latest` the newest finished run of that name; for a registry
    reference (`sst2@champion`, `sst2@3`) the run that version points at in the workspace's registry."""
    from forgeml.registry import resolve_reference  # the registry is built on this module

    registered = resolve_reference(path, workspace)
    if registered is not None:
        return registered
    path = Path(path)
    return latest_run(path.parent) if path.name == "latest" else path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# Which process is running a run: lets `forgeml runs` tell a run in progress from one whose process was
# killed (SIGKILL, out of memory, a power cut) before it could record an outcome. A dot-file: not hashed.
PROCESS_FILE = ".forgeml-process.json"


def mark_running(run_dir: Path) -> None:
    """Record this process as the one running `run_dir`."""
    atomic_write_json(Path(run_dir) / PROCESS_FILE, {"pid": os.getpid(), "host": socket.gethostname()})


def clear_running(run_dir: Path) -> None:
    (Path(run_dir) / PROCESS_FILE).unlink(missing_ok=True)


def still_running(run_dir: Path) -> bool | None:
    """Whether the process that is running `run_dir` is alive: None when it runs on another machine."""
    marker = Path(run_dir) / PROCESS_FILE
    if not marker.is_file():
        return False
    try:
        owner = read_json(marker)
    except ArtifactError:  # half-written or edited: nobody can be shown to own the run
        return False
    if owner.get("host") != socket.gethostname():
        return None
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
