"""Reading, validating, cleaning, splitting and profiling data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgeml.config import CleanConfig, load_config
from forgeml.data.clean import clean, normalize_text
from forgeml.data.io import column, read_table
from forgeml.data.prepare import prepare
from forgeml.data.split import content_hash, holdout, kfold
from forgeml.errors import DataError

from conftest import sentiment_rows, write_csv


def config_for(train: Path, **data) -> object:
    return load_config({"name": "t", "task": "text-classification", "data": {"train": str(train), **data}})


def data_error(config) -> str:
    with pytest.raises(DataError) as caught:
        prepare(config)
    return str(caught.value)


def test_reads_every_format_into_the_same_rows(tmp_path: Path) -> None:
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad, awful", "label": "neg"}]
    write_csv(tmp_path / "a.csv", rows)
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood film\tpos\nbad, awful\tneg\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for suffix in ("csv", "tsv", "jsonl", "parquet"):
        dataset = read_table(tmp_path / f"a.{suffix}")
        assert column(dataset, "text") == ["good film", "bad, awful"], suffix


def test_missing_file_is_named(tmp_path: Path) -> None:
    assert "data file not found" in data_error(config_for(tmp_path / "nope.csv"))


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in data_error(config_for(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("text,label\n")
    assert "no rows" in data_error(config_for(tmp_path / "header.csv"))


def test_non_utf8_file_names_the_line_and_suggests_an_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ngood,pos\ncaf\u00e9 cr\u00e8me,neg\n".encode("cp1252"))
    message = data_error(config_for(path))
    assert "not UTF-8" in message and "line 3" in message and "iconv" in message


def test_missing_column_lists_the_available_ones(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [{"sentence": "x", "label": "a"}, {"sentence": "y", "label": "b"}])
    message = data_error(config_for(path))
    assert "'text'" in message and "available columns: sentence, label" in message and str(path) in message


def test_regression_target_that_is_not_a_number_names_the_row(tmp_path: Path) -> None:
    rows = [{"text": "a", "score": "1.5"}, {"text": "b", "score": "2"}, {"text": "c", "score": "high"}]
    path = write_csv(tmp_path / "r.csv", rows)
    config = load_config({"name": "t", "task": "regression", "data": {"train": str(path), "label": "score"}})
    message = data_error(config)
    assert "row 3" in message and "'score'" in message and "'high'" in message


def test_single_class_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "one.csv", [{"text": f"t{i}", "label": "pos"} for i in range(20)])
    assert "single class ('pos')" in data_error(config_for(path))


def test_validation_label_unseen_in_train_names_row_and_label(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(50))
    rows = [{"text": "good", "label": "positive"}, {"text": "meh", "label": "mixed"}]
    validation = write_csv(tmp_path / "val.csv", rows)
    message = data_error(config_for(train, validation=str(validation)))
    assert "row 2" in message and "'mixed'" in message and "validation" in message and str(validation) in message


def test_cleaning_reports_what_it_changed() -> None:
    from datasets import Dataset

    rows = {
        "text": ["ｇｏｏｄ  film", "good film", "   ", "bad film", "bad film", "same words", "same words", "x" * 50],
        "label": ["pos", "pos", "pos", "neg", "neg", "pos", "neg", "neg"],
    }
    cleaned, report = clean(Dataset.from_dict(rows), ["text"], ["text"], "label", CleanConfig(max_chars=20))
    assert report["normalized"] == 2  # full-width letters and the blank row
    assert report["dropped_empty"] == 1
    assert report["dropped_duplicates"] == 2  # "good film" after NFKC, and the second "bad film"
    assert report["conflicting_label_inputs"] == 1 and report["conflicting_label_rows"] == 2
    assert report["truncated_overlong"] == 1
    assert report["rows_out"] == len(cleaned) == 5
    assert max(len(t) for t in column(cleaned, "text")) == 20

    dropped, report = clean(
        Dataset.from_dict(rows),
        ["text"],
        ["text"],
        "label",
        CleanConfig(max_chars=20, overlong="drop", conflicting_labels="drop"),
    )
    assert report["dropped_overlong"] == 1 and report["dropped_conflicting"] == 2
    assert "same words" not in column(dropped, "text")


def test_normalize_text() -> None:
    assert normalize_text("  ﬁne\u00a0\tday\n") == "fine day"


def test_stratified_split_keeps_class_shares_and_is_seeded(tmp_path: Path) -> None:
    rows = [{"text": f"r{i}", "label": "rare" if i % 10 == 0 else "common"} for i in range(1000)]
    path = write_csv(tmp_path / "d.csv", rows)
    first = prepare(config_for(path, split={"validation": 0.2, "test": 0.1}))
    assert {k: len(v) for k, v in first.splits.items()} == {"train": 700, "validation": 200, "test": 100}
    for name in ("train", "validation", "test"):
        counts = Counter(column(first.splits[name], "label"))
        assert counts["rare"] / sum(counts.values()) == pytest.approx(0.1, abs=0.01)
    again = prepare(config_for(path, split={"validation": 0.2, "test": 0.1}))
    assert again.hashes == first.hashes
    other_seed = prepare(config_for(path, split={"validation": 0.2, "test": 0.1, "seed": 7}))
    assert other_seed.hashes["test"] != first.hashes["test"]
    assert set(first.profile["sha256"]) == {"train", "validation", "test"}


def test_sample_takes_a_seeded_subset(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", sentiment_rows(600))
    config = config_for(path, sample={"train": 100}, split={"validation": 0.1, "test": 0.0}, clean={"dedupe": False})
    data = prepare(config)
    assert len(data.train) == 100 and len(data.validation) == 60 and data.test is None


def test_content_hash_depends_on_content_only() -> None:
    from datasets import Dataset

    a = Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})
    b = Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})
    c = Dataset.from_dict({"text": ["x", "z"], "label": [0, 1]})
    assert content_hash(a) == content_hash(b) != content_hash(c)


def test_holdout_without_enough_rows_per_class_falls_back_to_a_plain_split() -> None:
    from datasets import Dataset

    dataset = Dataset.from_dict({"x": list(range(10)), "label": ["a"] * 9 + ["b"]})
    rest, held, stratified = holdout(dataset, 0.2, column(dataset, "label"), seed=0)
    assert not stratified and len(rest) == 8 and len(held) == 2


def test_kfold_is_stratified_and_covers_every_row() -> None:
    labels = ["a"] * 30 + ["b"] * 6
    seen = []
    for train_rows, held_rows in kfold(len(labels), 3, labels, seed=0):
        assert Counter(labels[i] for i in held_rows) == {"a": 10, "b": 2}
        assert not set(train_rows) & set(held_rows)
        seen += list(held_rows)
    assert sorted(seen) == list(range(36))


def test_pii_is_redacted_before_training_and_counted(tmp_path: Path) -> None:
    rows = [
        {"text": "mail me at jane.doe@example.com please", "label": "pos"},
        {"text": "card 4111 1111 1111 1111 was charged twice", "label": "neg"},
        {"text": "call +44 20 7946 0958 tomorrow", "label": "pos"},
        {"text": "nothing personal here", "label": "neg"},
    ] * 3
    rows = [{**row, "text": f"{row['text']} #{i}"} for i, row in enumerate(rows)]
    path = write_csv(tmp_path / "d.csv", rows)
    data = prepare(config_for(path, pii={"redact": True}, split={"validation": 0.0, "test": 0.0}))
    texts = column(data.train, "text")
    assert not any("@example.com" in t or "4111" in t or "7946" in t for t in texts)
    assert sum("[EMAIL]" in t for t in texts) == 3 and sum("[CREDIT_CARD]" in t for t in texts) == 3
    assert data.profile["cleaning"]["train"]["pii_redacted"] == {"CREDIT_CARD": 3, "EMAIL": 3, "PHONE": 3}


def test_sensitive_columns_are_checked_in_the_file_that_gets_audited(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40))
    people = write_csv(tmp_path / "people.csv", [{**r, "group": "a"} for r in sentiment_rows(20, seed=2)])
    data = prepare(config_for(train, test=str(people), sensitive=["group"], split={"validation": 0.2, "test": 0.0}))
    assert "group" in data.test.column_names  # train need not have it: only the audited test file does
    message = data_error(config_for(train, sensitive=["group"]))
    assert "sensitive column (data.sensitive) 'group'" in message and str(train) in message
