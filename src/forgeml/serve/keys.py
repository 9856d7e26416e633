"""API keys: random secrets shown once, stored salted and hashed, checked in constant time.

A key reads `fml_<id>_<secret>`: the id finds the row, the secret (32 random bytes) is hashed with the
row's salt and compared with `hmac.compare_digest`. A fast hash is right here: the secret has 256
bits of entropy, so there is nothing to brute-force, and every request checks one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, DateTime, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from forgeml.errors import ForgeError
from forgeml.store import Base, connect

SCOPES = ("predict", "feedback", "admin")
PREFIX = "fml"


class ApiKeyRecord(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    salt: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass
class KeyCheck:
    """The outcome of checking a presented key: who it is, or why it was refused (an HTTP status and reason)."""

    key_id: str | None
    status: int  # 200 allowed, 401 unknown/expired/revoked, 403 wrong scope
    reason: str


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


def _aware(moment: datetime | None) -> datetime | None:
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=UTC)


class KeyStore:
    """API keys in the workspace database (the same SQLAlchemy URL as the run store)."""

    def __init__(self, url: str):
        self.engine = connect(url)
        Base.metadata.create_all(self.engine, tables=[ApiKeyRecord.__table__])

    def create(self, scopes: list[str], name: str = "", expires_in_days: float | None = None) -> str:
        """Make a key; returns the full key, which is not stored and cannot be shown again."""
        unknown = [scope for scope in scopes if scope not in SCOPES]
        if unknown or not scopes:
            raise ForgeError(f"keys: unknown scope(s) {unknown or scopes}; choose from {', '.join(SCOPES)}")
        if expires_in_days is not None and expires_in_days <= 0:
            raise ForgeError(f"keys: --expires-days must be positive, got {expires_in_days}")
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
        now = datetime.now(UTC)
        expires = now + timedelta(days=expires_in_days) if expires_in_days else None
        with Session(self.engine) as session, session.begin():
            session.add(
                ApiKeyRecord(
                    id=key_id,
                    name=name,
                    salt=salt,
                    digest=_digest(salt, secret),
                    scopes=sorted(set(scopes)),
                    created_at=now,
                    expires_at=expires,
                )
            )
        return f"{PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> None:
        with Session(self.engine) as session, session.begin():
            record = session.get(ApiKeyRecord, key_id)
            if record is None:
                raise ForgeError(f"keys: no key with id {key_id!r} (see `forgeml keys list`)")
            record.revoked_at = record.revoked_at or datetime.now(UTC)

    def list(self) -> list[dict[str, Any]]:
        """Every key's id, name, scopes and dates; never a secret or a hash."""
        with Session(self.engine) as session:
            records = session.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at)).all()
            return [
                {
                    "id": r.id,
                    "name": r.name,
                    "scopes": r.scopes,
                    "created_at": _aware(r.created_at),
                    "expires_at": _aware(r.expires_at),
                    "revoked_at": _aware(r.revoked_at),
                }
                for r in records
            ]

    def check(self, presented: str | None, scope: str) -> KeyCheck:
        """Whether `presented` (the bearer token) may use `scope` now."""
        if not presented:
            return KeyCheck(None, 401, "missing API key: send 'Authorization: Bearer <key>'")
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return KeyCheck(None, 401, "invalid API key")
        with Session(self.engine) as session:
            record = session.get(ApiKeyRecord, parts[1])
            if record is None or not hmac.compare_digest(record.digest, _digest(record.salt, parts[2])):
                return KeyCheck(None, 401, "invalid API key")
            now = datetime.now(UTC)
            if record.revoked_at is not None:
                return KeyCheck(record.id, 401, "API key revoked")
            if record.expires_at is not None and _aware(record.expires_at) <= now:
                return KeyCheck(record.id, 401, "API key expired")
            if scope not in record.scopes and "admin" not in record.scopes:
                return KeyCheck(record.id, 403, f"API key lacks the {scope!r} scope")
            return KeyCheck(record.id, 200, "ok")
