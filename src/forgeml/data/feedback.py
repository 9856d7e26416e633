"""Served corrections merged into the training split (`data.feedback`, written by `forgeml retrain`).

A correction says "for these inputs, the right label is this". It replaces every training row with the
same inputs (the original label was wrong, or the world changed) or is added as a new row. Corrections
of inputs that are in the validation or test split are left out of training altogether: the model that
is judged on those rows must not have been taught their answers. A share of the rest can be held out as
a split of its own ("feedback"), on which both the current model and the retrained one are scored.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from datasets import Dataset

from forgeml.config import FeedbackDataConfig, ForgeConfig
from forgeml.data import validate
from forgeml.data.clean import clean
from forgeml.data.io import column, read_table, table_dataset
from forgeml.data.split import take
from forgeml.errors import DataError

# Where a correction came from: kept in the file for the lineage, never trained on.
ORIGIN_COLUMNS = ("feedback_id", "request_id", "created_at")


def input_key(values: list[Any]) -> str:
    """One record's inputs as a comparable key (the same text, or the same feature values)."""
    return json.dumps(["" if value is None else str(value) for value in values], ensure_ascii=False)


def merge_feedback(
    splits: dict[str, Dataset | None],
    options: FeedbackDataConfig,
    config: ForgeConfig,
    inputs: list[str],
    texts: list[str],
) -> tuple[dict[str, Dataset | None], dict[str, Any]]:
    """`splits` with the corrections in `options.path` merged into "train" (and a "feedback" split when
    `options.holdout` > 0); plus what was done, for the data profile and the lineage."""
    label = config.data.label
    corrections = read_table(options.path, "jsonl" if options.path.suffix in (".jsonl", ".ndjson") else "auto")
    validate.require_columns(corrections, inputs, options.path, "input column")
    validate.require_columns(corrections, [label], options.path, "label column")
    from forgeml.data.prepare import check_labels, redact_pii  # prepare imports this module

    check_labels(column(corrections, label), options.path, config)
    # Cleaned as the training file was (normalised text, empty rows dropped), without dropping duplicates:
    # the latest correction of an input is chosen below.
    options_clean = config.data.clean.model_copy(update={"dedupe": False, "conflicting_labels": "flag"})
    corrections, _ = clean(corrections, texts, inputs, label, options_clean)
    if config.data.pii.redact and texts:
        corrections, _ = redact_pii(corrections, texts, config.data.pii)
    return _merge(splits, corrections, lambda dataset: _keys(dataset, inputs), options)


def merge_instruction_feedback(
    splits: dict[str, Dataset | None], options: FeedbackDataConfig, columns: list[str]
) -> tuple[dict[str, Dataset | None], dict[str, Any]]:
    """`merge_feedback` for instruction data: a correction is an example in the run's canonical columns
    (`prompt` + `response`, or `messages`) whose response replaces the answer to the same prompt (the same
    conversation up to its last answer) in training."""
    from forgeml.data.instructions import MESSAGES_COLUMN, canonical_examples

    table = read_table(options.path, "jsonl" if options.path.suffix in (".jsonl", ".ndjson") else "auto")
    validate.require_columns(table, columns, options.path, "example column")
    corrections = canonical_examples(table, columns, options.path)
    origins = {name: column(table, name) for name in ORIGIN_COLUMNS if name in table.column_names}
    for name, values in origins.items():
        corrections = corrections.add_column(name, [None if value is None else str(value) for value in values])

    def keys(dataset: Dataset) -> list[str]:
        if MESSAGES_COLUMN in columns:  # the conversation before its last answer
            return [json.dumps(_asked(messages), ensure_ascii=False) for messages in column(dataset, MESSAGES_COLUMN)]
        return [input_key([prompt]) for prompt in column(dataset, "prompt")]

    return _merge(splits, corrections, keys, options)


def _asked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last]]


def _merge(
    splits: dict[str, Dataset | None],
    corrections: Dataset,
    keys_of: Callable[[Dataset], list[str]],
    options: FeedbackDataConfig,
) -> tuple[dict[str, Dataset | None], dict[str, Any]]:
    """The latest correction of each input replaces the training rows with that input (or is added);
    corrections of evaluated inputs are left out; a seeded share is held out as the "feedback" split."""
    rows = corrections.to_list()
    latest: dict[str, dict[str, Any]] = {}
    for key, row in zip(keys_of(corrections), rows, strict=True):  # in time order: a later correction wins
        latest[key] = row

    evaluated = set()
    for name in ("validation", "test"):
        if splits.get(name) is not None:
            evaluated.update(keys_of(splits[name]))
    kept = {key: row for key, row in latest.items() if key not in evaluated}

    rng = random.Random(options.seed)
    ordered = sorted(kept)
    shuffled = list(ordered)
    rng.shuffle(shuffled)
    held_out_keys = set(shuffled[: round(len(shuffled) * options.holdout)])
    corrected = [key for key in ordered if key not in held_out_keys]
    trained = [kept[key] for key in corrected]
    held_out = [kept[key] for key in ordered if key in held_out_keys]

    train = splits["train"]
    train_keys, replacing = keys_of(train), set(corrected)
    keep = [index for index, key in enumerate(train_keys) if key not in replacing]
    replaced = len(train_keys) - len(keep)
    copies = _copies(len(trained), options.weight, rng)
    added = [row for row, count in zip(trained, copies, strict=True) for _ in range(count)]
    merged = dict(splits)
    merged["train"] = _concatenate(take(train, keep), added, options)
    if held_out:
        merged["feedback"] = _like(train, held_out, options)
    facts = {
        "file": str(options.path),
        "corrections": len(rows),
        "distinct_inputs": len(latest),
        "left_out_in_evaluation_splits": len(latest) - len(kept),
        "trained": len(trained),
        "held_out": len(held_out),
        "replaced_training_rows": replaced,
        "added_training_rows": len(added),
        "weight": options.weight,
        "used": [_origin(row) for row in trained],
        "held_out_rows": [_origin(row) for row in held_out],
    }
    return merged, facts


def _keys(dataset: Dataset, inputs: list[str]) -> list[str]:
    """Each row's input key, in row order."""
    return [input_key(values) for values in zip(*(column(dataset, n) for n in inputs), strict=True)]


def _copies(count: int, weight: float, rng: random.Random) -> list[int]:
    """How many copies of each correction to train on: `weight` on average, whole copies plus a seeded chance."""
    whole, fraction = math.floor(weight), weight - math.floor(weight)
    return [whole + (1 if rng.random() < fraction else 0) for _ in range(count)]


def _concatenate(train: Dataset, rows: list[dict[str, Any]], options: FeedbackDataConfig) -> Dataset:
    if not rows:
        return train
    from datasets import concatenate_datasets

    return concatenate_datasets([train, _like(train, rows, options)])


def _like(train: Dataset, rows: list[dict[str, Any]], options: FeedbackDataConfig) -> Dataset:
    """`rows` as a Dataset with the training split's columns and types (columns they lack are null)."""
    schema = train.data.schema
    arrays = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        try:
            arrays[field.name] = pa.array(values).cast(field.type) if values else pa.array([], field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            raise DataError(
                f"{options.path}: column {field.name!r} holds values that do not fit the training data's "
                f"type ({field.type}), e.g. {values[0]!r}"
            ) from None
    return table_dataset(pa.table(arrays, schema=schema))


def _origin(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row.get(name) for name in ORIGIN_COLUMNS if row.get(name) is not None}
