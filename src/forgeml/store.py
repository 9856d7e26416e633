"""The run store: one SQL table per kind of record (SQLite file by default, any SQLAlchemy URL works)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Engine, Float, String, Text, create_engine, event, select
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from forgeml.errors import ForgeError
from forgeml.workspace import still_running


class Base(DeclarativeBase):
    pass


class RunRecord(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    task: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | finished | failed | pruned
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    config_hash: Mapped[str] = mapped_column(String(64))
    split_hashes: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    versions: Mapped[dict] = mapped_column(JSON, default=dict)
    durations: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)

    def as_dict(self) -> dict[str, Any]:
        return {column.name: getattr(self, column.name) for column in self.__table__.columns}


def database_url(workspace: Path) -> str:
    """$FORGEML_DB_URL (e.g. postgresql://...) or the SQLite file `forgeml.db` in the workspace."""
    return os.environ.get("FORGEML_DB_URL") or f"sqlite:///{workspace / 'forgeml.db'}"


def connect(url: str) -> Engine:
    """An engine for the store at `url`: SQLite in WAL mode (readers never block the writer), or a server
    database such as PostgreSQL (`postgresql://...` uses psycopg 3 when it is what is installed)."""
    if url.startswith("postgresql://"):
        url = postgres_driver(url)
    if url.startswith("sqlite"):
        # Several processes (servers, tuning workers) write one file: a writer waits up to 60 s for another.
        engine = create_engine(url, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_wal)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (ModuleNotFoundError, NoSuchModuleError) as error:
        raise ForgeError(
            f"database {url.split('://')[0]}: its driver is not installed ({error}); "
            "for PostgreSQL: pip install 'forgeml[postgres]'"
        ) from None


def postgres_driver(url: str) -> str:
    """`postgresql://` with the psycopg 3 driver named when it is the one installed (SQLAlchemy assumes psycopg2)."""
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _sqlite_wal(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout=60000")
    # WAL is a property of the file: switching takes a lock another process may hold, so only when needed.
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a crash of the process loses nothing,
    # a power cut at most the last commits, and writes stop costing an fsync each.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    def __init__(self, url: str):
        self.engine = connect(url)
        Base.metadata.create_all(self.engine)

    def start_run(self, **fields: Any) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(RunRecord(status="running", started_at=_now(), **fields))

    def update_run(self, run_id: str, **fields: Any) -> None:
        with Session(self.engine) as session, session.begin():
            record = session.get(RunRecord, run_id)
            if record is None:
                return
            for key, value in fields.items():
                setattr(record, key, value)
            if fields.get("status") in ("finished", "failed", "pruned"):
                record.finished_at = _now()
                started = record.started_at.replace(tzinfo=record.started_at.tzinfo or UTC)
                record.seconds = (record.finished_at - started).total_seconds()

    def runs(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = select(RunRecord).order_by(RunRecord.started_at.desc()).limit(limit)
        if name:
            query = query.where(RunRecord.name == name)
        with Session(self.engine) as session:
            records = [record.as_dict() for record in session.scalars(query)]
        return [self._settled(record) for record in records]

    def _settled(self, record: dict[str, Any]) -> dict[str, Any]:
        """A "running" run whose process is gone (killed before it could say) is recorded as interrupted."""
        if record["status"] != "running" or still_running(Path(record["path"])) is not False:
            return record
        error = "the process ended without recording an outcome (killed?); `forgeml run --resume` continues it"
        with Session(self.engine) as session, session.begin():
            stored = session.get(RunRecord, record["id"])
            if stored is not None and stored.status == "running":
                stored.status, stored.error = "interrupted", error
        return {**record, "status": "interrupted", "error": error}

    def locate(self, name_or_id: str) -> Path:
        """The folder of the newest finished run with this name, else of the run with this id (or id prefix)."""
        finished = [record for record in self.runs(name_or_id) if record["status"] == "finished"]
        if finished:
            return Path(finished[0]["path"])
        try:
            return Path(self.run(name_or_id)["path"])
        except ForgeError:
            raise ForgeError(
                f"{name_or_id!r} is not a run folder, nor the name or id of a finished run in this workspace "
                "(see `forgeml runs`)"
            ) from None

    def run(self, run_id: str) -> dict[str, Any]:
        """One run by id or by a unique prefix of its id."""
        with Session(self.engine) as session:
            matches = list(session.scalars(select(RunRecord).where(RunRecord.id.startswith(run_id)).limit(3)))
        if not matches:
            raise ForgeError(f"no run with id {run_id!r} in this workspace (see `forgeml runs`)")
        if len(matches) > 1:
            raise ForgeError(f"run id {run_id!r} is ambiguous: {', '.join(m.id for m in matches)} ...")
        return self._settled(matches[0].as_dict())


def _now() -> datetime:
    return datetime.now(UTC)
