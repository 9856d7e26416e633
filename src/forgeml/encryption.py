"""Encryption at rest: a run directory's artefacts sealed with AES-256-GCM under a key in $FORGEML_KEY.

Threat model. This protects a run's artefacts (weights, tokenizer, config, metrics, data profile,
audits, plots, model card, logs, checkpoints) from someone who can read the disk, a backup or a
copied folder, but does not have the key. It does not protect a process that is running with the
key: while forgeml loads or audits an encrypted run, the plaintext is in its memory and, for a
moment, in a private temporary folder (mode 0700, on the RAM-backed /dev/shm when it has room).
What stays readable: file and folder names and sizes, `encryption.json` (algorithm, key
fingerprint, file list) and what the run store (`forgeml.db`) records (status, headline metrics,
hashes). A run written with encryption is plaintext on disk only while it trains; it is encrypted
as soon as it finishes. Deleting plaintext overwrites it with zeros first, but SSDs (wear
levelling), copy-on-write filesystems (btrfs, ZFS, APFS), snapshots and backups may keep old
blocks: encrypt from the start (`forgeml run --encrypt`) on disks that matter.

Format. Each file `F` of a run becomes `F.enc`: a header (magic, 16-byte salt, 7-byte nonce prefix)
and then 1 MiB segments, each sealed with AES-256-GCM under a key derived for this file (HKDF-SHA256
of the run key and the salt). A segment's nonce is the prefix, its index and a last-segment flag,
and its associated data is the header and the file's path inside the run: a file cannot be moved
to another name, truncated, extended or have segments reordered without failing authentication
(the "STREAM" construction of Hoang, Reyhanitabar, Rogaway and Vizár, as in Tink's streaming AEAD).
Segments keep memory flat for multi-gigabyte weights, which one-shot AES-GCM cannot take (2 GiB
limit). `encryption.json` at the run root names the algorithm and a fingerprint of the key (an
HKDF output, not the key), so a wrong key gets a clear message instead of a failed tag. The
manifest is encrypted with the rest; SHA-256 verification happens on the decrypted files.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from forgeml.errors import ArtifactError, ConfigError
from forgeml.workspace import UNHASHED_DIRS, atomic_write_json, fsync_directory, read_json

KEY_VARIABLE = "FORGEML_KEY"
ENCRYPT_VARIABLE = "FORGEML_ENCRYPT"
METADATA = "encryption.json"
SUFFIX = ".enc"
MAGIC = b"FORGEML-AESGCM1\n"
SALT_BYTES, PREFIX_BYTES, TAG_BYTES = 16, 7, 16
HEADER_BYTES = len(MAGIC) + SALT_BYTES + PREFIX_BYTES
SEGMENT = 1 << 20  # plaintext bytes per sealed segment
ALGORITHM = "AES-256-GCM, 1 MiB segments, per-file keys by HKDF-SHA256"
# Temporary files of an interrupted encrypt/decrypt; the next run of either wipes them.
PARTIAL = ".forgeml-partial"
# What `Predictor` reads; loading a model does not decrypt plots, audits or checkpoints.
MODEL_FILES = ("config.yaml", "manifest.json", "model/")


class EncryptionError(ArtifactError):
    """An encrypted run cannot be read: no key, the wrong key, or a file changed after encryption."""


def generate_key() -> str:
    """A new random 256-bit key, URL-safe base64 (the format Fernet keys also use)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def load_key(required_for: str = "") -> bytes:
    """The key in $FORGEML_KEY, checked; `required_for` says in the error what needed it."""
    text = os.environ.get(KEY_VARIABLE, "").strip()
    if not text:
        raise EncryptionError(
            f"{required_for or 'encryption'} needs a key: set {KEY_VARIABLE} "
            "(make one with `forgeml keygen` and keep it in a secret store)"
        )
    return parse_key(text)


def parse_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise EncryptionError(
            f"{KEY_VARIABLE} is not a valid key: expected 32 random bytes in URL-safe base64 "
            "(44 characters, as printed by `forgeml keygen`)"
        )
    return key


def fingerprint(key: bytes) -> str:
    """16 hex characters that identify a key without revealing it."""
    return _derive(key, b"forgeml key fingerprint v1", length=8).hex()


def wants_encryption(explicit: bool | None = None) -> bool:
    """Whether a new run is to be encrypted: `explicit` (`--encrypt`), else $FORGEML_ENCRYPT.

    When it is, the key is checked now, so a missing key fails before training, not after.
    """
    if explicit is None:
        value = os.environ.get(ENCRYPT_VARIABLE, "").strip().lower()
        if value not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"{ENCRYPT_VARIABLE}={value!r}: use 1 (encrypt runs) or 0")
        explicit = value in ("1", "true", "yes")
    if explicit:
        load_key("encrypting the run")
    return explicit


def is_encrypted(run_dir: str | Path) -> bool:
    """Whether any file of the run is encrypted (a partly encrypted run counts: it cannot be read as plaintext)."""
    run = Path(run_dir)
    return (run / METADATA).is_file() or next(run.rglob(f"*{SUFFIX}"), None) is not None


# --- whole runs ------------------------------------------------------------------------------


def encrypt_run(run_dir: str | Path, key: bytes | None = None) -> list[str]:
    """Encrypt every file of a run in place and return the paths (inside the run) it encrypted.

    Each file's `.enc` is written and flushed to disk before the plaintext is overwritten with
    zeros and deleted, so a crash loses nothing: running this again finishes the job. On a run
    that is already fully encrypted it does nothing (and returns []).
    """
    run = _run_path(run_dir)
    key = key if key is not None else load_key(f"encrypting {run}")
    metadata = _metadata(run)
    if metadata is not None:
        _check_key(run, metadata, key)
    _write_metadata(run, key, "encrypting")
    _remove_partials(run)
    done = []
    for relative in _files(run, encrypted=False):
        encrypt_file(run, relative, key)
        done.append(relative)
    _write_metadata(run, key, "encrypted")
    return done


def decrypt_run(run_dir: str | Path, key: bytes | None = None) -> list[str]:
    """Decrypt an encrypted run in place (the inverse of `encrypt_run`); safe to run again after a crash.

    Returns the paths it decrypted; [] for a run that is not encrypted.
    """
    run = _run_path(run_dir)
    metadata = _metadata(run)
    encrypted = _files(run, encrypted=True)
    if metadata is None and not encrypted:
        return []
    key = key if key is not None else load_key(f"decrypting {run}")
    if metadata is not None:
        _check_key(run, metadata, key)
    interrupted = metadata is not None and metadata.get("state") in ("encrypting", "decrypting")
    if not interrupted:
        clashes = [relative for relative in encrypted if (run / relative).exists()]
        if clashes:
            raise EncryptionError(
                f"{run}: {clashes[0]} exists both in plaintext and encrypted; move one of them away, then decrypt"
            )
    _write_metadata(run, key, "decrypting")
    _remove_partials(run)
    for relative in encrypted:
        decrypt_file(run, relative, key)
    (run / METADATA).unlink()
    fsync_directory(run)
    return encrypted


def encrypt_file(run_dir: str | Path, relative: str, key: bytes) -> Path:
    """Encrypt one file of a run to `<file>.enc`, then wipe the plaintext. Returns the `.enc` path."""
    run = Path(run_dir)
    source, target = run / relative, run / (relative + SUFFIX)
    _seal(source, target, relative, key)
    _wipe(source)
    return target


def decrypt_file(run_dir: str | Path, relative: str, key: bytes) -> Path:
    """Decrypt `<file>.enc` of a run back to `<file>`, then delete the `.enc`. Returns the plaintext path."""
    run = Path(run_dir)
    source, target = run / (relative + SUFFIX), run / relative
    _open(source, target, relative, key)
    source.unlink()
    fsync_directory(source.parent)
    return target


# --- reading and updating encrypted runs -----------------------------------------------------


@contextmanager
def plaintext_view(run_dir: str | Path, writable: bool = False, only: tuple[str, ...] = ()) -> Iterator[Path]:
    """A plaintext copy of an encrypted run, for code that reads run directories; the run itself if it is plain.

    The copy lives in a private folder (mode 0700; on /dev/shm when it has room, else the system
    temp folder) and is wiped on exit. `only` limits it to these files and folders (e.g. "model/");
    checkpoints are never copied. With `writable`, files added, changed or deleted in the copy are
    encrypted back into the run when the block finishes without an error.
    """
    run = Path(run_dir)
    if not is_encrypted(run):
        yield run
        return
    run = run.resolve()
    key = _key_for_reading(run)
    wanted = [r for r in _files(run, encrypted=True) if _selected(r, only)]
    needed = sum((run / (r + SUFFIX)).stat().st_size for r in wanted)
    holder = Path(tempfile.mkdtemp(prefix="forgeml-view-", dir=_private_root(needed)))
    try:
        view = holder / run.parent.name / run.name  # keeps RunDir.name and .id
        view.mkdir(parents=True)
        before = {}
        for relative in wanted:
            _open(run / (relative + SUFFIX), view / relative, relative, key, durable=False)
            before[relative] = _signature(view / relative)
        yield view
        if writable:
            _write_back(run, view, before, key)
    finally:
        _wipe_tree(holder)


def on_plaintext(writes: bool = False) -> Callable:
    """Decorator for API functions whose first argument is a run directory: they get `plaintext_view`'s copy.

    Paths they return that point into the copy are turned into the run's `.enc` paths.
    """

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from forgeml.workspace import resolve_run_path

            run_dir = resolve_run_path(kwargs["run_dir"] if "run_dir" in kwargs else args[0])  # sst2@champion too
            with plaintext_view(run_dir, writable=writes) as view:
                if "run_dir" in kwargs:
                    kwargs["run_dir"] = view
                else:
                    args = (view, *args[1:])
                result = function(*args, **kwargs)
                return result if view == Path(run_dir) else _outside_paths(result, view, Path(run_dir).resolve())

        return wrapper

    return decorate


def refuse_encrypted(run_dir: str | Path, action: str) -> None:
    """For commands that need the plaintext run on disk (resume): a clear error if it is encrypted."""
    if is_encrypted(run_dir):
        raise EncryptionError(
            f"{run_dir} is encrypted; to {action} it, decrypt it first (`forgeml decrypt {run_dir}`) "
            "and encrypt it again afterwards"
        )


def _write_back(run: Path, view: Path, before: dict[str, tuple], key: bytes) -> None:
    after = {path.relative_to(view).as_posix(): path for path in sorted(view.rglob("*")) if path.is_file()}
    changed = [r for r, path in after.items() if before.get(r) != _signature(path)]
    changed.sort(key=lambda r: r == "manifest.json")  # the manifest last: a crash leaves the old one
    for relative in changed:
        _seal(after[relative], run / (relative + SUFFIX), relative, key)
    for relative in before.keys() - after.keys():
        (run / (relative + SUFFIX)).unlink(missing_ok=True)
    if changed or before.keys() - after.keys():
        _write_metadata(run, key, "encrypted")


def _outside_paths(result: Any, view: Path, run: Path) -> Any:
    if isinstance(result, Path) and result.is_relative_to(view):
        return run / (result.relative_to(view).as_posix() + SUFFIX)
    if isinstance(result, (tuple, list)):
        return type(result)(_outside_paths(item, view, run) for item in result)
    return result


# --- the metadata file -----------------------------------------------------------------------


def _metadata(run: Path) -> dict[str, Any] | None:
    return read_json(run / METADATA) if (run / METADATA).is_file() else None


def _write_metadata(run: Path, key: bytes, state: str) -> None:
    atomic_write_json(
        run / METADATA,
        {
            "format": 1,
            "algorithm": ALGORITHM,
            "key_fingerprint": fingerprint(key),
            "state": state,
            "files": _files(run, encrypted=True),
        },
    )


def _check_key(run: Path, metadata: dict[str, Any], key: bytes) -> None:
    expected = metadata.get("key_fingerprint")
    if expected and expected != fingerprint(key):
        raise EncryptionError(
            f"{run}: {KEY_VARIABLE} does not match the key this run was encrypted with "
            f"(fingerprint {expected}; {KEY_VARIABLE}'s is {fingerprint(key)})"
        )


def _key_for_reading(run: Path) -> bytes:
    if not os.environ.get(KEY_VARIABLE, "").strip():
        raise EncryptionError(f"{run}: this run is encrypted; set {KEY_VARIABLE} to the key it was encrypted with")
    key = load_key()
    metadata = _metadata(run)
    if metadata is None or metadata.get("state") != "encrypted":
        action = "decrypt" if metadata is not None and metadata.get("state") == "decrypting" else "encrypt"
        raise EncryptionError(
            f"{run}: `forgeml {action}` of this run did not finish; run `forgeml {action} {run}` again to complete it"
        )
    _check_key(run, metadata, key)
    missing = [r for r in metadata.get("files", []) if not (run / (r + SUFFIX)).is_file()]
    if missing:
        raise EncryptionError(f"{run / (missing[0] + SUFFIX)}: recorded in {METADATA} but missing")
    return key


# --- one file --------------------------------------------------------------------------------


def _seal(source: Path, target: Path, relative: str, key: bytes) -> None:
    salt, prefix = os.urandom(SALT_BYTES), os.urandom(PREFIX_BYTES)
    header = MAGIC + salt + prefix
    cipher = AESGCM(_derive(key, b"forgeml file v1", salt=salt))
    associated = header + relative.encode("utf-8")
    with open(source, "rb") as plain, _atomic_output(target) as sealed:
        sealed.write(header)
        for index, (chunk, last) in enumerate(_chunks(plain, SEGMENT)):
            sealed.write(cipher.encrypt(_nonce(prefix, index, last), chunk, associated))


def _open(source: Path, target: Path, relative: str, key: bytes, durable: bool = True) -> None:
    with open(source, "rb") as sealed:
        header = sealed.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
            raise EncryptionError(f"{source}: not a file encrypted by forgeml (unknown header)")
        salt, prefix = header[len(MAGIC) : len(MAGIC) + SALT_BYTES], header[len(MAGIC) + SALT_BYTES :]
        cipher = AESGCM(_derive(key, b"forgeml file v1", salt=salt))
        associated = header + relative.encode("utf-8")
        with _atomic_output(target, durable) as plain:
            for index, (chunk, last) in enumerate(_chunks(sealed, SEGMENT + TAG_BYTES)):
                try:
                    plain.write(cipher.decrypt(_nonce(prefix, index, last), chunk, associated))
                except (InvalidTag, ValueError):
                    raise EncryptionError(
                        f"{source}: cannot be decrypted: the file was changed, truncated or renamed after it was "
                        "encrypted (authentication failed). Refusing to load it."
                    ) from None


def _chunks(handle: IO[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """The file in blocks of `size`, each with whether it is the last (an empty file is one empty block)."""
    current = handle.read(size)
    while True:
        following = handle.read(size)
        yield current, not following
        if not following:
            return
        current = following


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _derive(key: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


@contextmanager
def _atomic_output(path: Path, durable: bool = True) -> Iterator[IO[bytes]]:
    """Stream into a temporary file beside `path`, then rename: `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _wipe(Path(temporary))  # it may hold part of a decrypted file
        raise
    if durable:
        fsync_directory(path.parent)


def _wipe(path: Path) -> None:
    """Overwrite a file with zeros, flush, then delete it (best effort, see the module docstring).

    Links are only deleted: zeroing through a symlink or a hard link would destroy the other copy.
    """
    if not path.exists() and not path.is_symlink():
        return
    info = path.lstat()
    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        zeros = bytes(min(info.st_size, SEGMENT))
        with open(path, "r+b", buffering=0) as handle:
            remaining = info.st_size
            while remaining > 0:
                remaining -= handle.write(zeros[: min(remaining, len(zeros))])
            os.fsync(handle.fileno())
    path.unlink()
    fsync_directory(path.parent)


def _wipe_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _wipe(path)
    shutil.rmtree(folder, ignore_errors=True)


# --- files of a run --------------------------------------------------------------------------


def _run_path(run_dir: str | Path) -> Path:
    run = Path(run_dir).resolve()
    if not ((run / "config.yaml").is_file() or is_encrypted(run)):
        raise ArtifactError(f"{run_dir} is not a run directory (no config.yaml in it)")
    return run


def _files(run: Path, encrypted: bool) -> list[str]:
    """Paths inside the run of its encrypted files (without `.enc`) or of its plaintext files."""
    found = []
    for path in sorted(run.rglob("*")):
        if not path.is_file() or path.name.endswith(PARTIAL):
            continue
        relative = path.relative_to(run).as_posix()
        if relative == METADATA or relative.endswith(SUFFIX) != encrypted:
            continue
        found.append(relative.removesuffix(SUFFIX))
    return found


def _selected(relative: str, only: tuple[str, ...]) -> bool:
    if relative.split("/")[0] in UNHASHED_DIRS:
        return False
    return not only or any(relative == name or relative.startswith(name) for name in only)


def _signature(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def _remove_partials(run: Path) -> None:
    for path in run.rglob(f"*{PARTIAL}"):
        _wipe(path)


def _private_root(needed: int) -> str | None:
    """/dev/shm (RAM: plaintext never reaches a disk) when it has room, else the system temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        space = os.statvfs(shm)
        if space.f_bavail * space.f_frsize > needed * 1.1 + (64 << 20):
            return str(shm)
    return None
