"""From the `data` section to clean, validated, split datasets with a profile and hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from forgeml.config import DataConfig, ForgeConfig, PiiConfig
from forgeml.data import validate
from forgeml.data.clean import clean
from forgeml.data.io import column, read_table, replace_column
from forgeml.data.pii import find_names, redact_texts
from forgeml.data.profile import profile_split
from forgeml.data.split import content_hash, holdout, sample
from forgeml.workspace import sha256_file, sha256_path

SPLITS = ("train", "validation", "test")


@dataclass
class PreparedData:
    """The three splits (validation/test may be None), plus what was done to get them."""

    splits: dict[str, Dataset | None]
    input_columns: list[str]
    text_columns: list[str]
    profile: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    # What `data.feedback` did, with every correction's origin (for the run's lineage); None without it.
    feedback: dict[str, Any] | None = None

    @property
    def train(self) -> Dataset:
        return self.splits["train"]

    @property
    def validation(self) -> Dataset | None:
        return self.splits["validation"]

    @property
    def test(self) -> Dataset | None:
        return self.splits["test"]


def input_columns_for(config: ForgeConfig, available: list[str]) -> tuple[list[str], list[str]]:
    """(input columns, text columns) the task reads."""
    data = config.data
    if config.task in ("image-classification", "image-generation"):
        return ["image"], []
    if config.task.startswith("tabular"):
        features = data.features or [c for c in available if c != data.label]
        return list(features), []
    texts = [data.text] + ([data.text_pair] if data.text_pair else [])
    return texts, texts


def read_split(path: Path, config: ForgeConfig, inputs: list[str] | None = None, split: str = "train") -> Dataset:
    """Read one labelled file and check its columns and label values (row numbers match the file).

    Images (an .npz, a folder of class folders or a table of image files) become a table of pixels;
    `split` picks the arrays of an .npz that holds several splits."""
    data = config.data
    if config.task in ("image-classification", "image-generation"):
        from forgeml.data.images import read_images

        dataset = read_images(path, data.label, split, data.image, data.image_size)
    else:
        dataset = read_table(path, data.format)
    inputs = inputs or input_columns_for(config, dataset.column_names)[0]
    validate.require_columns(dataset, inputs, path, "input column")
    if config.task == "image-generation":  # a generator learns the images alone: labels are optional
        if data.label not in dataset.column_names:
            dataset = dataset.add_column(data.label, ["unlabelled"] * len(dataset))
        return dataset
    validate.require_columns(dataset, [data.label], path, "label column")
    check_labels(column(dataset, data.label), path, config)
    return dataset


def read_audited_file(path: Path, config: ForgeConfig, inputs: list[str], classes: list[str] | None = None) -> Dataset:
    """Read a file to audit a finished run on, prepared as the run's own evaluation splits were.

    The input columns and the `data.sensitive` columns must be there; the label column may be missing
    (the audits then measure what needs no labels). Labels that are there are checked, against the
    model's `classes` too. Text gets the run's cleaning (no deduplication: the file is audited as given)
    and PII redaction.
    """
    data = config.data
    dataset = read_table(path, data.format)
    validate.require_columns(dataset, inputs, path, "input column")
    validate.require_columns(dataset, data.sensitive, path, "sensitive column")
    label = data.label if data.label in dataset.column_names else None
    if label is not None:
        check_labels(column(dataset, label), path, config)
        if classes is not None:
            validate.check_known_labels([str(v) for v in column(dataset, label)], set(classes), path, label, "audited")
    texts = input_columns_for(config, dataset.column_names)[1]
    dataset, _ = clean(dataset, texts, inputs, label, data.clean.model_copy(update={"dedupe": False}))
    if data.pii.redact and texts:
        dataset, _ = redact_pii(dataset, texts, data.pii)
    return dataset


def check_labels(values: list, source: Path | str, config: ForgeConfig) -> None:
    if config.is_classification:
        validate.class_labels(values, source, config.data.label)
    else:
        validate.numeric_targets(values, source, config.data.label)


def redact_pii(dataset: Dataset, text_columns: list[str], pii: PiiConfig) -> tuple[Dataset, dict[str, int]]:
    """Replace personal data in the text columns; return counts per entity type.

    Person names are found only with `pii.ner_model` (a local token-classification checkpoint).
    """
    wants_names = pii.ner_model is not None and (pii.types is None or "PERSON" in [t.upper() for t in pii.types])
    total: dict[str, int] = {}
    for name in text_columns:
        texts = ["" if value is None else str(value) for value in column(dataset, name)]
        names = find_names(texts, pii.ner_model) if wants_names else None
        redacted, counts = redact_texts(texts, pii.types, pii.style, names)
        dataset = replace_column(dataset, name, redacted)
        for entity, count in counts.items():
            total[entity] = total.get(entity, 0) + count
    return dataset, dict(sorted(total.items()))


def prepare(config: ForgeConfig) -> PreparedData:
    """Read, validate, clean, split and sample the data the config names; profile what came out."""
    data: DataConfig = config.data
    raw_train = read_split(data.train, config)
    inputs, texts = input_columns_for(config, raw_train.column_names)
    sources = {"train": data.train, "validation": data.validation, "test": data.test}
    splits: dict[str, Dataset | None] = {"train": raw_train}
    for name in ("validation", "test"):
        splits[name] = read_split(sources[name], config, inputs, name) if sources[name] else None

    # The fairness audit reads data.sensitive from the split it scores; check that file now, not after training.
    audited = "test" if data.test or data.split.test > 0 else "validation"
    audited_file = sources[audited] or data.train  # a split carved from train has train's columns
    audited_rows = splits[audited] if sources[audited] else raw_train
    validate.require_columns(audited_rows, data.sensitive, audited_file, "sensitive column (data.sensitive)")

    cleaning = {}
    # Duplicates are dropped from train only: evaluation files are scored as given.
    evaluation_clean = data.clean.model_copy(update={"dedupe": False})
    for name, dataset in splits.items():
        if dataset is not None:
            options = data.clean if name == "train" else evaluation_clean
            splits[name], cleaning[name] = clean(dataset, texts, inputs, data.label, options)

    if data.pii.redact and texts:
        redactions = {}
        for name, dataset in splits.items():
            if dataset is not None:
                splits[name], redactions[name] = redact_pii(dataset, texts, data.pii)
        for name, counts in redactions.items():
            cleaning[name]["pii_redacted"] = counts

    split_info, taken = {}, 0.0
    for name, fraction in (("test", data.split.test), ("validation", data.split.validation)):
        if splits[name] is None and fraction > 0:
            # Fractions are of the whole train file: test comes off first, validation off the rest.
            labels = column(splits["train"], data.label) if config.is_classification and data.split.stratify else None
            share = fraction / (1.0 - taken)
            splits["train"], splits[name], stratified = holdout(splits["train"], share, labels, data.split.seed)
            split_info[name] = {"fraction": fraction, "stratified": stratified}
            taken += fraction

    for name in SPLITS:
        size = (data.sample or {}).get(name)
        if splits[name] is not None and size:
            splits[name] = sample(splits[name], size, data.split.seed)

    feedback = None
    if data.feedback is not None:  # after the held-out splits are fixed: corrections never move rows between them
        from forgeml.data.feedback import merge_feedback

        splits, feedback = merge_feedback(splits, data.feedback, config, inputs, texts)

    train_labels = [str(v) for v in column(splits["train"], data.label)]
    if config.is_classification:
        validate.check_trainable_labels(train_labels, data.train, data.label)
        for name in ("validation", "test", "feedback"):
            if splits.get(name) is not None:
                validate.check_known_labels(
                    [str(v) for v in column(splits[name], data.label)],
                    set(train_labels),
                    data.feedback.path if name == "feedback" else sources[name] or data.train,
                    data.label,
                    name,
                )

    counts_classes = config.is_classification or config.task == "image-generation"  # labels kept as they are
    profile = {
        "task": config.task,
        "inputs": inputs,
        "label": data.label,
        "sources": {
            name: str(path) if path else {"split_from_train": split_info.get(name)} for name, path in sources.items()
        },
        "cleaning": cleaning,
        "splits": {
            name: profile_split(dataset, texts, data.label, counts_classes)
            for name, dataset in splits.items()
            if dataset is not None
        },
    }
    # The files (or folders of images) as they were read: a lineage names data by content, not only by path.
    profile["files"] = {
        name: {"path": str(path), "sha256": sha256_path(path)} for name, path in sources.items() if path
    }
    if data.feedback is not None:
        profile["files"]["feedback"] = {"path": str(data.feedback.path), "sha256": sha256_file(data.feedback.path)}
    if feedback is not None:
        profile["feedback"] = {key: value for key, value in feedback.items() if not isinstance(value, list)}
    hashes = {name: content_hash(dataset) for name, dataset in splits.items() if dataset is not None}
    profile["sha256"] = hashes
    return PreparedData(
        splits=splits, input_columns=inputs, text_columns=texts, profile=profile, hashes=hashes, feedback=feedback
    )
