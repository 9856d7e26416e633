"""The model registry: named models, numbered versions that point at runs, aliases, and a promotion log.

`sst2@champion` and `sst2@3` name a run wherever a run directory is accepted. An alias moves in one
transaction together with its entry in the promotion log, so a reader sees the old version or the new
one and the log always says why. The log is append-only: on SQLite and PostgreSQL a trigger refuses any
UPDATE or DELETE of it, so not even a hand-written query rewrites history.
"""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from forgeml.errors import ForgeError
from forgeml.store import Base, connect, database_url
from forgeml.workspace import LINEAGE, MANIFEST, read_json, workspace_root

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REFERENCE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)@(?P<target>[A-Za-z0-9][A-Za-z0-9_.-]*)$")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str] = mapped_column(String(64))
    run_path: Mapped[str] = mapped_column(Text)
    task: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    lineage: Mapped[dict] = mapped_column(JSON, default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelAlias(Base):
    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PromotionEvent(Base):
    __tablename__ = "promotion_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the alias was removed
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    gate: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


TABLES = [ModelVersion.__table__, ModelAlias.__table__, PromotionEvent.__table__]


@event.listens_for(PromotionEvent.__table__, "after_create")
def _append_only(target, connection, **_: Any) -> None:
    """Refuse UPDATE and DELETE on the promotion log inside the database itself."""
    if connection.dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            connection.execute(
                text(
                    f"CREATE TRIGGER IF NOT EXISTS promotion_log_no_{action.lower()} BEFORE {action} ON promotion_log "
                    "BEGIN SELECT RAISE(ABORT, 'promotion_log is append-only'); END"
                )
            )
    elif connection.dialect.name == "postgresql":
        connection.execute(
            text(
                "CREATE OR REPLACE FUNCTION forgeml_append_only() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'promotion_log is append-only'; END $$ LANGUAGE plpgsql"
            )
        )
        connection.execute(
            text(
                "CREATE TRIGGER promotion_log_append_only BEFORE UPDATE OR DELETE ON promotion_log "
                "FOR EACH ROW EXECUTE FUNCTION forgeml_append_only()"
            )
        )


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        return "unknown"


def parse_reference(reference: str) -> tuple[str, str] | None:
    """("sst2", "champion") for "sst2@champion", ("sst2", "3") for "sst2@3"; None for anything else."""
    match = REFERENCE.match(str(reference))
    return (match["name"], match["target"]) if match else None


class Registry:
    """Named models in the workspace's store (any SQLAlchemy URL; SQLite by default)."""

    def __init__(self, url: str):
        self.engine = connect(url)
        Base.metadata.create_all(self.engine, tables=TABLES)

    @classmethod
    def for_workspace(cls, workspace: str | Path | None = None) -> Registry:
        return cls(database_url(workspace_root(workspace)))

    def register(
        self,
        name: str,
        run_dir: str | Path,
        description: str = "",
        actor: str | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A new version of `name` pointing at a finished run (the same run twice is refused: use its version)."""
        if not NAME.match(name):
            raise ForgeError(
                f"model name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit)"
            )
        run = Path(run_dir).resolve()
        if not (run / MANIFEST).is_file() and not (run / (MANIFEST + ".enc")).is_file():
            raise ForgeError(f"{run_dir}: not a finished run (no {MANIFEST}); only finished runs can be registered")
        existing = self.version_of_run(name, run)
        if existing is not None:
            raise ForgeError(f"{run} is already {name}@{existing['version']}")
        facts = _run_facts(run)
        if lineage:
            facts["lineage"] = {**facts["lineage"], **lineage}
        for _ in range(5):  # two registrations at once take the same number: the loser retries
            try:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
                    record = ModelVersion(
                        name=name,
                        version=(latest or 0) + 1,
                        run_id=run.name,
                        run_path=str(run),
                        description=description,
                        created_by=actor or current_user(),
                        created_at=_now(),
                        **facts,
                    )
                    session.add(record)
                return self.version(name, record.version)
            except IntegrityError:
                continue
        raise ForgeError(f"could not number a new version of {name}: too many registrations at once; try again")

    def version(self, name: str, version: int) -> dict[str, Any]:
        with Session(self.engine) as session:
            record = session.scalar(
                select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
            )
            if record is None:
                known = self.names()
                hint = f"; models: {', '.join(known)}" if known else "; none registered yet (forgeml models register)"
                raise ForgeError(f"{name}@{version}: no such model version{hint}")
            return _as_dict(record)

    def version_of_run(self, name: str, run_dir: str | Path) -> dict[str, Any] | None:
        """The version of `name` that points at `run_dir`, if one does."""
        with Session(self.engine) as session:
            query = select(ModelVersion).where(
                ModelVersion.name == name, ModelVersion.run_path == str(Path(run_dir).resolve())
            )
            record = session.scalar(query)
            return None if record is None else _as_dict(record)

    def versions(self, name: str) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.version)
            return [_as_dict(record) for record in session.scalars(query)]

    def names(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(ModelVersion.name).distinct().order_by(ModelVersion.name)))

    def aliases(self, name: str) -> dict[str, int]:
        with Session(self.engine) as session:
            query = select(ModelAlias).where(ModelAlias.name == name).order_by(ModelAlias.alias)
            return {record.alias: record.version for record in session.scalars(query)}

    def alias_version(self, name: str, alias: str) -> int | None:
        """The version `name@alias` points at now (None: the alias is not set). Cheap: servers poll it."""
        with Session(self.engine) as session:
            return session.scalar(select(ModelAlias.version).where(ModelAlias.name == name, ModelAlias.alias == alias))

    def resolve(self, reference: str) -> dict[str, Any]:
        """The version a "NAME@ALIAS" or "NAME@VERSION" reference names now."""
        parsed = parse_reference(reference)
        if parsed is None:
            raise ForgeError(f"{reference!r}: a model reference is NAME@ALIAS or NAME@VERSION, e.g. sst2@champion")
        name, target = parsed
        if target.isdigit() or (target[:1] == "v" and target[1:].isdigit()):
            return self.version(name, int(target.lstrip("v")))
        version = self.alias_version(name, target)
        if version is None:
            aliases = self.aliases(name)
            known = ", ".join(f"{a} -> {v}" for a, v in aliases.items()) or "none"
            raise ForgeError(f"{reference}: {name} has no alias {target!r} (aliases: {known})")
        return self.version(name, version)

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        actor: str | None = None,
        reason: str = "",
        forced: bool = False,
        gate: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Point `name@alias` at `version` and log it, in one transaction; returns the log entry."""
        if not NAME.match(alias) or alias.isdigit():
            raise ForgeError(f"alias {alias!r}: use letters, digits, '_', '.', '-', not only digits")
        self.version(name, version)  # it exists
        with Session(self.engine) as session, session.begin():
            record = session.get(ModelAlias, (name, alias))
            previous = record.version if record is not None else None
            if record is None:
                session.add(ModelAlias(name=name, alias=alias, version=version, updated_at=_now()))
            else:
                record.version, record.updated_at = version, _now()
            entry = PromotionEvent(
                name=name,
                alias=alias,
                version=version,
                previous_version=previous,
                actor=actor or current_user(),
                reason=reason,
                forced=forced,
                gate=gate,
                created_at=_now(),
            )
            session.add(entry)
        return self.log(name)[-1]

    def log(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of `name`, oldest first."""
        with Session(self.engine) as session:
            query = select(PromotionEvent).where(PromotionEvent.name == name).order_by(PromotionEvent.id)
            return [_as_dict(record) for record in session.scalars(query)]

    def show(self, name: str) -> dict[str, Any]:
        versions = self.versions(name)
        if not versions:
            raise ForgeError(f"no model named {name!r} (models: {', '.join(self.names()) or 'none yet'})")
        return {"name": name, "versions": versions, "aliases": self.aliases(name), "log": self.log(name)}

    def close(self) -> None:
        self.engine.dispose()


def resolve_reference(reference: str | Path, workspace: str | Path | None = None) -> Path | None:
    """The run folder a "NAME@ALIAS" / "NAME@VERSION" reference names in the workspace's registry; None when
    `reference` is not written as one (or is an existing path)."""
    if Path(reference).exists() or parse_reference(str(reference)) is None:
        return None
    registry = Registry.for_workspace(workspace)
    try:
        return Path(registry.resolve(str(reference))["run_path"])
    finally:
        registry.close()


def _run_facts(run: Path) -> dict[str, Any]:
    """What a version records about its run: task, headline metrics and lineage (data, hashes, config)."""
    from forgeml.encryption import plaintext_view

    with plaintext_view(run, only=("config.yaml", "metrics.json", "data_profile.json", LINEAGE)) as plain:
        metrics = read_json(plain / "metrics.json") if (plain / "metrics.json").is_file() else {}
        profile = read_json(plain / "data_profile.json") if (plain / "data_profile.json").is_file() else {}
        lineage = read_json(plain / LINEAGE) if (plain / LINEAGE).is_file() else {}
        import yaml

        config = yaml.safe_load((plain / "config.yaml").read_text(encoding="utf-8"))
    from forgeml.evaluate.metrics import scalar_metrics

    data = config.get("data", {})
    # Paths with their SHA-256 as read (runs from before the data profile recorded them: paths only).
    files = profile.get("files") or {
        split: {"path": data[split]} for split in ("train", "validation", "test") if data.get(split)
    }
    recorded = {
        "config": config,
        "data_files": files,
        "splits_sha256": profile.get("sha256", {}),
        "parent": lineage.get("parent"),
    }
    if lineage.get("feedback"):
        feedback = lineage["feedback"]
        recorded["feedback"] = {key: value for key, value in feedback.items() if key != "held_out_rows"}
    return {
        "task": config.get("task", ""),
        "metrics": {k: scalar_metrics(v) for k, v in metrics.items() if isinstance(v, dict) and k != "audit"},
        "lineage": recorded,
    }


def _as_dict(record: Any) -> dict[str, Any]:
    return {column.name: getattr(record, column.name) for column in record.__table__.columns}


def _now() -> datetime:
    return datetime.now(UTC)
