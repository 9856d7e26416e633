"""Read csv, tsv, jsonl and parquet files into a `datasets.Dataset` (Arrow-backed)."""

from __future__ import annotations

import codecs
import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import datasets as hf_datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pa_parquet
from datasets import Dataset

from forgeml.errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the extension {suffix!r}; "
            f"use one of {', '.join(sorted(FORMATS))} or set data.format (csv, tsv, jsonl, parquet)"
        )
    return FORMATS[suffix]


def read_table(path: str | Path, data_format: str = "auto") -> Dataset:
    """Read one file. Raises :class:`DataError` naming the file for every problem a user can fix."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise DataError(f"data file not found: {path}{hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    kind = detect_format(path, data_format)
    if kind != "parquet":
        _check_utf8(path)
    try:
        table = _read_arrow(path, kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
        raise DataError(f"{path}: could not parse as {kind}: {error}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has a header but no rows")
    return Dataset(table)


def _read_arrow(path: Path, kind: str) -> pa.Table:
    if kind == "parquet":
        return pa_parquet.read_table(path)
    if kind == "jsonl":
        return pa_json.read_json(path)
    delimiter = "\t" if kind == "tsv" else ","
    return pa_csv.read_csv(
        path,
        parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        # An empty field is a missing value in every column type, so tabular imputation sees it.
        convert_options=pa_csv.ConvertOptions(strings_can_be_null=True),
    )


def _check_utf8(path: Path) -> None:
    """Fail early with the line of the first non-UTF-8 byte and a likely encoding."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            try:
                line += decoder.decode(block).count("\n")
            except UnicodeDecodeError as error:
                line += block[: error.start].count(b"\n")
                guess = _guess_encoding(block)
                raise DataError(
                    f"{path}: not UTF-8 (byte 0x{block[error.start]:02x} on line {line}). "
                    f"It looks like {guess}; convert it, e.g. `iconv -f {guess} -t utf-8 in.csv > out.csv`."
                ) from None


def _guess_encoding(block: bytes) -> str:
    for candidate in ("cp1252", "gb18030", "latin-1"):
        try:
            block.decode(candidate)
        except UnicodeDecodeError:
            continue
        return candidate
    return "latin-1"


def column(dataset: Dataset, name: str) -> list:
    """One column as a Python list (fast: one Arrow conversion, not a lookup per row). A subset of rows (a
    split carved out by `select`) is gathered with one Arrow `take`, not the datasets library's row-wise one."""
    if name not in dataset.column_names:
        raise ValueError(f"column {name!r} not in the dataset (columns: {dataset.column_names})")
    values = dataset.data.table.column(name)
    if dataset._indices is not None:
        values = values.take(dataset._indices.table.column(0))
    return values.to_pylist()


def replace_column(dataset: Dataset, name: str, values: list) -> Dataset:
    """`dataset` with column `name` replaced by `values`, column order kept."""
    if dataset._indices is None:  # a plain table (most calls): no re-indexing pass, no new fingerprint
        table = dataset.data.table
    else:
        with quiet_datasets():  # re-indexing a subset shows a progress bar of its own otherwise
            table = dataset.flatten_indices().data.table
    position = table.schema.get_field_index(name)
    return table_dataset(table.set_column(position, name, pa.array(values)))


def table_dataset(table: pa.Table) -> Dataset:
    """A Dataset over an Arrow table built in memory.

    `datasets` fingerprints a new Dataset by pickling its whole state, which costs more than the rest of a
    small prediction call; these tables are never cached to disk, so a random fingerprint (what `datasets`
    itself uses for transforms it cannot hash) serves as well.
    """
    return Dataset(table, fingerprint=secrets.token_hex(16))


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars inside our own steps (the CLI shows one display of its own)."""
    was_enabled = not hf_datasets.are_progress_bars_disabled()
    hf_datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            hf_datasets.enable_progress_bars()
