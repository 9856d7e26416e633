"""The inputs a server answered, read back from the `predictions` table of the workspace database."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from forgeml.errors import ConfigError
from forgeml.serve.records import PredictionRecord
from forgeml.store import connect

SINCE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def served_rows(
    db_url: str,
    model: str | None = None,
    since: datetime | None = None,
    version: str | None = None,
    limit: int | None = 100_000,
) -> tuple[list[Any], list[dict[str, Any]], list[datetime]]:
    """(inputs, answers, times) of the served predictions, oldest first: the newest `limit` records of
    `model` (a served name; every model when None) and `version`, made at or after `since`.

    Inputs are as the server stored them (PII already redacted when the run redacts it); answers are
    {'label', 'probabilities'} or {'value'}; times are timezone-aware (UTC).
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: {limit}; give a positive number of rows (or None for all)")
    query = select(PredictionRecord.inputs, PredictionRecord.answer, PredictionRecord.created_at)
    if model is not None:
        query = query.where(PredictionRecord.model == model)
    if version is not None:
        query = query.where(PredictionRecord.version == version)
    if since is not None:
        query = query.where(PredictionRecord.created_at >= as_utc(since))
    query = query.order_by(PredictionRecord.created_at.desc(), PredictionRecord.id.desc())
    if limit is not None:
        query = query.limit(limit)
    engine = connect(db_url)
    try:
        with Session(engine) as session:
            rows = session.execute(query).all()
    finally:
        engine.dispose()
    rows.reverse()
    return [r.inputs for r in rows], [r.answer for r in rows], [as_utc(r.created_at) for r in rows]


def since_time(text: str, now: datetime | None = None) -> datetime:
    """A `--since` value as a UTC time: a duration back from now ('30m', '24h', '7d', '2w') or an ISO
    date/time ('2026-05-01', '2026-05-01T12:00:00+02:00'; without a zone it is UTC)."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([mhdw])", value.lower())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{SINCE_UNITS[unit]: amount})
    try:
        return as_utc(value)
    except ValueError:
        raise ConfigError(
            f"since: {text!r} is neither a duration (30m, 24h, 7d, 2w) nor an ISO date (2026-05-01T12:00)"
        ) from None


def as_utc(moment: datetime | str) -> datetime:
    """A time (or its ISO text) in UTC: SQLite hands back naive times (stored in UTC), and a naive `since` is
    taken as UTC too."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
