"""What the service remembers: every prediction it made and every correction users sent back.

Both live in the workspace database (SQLite in WAL mode by default, so readers never block the
writer; any SQLAlchemy URL works). `forgeml feedback export` turns the corrections into a CSV with the
model's input columns and the corrected label, ready to be added to the training data.
"""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from forgeml.errors import ForgeError
from forgeml.store import Base, connect


class PredictionRecord(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(32), index=True)
    position: Mapped[int] = mapped_column(Integer)  # the record's index in the request
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    inputs: Mapped[Any] = mapped_column(JSON)
    answer: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedbackRecord(Base):
    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    inputs: Mapped[Any] = mapped_column(JSON)
    predicted: Mapped[str | None] = mapped_column(String(200), nullable=True)
    label: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str] = mapped_column(Text, default="")
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ShadowRecord(Base):
    """A shadow version's answer to a served record, beside the answer the caller got."""

    __tablename__ = "shadow_predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(32), index=True)
    position: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))  # the shadow's run
    answered_by: Mapped[str] = mapped_column(String(64))  # the run whose answer the caller got
    answer: Mapped[dict] = mapped_column(JSON)
    served_answer: Mapped[dict] = mapped_column(JSON)
    agrees: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


TABLES = [PredictionRecord.__table__, FeedbackRecord.__table__, ShadowRecord.__table__]


class RecordStore:
    def __init__(self, url: str):
        self.engine = connect(url)
        Base.metadata.create_all(self.engine, tables=TABLES)

    def add_predictions(self, model: str, version: str, requests: list[tuple[str, list, list[dict]]]) -> None:
        """Store the (request id, inputs, answers) of several requests in one transaction."""
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            session.add_all(
                PredictionRecord(
                    request_id=request_id, position=i, model=model, version=version, inputs=x, answer=a, created_at=now
                )
                for request_id, inputs, answers in requests
                for i, (x, a) in enumerate(zip(inputs, answers, strict=True))
            )

    def add_shadow(self, model: str, version: str, rows: list[tuple[str, int, str, dict, dict, bool]]) -> None:
        """Store shadow answers: (request id, position, run that answered, shadow answer, served answer, agrees)."""
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            session.add_all(
                ShadowRecord(
                    request_id=request_id,
                    position=position,
                    model=model,
                    version=version,
                    answered_by=answered_by,
                    answer=answer,
                    served_answer=served,
                    agrees=agrees,
                    created_at=now,
                )
                for request_id, position, answered_by, answer, served, agrees in rows
            )

    def close(self) -> None:
        """Close the database connections (every write has been committed by then)."""
        self.engine.dispose()

    def prediction(self, request_id: str, position: int) -> PredictionRecord | None:
        with Session(self.engine, expire_on_commit=False) as session:
            query = select(PredictionRecord).where(
                PredictionRecord.request_id == request_id, PredictionRecord.position == position
            )
            return session.scalars(query).first()

    def add_feedback(self, **fields: Any) -> str:
        feedback_id = uuid.uuid4().hex
        with Session(self.engine) as session, session.begin():
            session.add(FeedbackRecord(id=feedback_id, created_at=datetime.now(UTC), **fields))
        return feedback_id

    def feedback(self, model: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(FeedbackRecord).order_by(FeedbackRecord.created_at)
            if model:
                query = query.where(FeedbackRecord.model == model)
            return [
                {column.name: getattr(row, column.name) for column in FeedbackRecord.__table__.columns}
                for row in session.scalars(query)
            ]

    def export_csv(self, input_columns: list[str] | None = None, label: str = "label", model: str | None = None) -> str:
        """Corrections as CSV: the input columns, the corrected label, and where each came from."""
        rows = self.feedback(model)
        if not rows:
            raise ForgeError("feedback: nothing recorded yet" + (f" for model {model!r}" if model else ""))
        columns = input_columns or _columns_of(rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([*columns, label, "predicted", "comment", "model", "version", "created_at"])
        for row in rows:
            values = _as_columns(row["inputs"], columns)
            writer.writerow(
                [
                    *values,
                    row["label"],
                    row["predicted"] or "",
                    row["comment"],
                    row["model"],
                    row["version"],
                    row["created_at"].isoformat(),
                ]
            )
        return buffer.getvalue()


def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]["inputs"]
    if isinstance(first, dict):
        return list(first)
    return ["text"] if isinstance(first, str) else [f"text_{i + 1}" for i in range(len(first))]


def _as_columns(inputs: Any, columns: list[str]) -> list[Any]:
    if isinstance(inputs, dict):
        return [inputs.get(name, "") for name in columns]
    if isinstance(inputs, str):
        return [inputs]
    return list(inputs)
