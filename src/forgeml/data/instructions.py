"""Instruction data: prompt/response pairs or conversations, checked row by row, split and profiled.

Every split holds the examples in one of two canonical shapes, whatever the source called its columns:
`prompt` + `response` (strings), or `messages` (a list of {role, content} per row). A conversation
may come as a JSON list or as a JSON string of one (a CSV cell); each is checked here so that a bad
row is reported with its file, row number and column before anything is trained.

`data.prompt` and `data.response` name columns, or are templates over columns: "Review: {text}\nSentiment:"
fills in each row's `text` (Python format syntax; "{{" is a literal brace), so a labelled table becomes
instruction data without a conversion script.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from datasets import Dataset

from forgeml.config import ForgeConfig
from forgeml.data.io import column, read_table
from forgeml.data.pii import redact_texts
from forgeml.data.prepare import PreparedData
from forgeml.data.split import content_hash, holdout, sample, take
from forgeml.errors import DataError
from forgeml.workspace import sha256_file

ROLES = ("system", "user", "assistant")
PAIR_COLUMNS = ["prompt", "response"]
MESSAGES_COLUMN = "messages"


def instruction_columns(config: ForgeConfig) -> list[str]:
    """The canonical columns of the config's examples: ['messages'] or ['prompt', 'response']."""
    return [MESSAGES_COLUMN] if config.data.messages else list(PAIR_COLUMNS)


def read_examples(path: Path, config: ForgeConfig) -> Dataset:
    """One file's examples in canonical columns; raises DataError naming the row and column of a bad one."""
    data = config.data
    table = read_table(path, data.format)
    sources = [data.messages] if data.messages else [data.prompt, data.response]
    for name in sources:
        for needed in template_fields(name):
            if needed not in table.column_names:
                raise DataError(f"{path}: no column {needed!r}; columns: {', '.join(table.column_names)}")
    if data.messages:
        conversations = [
            _conversation(value, f"{path}: row {row + 1}, column {data.messages!r}")
            for row, value in enumerate(column(table, data.messages))
        ]
        return Dataset.from_dict({MESSAGES_COLUMN: conversations})
    values = {}
    for canonical, name in zip(PAIR_COLUMNS, sources, strict=True):
        fields = template_fields(name)
        if fields == [name]:
            texts = column(table, name)
        else:
            cells = {field: column(table, field) for field in fields}
            texts = [name.format_map({f: cells[f][row] for f in fields}) for row in range(len(table))]
        values[canonical] = _checked_texts(texts, path, name)
    return Dataset.from_dict(values)


def canonical_examples(table: Dataset, columns: list[str], path: Path) -> Dataset:
    """The examples of a table already in canonical columns (`columns`: ['messages'] or ['prompt',
    'response']), e.g. corrections `forgeml retrain` wrote; checked row by row like `read_examples`."""
    if columns == [MESSAGES_COLUMN]:
        values = column(table, MESSAGES_COLUMN)
        where = f"{path}: row {{}}, column {MESSAGES_COLUMN!r}"
        return Dataset.from_dict(
            {MESSAGES_COLUMN: [_conversation(value, where.format(row + 1)) for row, value in enumerate(values)]}
        )
    return Dataset.from_dict({name: _checked_texts(column(table, name), path, name) for name in PAIR_COLUMNS})


def _checked_texts(texts: list[Any], path: Path, name: str) -> list[str]:
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {row + 1}, column {name!r}: expected text, got {text!r}")
    return texts


def template_fields(source: str) -> list[str]:
    """The columns `source` reads: itself when it is a plain column name, else its template's fields."""
    if "{" not in source and "}" not in source:
        return [source]
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(source) if field is not None]
    except ValueError as error:
        raise DataError(f"data template {source!r}: {error}; write a literal brace as {{{{ or }}}}") from None
    if any(not field or "." in field or "[" in field for field in fields):  # no attribute or item access
        raise DataError(f"data template {source!r}: every {{...}} must name a column, e.g. {{text}}")
    return list(dict.fromkeys(fields))


def _conversation(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not a JSON list of messages ({error.msg} at character {error.pos})") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got {value!r:.80}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: message {index + 1} needs a role ({', '.join(ROLES)}), got {message!r:.80}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: message {index + 1} ({message['role']}) has no text content")
        messages.append({"role": message["role"], "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this conversation")
    return messages


def prepare_instructions(config: ForgeConfig) -> PreparedData:
    """Read the instruction data the config names, hold out validation/test, redact PII when asked; profile."""
    data = config.data
    sources = {"train": data.train, "validation": data.validation, "test": data.test}
    splits: dict[str, Dataset | None] = {
        name: read_examples(path, config) if path else None for name, path in sources.items()
    }
    if len(splits["train"]) == 0:
        raise DataError(f"{data.train}: no examples")
    if data.clean.dedupe:  # the same example twice in training only weighs it double
        splits["train"], duplicates = _drop_duplicates(splits["train"])
    split_info, taken = {}, 0.0
    for name, fraction in (("test", data.split.test), ("validation", data.split.validation)):
        if splits[name] is None and fraction > 0:
            share = fraction / (1.0 - taken)
            splits["train"], splits[name], _ = holdout(splits["train"], share, None, data.split.seed)
            split_info[name] = {"fraction": fraction, "how": "whole examples, seeded"}
            taken += fraction
    for name, size in (data.sample or {}).items():
        if splits[name] is not None:
            splits[name] = sample(splits[name], size, data.split.seed)
    feedback = None
    if data.feedback is not None:  # after the held-out splits are fixed: corrections never move rows between them
        from forgeml.data.feedback import merge_instruction_feedback

        splits, feedback = merge_instruction_feedback(splits, data.feedback, instruction_columns(config))
    redactions = {}
    if data.pii.redact:
        for name, dataset in splits.items():
            if dataset is not None:
                splits[name], redactions[name] = _redact(dataset, data.pii)
    columns = instruction_columns(config)
    profile = {
        "task": config.task,
        "inputs": columns,
        "sources": {
            name: str(path) if path else {"split_from_train": split_info.get(name)} for name, path in sources.items()
        },
        "cleaning": {"train": {"duplicates_dropped": duplicates}} if data.clean.dedupe else {},
        "splits": {name: _profile(dataset) for name, dataset in splits.items() if dataset is not None},
    }
    for name, counts in redactions.items():
        profile["cleaning"].setdefault(name, {})["pii_redacted"] = counts
    # The files as they were read: a lineage names data by content, not only by path.
    files = {name: path for name, path in sources.items() if path}
    if data.feedback is not None:
        files["feedback"] = data.feedback.path
    profile["files"] = {name: {"path": str(path), "sha256": sha256_file(path)} for name, path in files.items()}
    if feedback is not None:
        profile["feedback"] = {key: value for key, value in feedback.items() if not isinstance(value, list)}
    hashes = {name: content_hash(dataset) for name, dataset in splits.items() if dataset is not None}
    profile["sha256"] = hashes
    return PreparedData(
        splits=splits, input_columns=columns, text_columns=columns, profile=profile, hashes=hashes, feedback=feedback
    )


def as_conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """A canonical row as a list of messages (a prompt/response pair is one user and one assistant turn)."""
    if MESSAGES_COLUMN in row:
        return row[MESSAGES_COLUMN]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def _drop_duplicates(dataset: Dataset) -> tuple[Dataset, int]:
    seen, keep = set(), []
    for index, row in enumerate(dataset):
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return (dataset if len(keep) == len(dataset) else take(dataset, keep)), len(dataset) - len(keep)


def _redact(dataset: Dataset, pii) -> tuple[Dataset, dict[str, int]]:
    """Redact every text of every example: prompts, responses and each message's content."""
    rows = dataset.to_list()
    texts = [message["content"] for row in rows for message in as_conversation(row)]
    redacted, counts = redact_texts(texts, pii.types, pii.style)
    position = iter(redacted)
    for row in rows:
        if MESSAGES_COLUMN in row:
            row[MESSAGES_COLUMN] = [{**message, "content": next(position)} for message in row[MESSAGES_COLUMN]]
        else:
            row["prompt"], row["response"] = next(position), next(position)
    return Dataset.from_list(rows), dict(sorted(counts.items()))


def _profile(dataset: Dataset) -> dict[str, Any]:
    conversations = [as_conversation(row) for row in dataset]
    turns = [sum(message["role"] == "assistant" for message in messages) for messages in conversations]
    characters = {
        role: sum(len(m["content"]) for messages in conversations for m in messages if m["role"] == role)
        for role in ROLES
    }
    return {"rows": len(dataset), "assistant_turns": sum(turns), "characters": characters}
