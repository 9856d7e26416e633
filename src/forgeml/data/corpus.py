"""Unlabelled text for language modeling: read documents, hold some out, profile and hash them.

A corpus is one `.txt` file, a folder of them (one document per file, sorted by name), or a text
column of a table (one document per row). Validation and test come from their own files when given;
otherwise a single document loses its tail (nanoGPT's split of one file) and several documents lose a
seeded share of whole documents, so no document is split between training and evaluation.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from forgeml.config import ForgeConfig
from forgeml.data.io import column, read_table
from forgeml.data.pii import redact_texts
from forgeml.data.prepare import PreparedData
from forgeml.data.split import content_hash, holdout
from forgeml.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
COLUMN = "text"  # every split holds its documents in this column, whatever the source called it


def read_documents(path: Path, text_column: str, data_format: str = "auto") -> list[str]:
    """The documents of one source: a text file, a folder of text files, or a table's text column."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
        return [_read_text(file) for file in files]
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() in TEXT_SUFFIXES:
        return [_read_text(path)]
    table = read_table(path, data_format)
    if text_column not in table.column_names:
        raise DataError(f"{path}: no column {text_column!r} (data.text); columns: {', '.join(table.column_names)}")
    return [str(value) for value in column(table, text_column) if value not in (None, "")]


def _insert_canaries(config: ForgeConfig, documents: dict[str, list[str]]) -> list:
    """The memorisation audit's canaries, put into the training text only (after redaction, which could
    rewrite a secret); the same config always inserts the same canaries at the same places."""
    options = config.audit.memorization if config.audit else None
    if options is None:
        return []
    from forgeml.trust.memorization import insert_canaries, plan_canaries, resolve_options

    canaries = plan_canaries(options)
    if canaries:
        documents["train"] = insert_canaries(documents["train"], canaries, resolve_options(options)["seed"])
    return canaries


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start} cannot be decoded); save it as UTF-8") from None


def prepare_corpus(config: ForgeConfig) -> PreparedData:
    """Read the corpus the config names, hold out validation/test, redact PII when asked; profile the splits."""
    from forgeml.data.packing import held_out_tail

    data = config.data
    sources = {"train": data.train, "validation": data.validation, "test": data.test}
    documents = {name: read_documents(path, data.text, data.format) for name, path in sources.items() if path}
    if not any(documents["train"]):
        raise DataError(f"{data.train}: the training text is empty")
    split_info = {}
    for name, fraction in (("test", data.split.test), ("validation", data.split.validation)):
        if name in documents or fraction <= 0:
            continue
        train = documents["train"]
        share = fraction / (1.0 - sum(info["fraction"] for info in split_info.values()))
        if len(train) == 1:  # one long text: its tail, cut at a line break (nanoGPT's 90/10)
            head, tail = held_out_tail(train[0], share)
            documents["train"], documents[name] = [head], [tail]
            split_info[name] = {"fraction": fraction, "how": "tail of the text"}
        else:
            rest, held, _ = holdout(Dataset.from_dict({COLUMN: train}), share, None, data.split.seed)
            documents["train"], documents[name] = column(rest, COLUMN), column(held, COLUMN)
            split_info[name] = {"fraction": fraction, "how": "whole documents, seeded"}
    redactions = {}
    if data.pii.redact:
        for name, texts in documents.items():
            documents[name], redactions[name] = redact_texts(texts, data.pii.types, data.pii.style)
    canaries = _insert_canaries(config, documents)
    splits: dict[str, Dataset | None] = {name: None for name in ("train", "validation", "test")}
    for name, texts in documents.items():
        splits[name] = Dataset.from_dict({COLUMN: texts})
    profile = {
        "task": config.task,
        "inputs": [COLUMN],
        "sources": {
            name: str(path) if path else {"split_from_train": split_info.get(name)} for name, path in sources.items()
        },
        "splits": {
            name: {"documents": len(texts), "characters": sum(map(len, texts))} for name, texts in documents.items()
        },
        **({"cleaning": {name: {"pii_redacted": counts} for name, counts in redactions.items()}} if redactions else {}),
        **({"canaries": [canary.to_dict() for canary in canaries]} if canaries else {}),
    }
    hashes = {name: content_hash(dataset) for name, dataset in splits.items() if dataset is not None}
    profile["sha256"] = hashes
    return PreparedData(splits=splits, input_columns=[COLUMN], text_columns=[COLUMN], profile=profile, hashes=hashes)
