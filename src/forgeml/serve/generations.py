"""What a language-model service remembers: every generation it made and what users said about it.

A generation row keeps the prompt (text, or the chat messages; PII-redacted when the run redacts its
training text), each choice's text and finish reason, token counts and timings. Feedback names a
generation and one of its choices, with a rating (up or down) and/or a corrected answer. `export`
turns that into the data of the next run: JSON lines with `prompt` and `response` (or `messages`) for
`instruction-tuning`, plus `chosen` / `rejected` where a correction replaces what the model said
(preference pairs, e.g. for DPO).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from forgeml.errors import ForgeError
from forgeml.store import Base, connect

RATINGS = ("up", "down")


class GenerationRecord(Base):
    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the response id the client saw
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "completion" or "chat"
    prompt: Mapped[Any] = mapped_column(JSON)  # text, or a list of {role, content}
    choices: Mapped[list] = mapped_column(JSON)  # [{text, finish_reason, completion_tokens}]
    settings: Mapped[dict] = mapped_column(JSON)  # max_tokens, temperature, top_p, stop, seed, n
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    first_token_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class GenerationFeedbackRecord(Base):
    __tablename__ = "generation_feedback"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    generation_id: Mapped[str] = mapped_column(String(64), index=True)
    choice: Mapped[int] = mapped_column(Integer)
    rating: Mapped[str | None] = mapped_column(String(8), nullable=True)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class GenerationStore:
    """Generations and their feedback in the workspace database (any SQLAlchemy URL)."""

    def __init__(self, url: str):
        self.engine = connect(url)
        tables = [GenerationRecord.__table__, GenerationFeedbackRecord.__table__]
        Base.metadata.create_all(self.engine, tables=tables)

    def close(self) -> None:
        self.engine.dispose()

    def add(self, **fields: Any) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(GenerationRecord(created_at=datetime.now(UTC), **fields))

    def get(self, generation_id: str) -> GenerationRecord | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(GenerationRecord, generation_id)

    def add_feedback(self, **fields: Any) -> str:
        feedback_id = uuid.uuid4().hex
        with Session(self.engine) as session, session.begin():
            session.add(GenerationFeedbackRecord(id=feedback_id, created_at=datetime.now(UTC), **fields))
        return feedback_id

    def export_rows(self, model: str | None = None) -> list[dict[str, Any]]:
        """`feedback_examples`, refusing to export nothing."""
        rows = self.feedback_examples(model)
        if not rows:
            raise ForgeError(
                "feedback: no generation feedback recorded yet" + (f" for model {model!r}" if model else "")
            )
        return rows

    def feedback_examples(self, model: str | None = None) -> list[dict[str, Any]]:
        """Training rows from the feedback, oldest first; the latest feedback on a choice wins.

        A correction gives (prompt, corrected response) and the pair chosen=correction,
        rejected=what the model said; a thumbs-up without correction gives (prompt, the model's answer);
        a thumbs-down without correction gives nothing to learn from and is left out.
        """
        with Session(self.engine) as session:
            query = select(GenerationFeedbackRecord, GenerationRecord).join(
                GenerationRecord, GenerationRecord.id == GenerationFeedbackRecord.generation_id
            )
            if model:
                query = query.where(GenerationRecord.model == model)
            latest: dict[tuple[str, int], tuple[Any, Any]] = {}
            for feedback, generation in session.execute(query.order_by(GenerationFeedbackRecord.created_at)):
                latest[(generation.id, feedback.choice)] = (feedback, generation)
        rows = []
        for feedback, generation in latest.values():
            answered = generation.choices[feedback.choice]["text"]
            if feedback.correction is not None:
                row = _training_row(generation, feedback.correction)
                row.update(chosen=feedback.correction, rejected=answered, source="correction")
            elif feedback.rating == "up":
                row = {**_training_row(generation, answered), "source": "rated up"}
            else:
                continue
            row.update(
                rating=feedback.rating,
                comment=feedback.comment,
                feedback_id=feedback.id,
                generation_id=generation.id,
                model=generation.model,
                version=generation.version,
                # SQLite gives times back without their zone; they were written in UTC.
                created_at=feedback.created_at.replace(tzinfo=feedback.created_at.tzinfo or UTC).isoformat(),
            )
            rows.append(row)
        return rows

    def export_jsonl(self, model: str | None = None) -> str:
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.export_rows(model))


def _training_row(generation: GenerationRecord, response: str) -> dict[str, Any]:
    """`instruction-tuning` data: prompt + response for a completion, the conversation for a chat."""
    if generation.kind == "chat":
        messages = [*generation.prompt, {"role": "assistant", "content": response}]
        return {"messages": messages, "prompt": _last_user_turn(generation.prompt), "response": response}
    return {"prompt": generation.prompt, "response": response}


def _last_user_turn(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
