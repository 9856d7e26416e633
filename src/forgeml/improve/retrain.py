"""`forgeml retrain NAME`: a new run from a registered model's config, its data and the corrections its
users sent back, judged on the very test split the model was judged on.

The corrections are written to `feedback/<name>/<time>.jsonl` in the workspace (inputs, corrected label,
and where each came from) and named by the new run's `data.feedback`; the latest correction of an input
wins. The run's lineage.json names the parent version and every correction it learned from.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forgeml.config import FeedbackDataConfig, ForgeConfig, load_config
from forgeml.encryption import plaintext_view, wants_encryption
from forgeml.errors import ForgeError
from forgeml.monitor.served import as_utc
from forgeml.pipeline import RunResult, execute
from forgeml.registry import Registry
from forgeml.store import database_url
from forgeml.workspace import atomic_write_text, read_json, workspace_root


def retrain(
    name: str,
    alias: str = "champion",
    since: datetime | None = None,
    weight: float = 1.0,
    holdout: float = 0.0,
    overrides: list[str] | tuple[str, ...] = (),
    workspace: str | Path | None = None,
    quiet: bool = True,
    encrypt: bool | None = None,
) -> RunResult:
    """Train `name@alias`'s config again with its corrections merged into the training split.

    `since` keeps only corrections sent after that time; `weight` is how many times each counts;
    `holdout` keeps that share of them out of training, as a "feedback" split both models are scored on.
    Refuses to run when the test split cannot be reproduced (data files changed) or nothing was corrected.
    """
    root = workspace_root(workspace)
    registry = Registry(database_url(root))
    try:
        parent = registry.resolve(f"{name}@{alias}")
        run_ids = {version["run_id"] for version in registry.versions(name)}
    finally:
        registry.close()
    parent_dir = Path(parent["run_path"])
    with plaintext_view(parent_dir, only=("config.yaml", "data_profile.json")) as plain:
        config = load_config(plain / "config.yaml")
        profile = read_json(plain / "data_profile.json")
    fixed = {split: digest for split, digest in profile.get("sha256", {}).items() if split in ("validation", "test")}
    if "test" not in fixed:
        raise ForgeError(
            f"{name}@{alias} has no test split (data.split.test was 0 and data.test unset): a retrained model could "
            "not be compared with it on the same rows; give its config a test split and train it again"
        )
    if config.task in ("language-modeling", "masked-lm"):
        raise ForgeError(
            f"retrain {name}: a {config.task} model learns from raw text, not from corrections of its answers; "
            "fine-tune it with task instruction-tuning on `forgeml feedback export --kind generation`"
        )
    generative = config.task == "instruction-tuning"
    corrections = _corrections(name, run_ids, database_url(root), since, generative)
    if not corrections:
        when = f" since {since.isoformat()}" if since else ""
        raise ForgeError(f"retrain {name}: no corrections{when} recorded for it (POST /v1/feedback while it is served)")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    file = root / "feedback" / name / f"{stamp}.jsonl"
    if generative:
        atomic_write_text(file, _examples_jsonl(corrections, profile["inputs"]))
    else:
        atomic_write_text(file, _jsonl(corrections, profile["inputs"], config.data.label))
    config = _with_feedback(config, FeedbackDataConfig(path=file, weight=weight, holdout=holdout), overrides)
    lineage = {
        "parent": {"name": name, "version": parent["version"], "run_id": parent["run_id"], "alias": alias},
        "retrained_at": datetime.now(UTC).isoformat(),
        "corrections_since": since.isoformat() if since else None,
    }
    return execute(
        config,
        root,
        show_progress=not quiet,
        encrypt=wants_encryption(encrypt),
        same_splits_as=fixed,
        lineage=lineage,
    )


def _corrections(
    name: str, run_ids: set[str], url: str, since: datetime | None, generative: bool = False
) -> list[dict[str, Any]]:
    """The model's corrections, oldest first: those recorded under its name or by one of its versions' runs
    (a language model's: its generation feedback as examples, a correction or an answer rated up)."""
    from forgeml.serve.generations import GenerationStore
    from forgeml.serve.records import RecordStore

    store = GenerationStore(url) if generative else RecordStore(url)
    try:
        rows = store.feedback_examples() if generative else store.feedback()
    finally:
        store.close()
    rows = [row for row in rows if row["model"] == name or row["version"] in run_ids]
    if since is not None:
        rows = [row for row in rows if as_utc(row["created_at"]) >= as_utc(since)]
    return rows


def _examples_jsonl(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """One example per line in the run's canonical columns (prompt + response, or messages), with its origin."""
    lines = []
    for row in rows:
        if columns == ["messages"]:
            record = {"messages": row.get("messages") or _as_messages(row["prompt"], row["response"])}
        else:
            record = {"prompt": row["prompt"], "response": row["response"]}
        record |= {"feedback_id": row["feedback_id"], "request_id": row["generation_id"]}
        record |= {"created_at": row["created_at"], "source": row["source"]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def _as_messages(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _jsonl(rows: list[dict[str, Any]], inputs: list[str], label: str) -> str:
    """One JSON object per correction: the input columns, the label, and its origin."""
    lines = []
    for row in rows:
        values = row["inputs"]
        if isinstance(values, dict):
            record = {column: values.get(column) for column in inputs}
        else:
            values = [values] if isinstance(values, str) else list(values)
            record = dict(zip(inputs, values, strict=False))
        record[label] = row["label"]
        record |= {
            "feedback_id": row["id"],
            "request_id": row["request_id"],
            "created_at": as_utc(row["created_at"]).isoformat(),
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def _with_feedback(
    config: ForgeConfig, feedback: FeedbackDataConfig, overrides: list[str] | tuple[str, ...]
) -> ForgeConfig:
    raw = config.model_dump(mode="json")
    raw["data"]["feedback"] = feedback.model_dump(mode="json")
    raw["data"]["feedback"]["seed"] = config.train.seed
    return load_config(raw, list(overrides))
