"""Tagged sentences for token classification: read JSON lines or CoNLL column files, check the IOB2 tags,
clean, split and profile them.

Two formats, both one sentence per example:
- JSON lines: `{"tokens": ["EU", "rejects", ...], "tags": ["B-ORG", "O", ...]}` (the keys are `data.tokens`
  and `data.label`), as CoNLL-2003 and the Hugging Face token-classification datasets ship.
- CoNLL columns (`.conll`, `.iob`, `.bio` or `data.format: conll`): one word per line, whitespace-separated
  columns with the word first and its tag last (the POS and chunk columns of CoNLL-2003 in between are
  ignored), a blank line between sentences, `-DOCSTART-` document separators skipped.

Tags are IOB2 (`B-TYPE` begins an entity, `I-TYPE` continues it, `O` is outside). An `I-TYPE` that follows
`O` or another type (IOB1, where `B-` only separates two touching entities of one type) is accepted and
rewritten to `B-TYPE`, so strict IOB2 scoring counts the entity; the profile counts the rewrites. Any other
tag shape is an error naming the file, the line and the column.

Every split keeps its words in the column `tokens` and its tags in `tags` (whatever the file called them)
and each sentence's first line in the file in `line`, so an error found after splitting still names it.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset

from forgeml.config import ForgeConfig
from forgeml.data.prepare import PreparedData
from forgeml.data.split import content_hash, holdout, sample, take
from forgeml.errors import DataError
from forgeml.workspace import sha256_file

TOKENS, TAGS, LINE = "tokens", "tags", "line"
CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".iob2")
DOCUMENT_START = "-DOCSTART-"
TAG = re.compile(r"^(?:O|([BI])-(\S+))$")
SPLITS = ("train", "validation", "test")


def tagged_format(path: Path, declared: str = "auto") -> str:
    """'conll' or 'jsonl' for a file of tagged sentences; anything else is an error naming the setting."""
    if declared in ("conll", "jsonl"):
        return declared
    if declared == "auto":
        suffix = path.suffix.lower()
        if suffix in CONLL_SUFFIXES:
            return "conll"
        if suffix in (".jsonl", ".ndjson", ".json"):
            return "jsonl"
        found = f"the extension {suffix!r}" if suffix else "a file without an extension"
        raise DataError(
            f"{path}: cannot tell the format of {found}; token-classification reads JSON lines (.jsonl) or CoNLL "
            f"columns ({', '.join(CONLL_SUFFIXES)}): rename the file or set data.format (jsonl or conll)"
        )
    raise DataError(f"data.format: token-classification reads jsonl or conll files, got {declared!r}")


def read_tagged(path: Path, tokens: str = TOKENS, tags: str = TAGS, data_format: str = "auto") -> tuple[Dataset, int]:
    """One file of tagged sentences -> (a Dataset with columns tokens, tags and line; how many IOB1 starts
    were rewritten as B- tags)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    kind = tagged_format(path, data_format)
    lines = _lines(path)
    rewritten: list[int] = []
    read = _read_conll if kind == "conll" else functools.partial(_read_jsonl, tokens=tokens, tags=tags)
    rows = read(path, lines, rewritten=rewritten)
    if not rows:
        raise DataError(f"{path}: no sentences in the file")
    columns = {TOKENS: [r[0] for r in rows], TAGS: [r[1] for r in rows], LINE: [r[2] for r in rows]}
    return Dataset.from_dict(columns), len(rewritten)


def read_sentences(path: Path, tokens: str = TOKENS) -> list[str | list[str]]:
    """Sentences to tag: a text file with one sentence per line, or JSON lines with a tokens list (or a
    `text` string) per line. Tags, if a JSONL file has them, are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    lines = _lines(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [line.rstrip("\r") for line in lines if line.strip()]
    sentences: list[str | list[str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _json_row(path, number, line)
        if tokens in row:
            sentences.append(_token_list(path, number, tokens, row[tokens]))
        elif isinstance(row.get("text"), str):
            sentences.append(row["text"])
        else:
            raise DataError(f"{path}: line {number}: no {tokens!r} list (data.tokens) and no 'text' string")
    if not sentences:
        raise DataError(f"{path}: no sentences in the file")
    return sentences


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start} cannot be decoded); save it as UTF-8") from None


def _json_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def _token_list(path: Path, number: int, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(token, str) for token in value):
        raise DataError(f"{path}: line {number}: column {key!r} must be a list of strings, got {value!r:.80}")
    for index, token in enumerate(value):
        if not token.strip():
            raise DataError(f"{path}: line {number}: column {key!r}: word {index + 1} is empty or only spaces")
    return value


def _read_jsonl(
    path: Path, lines: list[str], tokens: str, tags: str, rewritten: list[int]
) -> list[tuple[list[str], list[str], int]]:
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _json_row(path, number, line)
        for key, setting in ((tokens, "data.tokens"), (tags, "data.label")):
            if key not in row:
                raise DataError(
                    f"{path}: line {number}: no column {key!r} ({setting}); the line has {', '.join(map(repr, row))}"
                )
        words = _token_list(path, number, tokens, row[tokens])
        labels = _token_list(path, number, tags, row[tags])
        if len(words) != len(labels):
            raise DataError(
                f"{path}: line {number}: {len(words)} words in column {tokens!r} but {len(labels)} tags in column "
                f"{tags!r}; every word needs one tag"
            )
        rows.append((words, _iob2(labels, path, number, f"column {tags!r}", rewritten), number))
    return rows


def _read_conll(path: Path, lines: list[str], rewritten: list[int]) -> list[tuple[list[str], list[str], int]]:
    rows: list[tuple[list[str], list[str], int]] = []
    words: list[str] = []
    labels: list[str] = []
    first = 0
    for number, line in enumerate([*lines, ""], start=1):  # a final blank line closes the last sentence
        columns = line.split()
        if not columns or columns[0] == DOCUMENT_START:
            if words:
                rows.append((words, _iob2(labels, path, first, "the tag (last) column", rewritten, conll=True), first))
            words, labels = [], []
            continue
        if len(columns) < 2:
            raise DataError(
                f"{path}: line {number}: one column ({columns[0]!r}); a CoNLL line is the word, then its tag in the "
                "last column, separated by whitespace"
            )
        if not words:
            first = number
        words.append(columns[0])
        labels.append(columns[-1])
    return rows


def _iob2(tags: list[str], path: Path, line: int, column: str, rewritten: list[int], conll: bool = False) -> list[str]:
    """`tags` checked and with IOB1 starts (I-X after O or another type) rewritten as B-X (each one counted
    in `rewritten`). `line` is the sentence's line in the file; in a CoNLL file tag i is on line `line + i`."""
    fixed = []
    previous = "O"
    for index, tag in enumerate(tags):
        match = TAG.match(tag)
        if match is None:
            where = f"line {line + index}" if conll else f"line {line}, tag {index + 1}"
            raise DataError(
                f"{path}: {where}: {column}: tag {tag!r} is not IOB2; use O, B-TYPE (an entity's first word) or "
                "I-TYPE (its other words), e.g. B-PER, I-PER"
            )
        if match.group(1) == "I" and previous not in (f"B-{match.group(2)}", f"I-{match.group(2)}"):
            tag = f"B-{match.group(2)}"
            rewritten.append(index)
        fixed.append(tag)
        previous = tag
    return fixed


def entity_types(tags: list[list[str]]) -> list[str]:
    """The entity types in these tag lists, sorted."""
    return sorted({tag[2:] for sentence in tags for tag in sentence if tag != "O"})


def entity_counts(tags: list[list[str]]) -> dict[str, int]:
    """Entities per type (each B- tag starts one)."""
    counts = Counter(tag[2:] for sentence in tags for tag in sentence if tag.startswith("B-"))
    return dict(sorted(counts.items()))


def prepare_tagged(config: ForgeConfig) -> PreparedData:
    """Read, check, clean, split and sample the tagged sentences the config names; profile what came out."""
    data = config.data
    sources = {"train": data.train, "validation": data.validation, "test": data.test}
    splits: dict[str, Dataset | None] = {name: None for name in SPLITS}
    rewritten: dict[str, int] = {}
    for name, path in sources.items():
        if path is not None:
            splits[name], rewritten[name] = read_tagged(path, data.tokens, data.label, data.format)
    cleaning = {}
    for name, dataset in splits.items():
        if dataset is not None:
            splits[name], cleaning[name] = clean_tagged(dataset, config, dedupe=name == "train" and data.clean.dedupe)
            if rewritten.get(name):
                cleaning[name]["iob1_starts_rewritten"] = rewritten[name]

    split_info, taken = {}, 0.0
    for name, fraction in (("test", data.split.test), ("validation", data.split.validation)):
        if splits[name] is None and fraction > 0:
            # Sentences are not stratified: each holds several tags. Test comes off first, validation off the rest.
            share = fraction / (1.0 - taken)
            splits["train"], splits[name], _ = holdout(splits["train"], share, None, data.split.seed)
            split_info[name] = {"fraction": fraction, "stratified": False}
            taken += fraction
    for name in SPLITS:
        size = (data.sample or {}).get(name)
        if splits[name] is not None and size:
            splits[name] = sample(splits[name], size, data.split.seed)

    known = set(entity_types(splits["train"][TAGS]))
    if not known:
        raise DataError(f"{data.train}: the training sentences tag no entity (every tag is O); nothing to learn")
    for name in ("validation", "test"):
        if splits[name] is not None:
            _check_known_types(splits[name], known, sources[name] or data.train, data.label, name)

    profile = {
        "task": config.task,
        "inputs": [data.tokens],
        "label": data.label,
        "sources": {
            name: str(path) if path else {"split_from_train": split_info.get(name)} for name, path in sources.items()
        },
        "cleaning": cleaning,
        "splits": {name: profile_tagged(dataset) for name, dataset in splits.items() if dataset is not None},
        "files": {name: {"path": str(path), "sha256": sha256_file(path)} for name, path in sources.items() if path},
    }
    hashes = {name: content_hash(dataset.select_columns([TOKENS, TAGS])) for name, dataset in splits.items() if dataset}
    profile["sha256"] = hashes
    return PreparedData(splits=splits, input_columns=[TOKENS], text_columns=[TOKENS], profile=profile, hashes=hashes)


def clean_tagged(dataset: Dataset, config: ForgeConfig, dedupe: bool) -> tuple[Dataset, dict[str, int]]:
    """Sentences without words dropped (`data.clean.drop_empty`), Unicode NFKC of every word
    (`data.clean.normalize`) and, for the training split, exact duplicate sentences dropped (`data.clean.dedupe`).
    Returns the counts. A word that normalises to nothing keeps its original text."""
    options = config.data.clean
    counts = {"rows_in": len(dataset)}
    if options.drop_empty:
        kept = [row for row, words in enumerate(dataset[TOKENS]) if words]
        counts["empty_dropped"] = len(dataset) - len(kept)
        dataset = take(dataset, kept) if counts["empty_dropped"] else dataset
    if options.normalize:
        words = [[normal_word(word) for word in sentence] for sentence in dataset[TOKENS]]
        counts["words_normalised"] = sum(
            a != b for new, old in zip(words, dataset[TOKENS], strict=True) for a, b in zip(new, old, strict=True)
        )
        dataset = Dataset.from_dict({TOKENS: words, TAGS: dataset[TAGS], LINE: dataset[LINE]})
    if dedupe:
        seen: set[tuple] = set()
        kept = []
        for row, (words, tags) in enumerate(zip(dataset[TOKENS], dataset[TAGS], strict=True)):
            key = (tuple(words), tuple(tags))
            if key not in seen:
                seen.add(key)
                kept.append(row)
        counts["duplicates_dropped"] = len(dataset) - len(kept)
        dataset = take(dataset, kept)
    counts["rows_out"] = len(dataset)
    return dataset, counts


def normal_word(word: str) -> str:
    """NFKC, surrounding spaces removed; a word that would become empty keeps its text (its tag needs it)."""
    normal = unicodedata.normalize("NFKC", word).strip()
    return normal or word


def profile_tagged(dataset: Dataset) -> dict[str, Any]:
    """Sentences, words and entities of one split; `class_counts` are entities per type (the card's balance)."""
    tags = dataset[TAGS]
    counts = entity_counts(tags)
    lengths = sorted(len(sentence) for sentence in tags)
    return {
        "rows": len(dataset),
        "words": sum(lengths),
        "entities": sum(counts.values()),
        "class_counts": counts,
        "words_per_sentence_max": lengths[-1] if lengths else 0,
    }


def _check_known_types(dataset: Dataset, known: set[str], source: Path, column: str, split: str) -> None:
    for tags, line in zip(dataset[TAGS], dataset[LINE], strict=True):
        for tag in tags:
            if tag != "O" and tag[2:] not in known:
                raise DataError(
                    f"{source}: line {line}: column {column!r}: entity type {tag[2:]!r} ({tag}) never occurs in the "
                    f"training split, so the model cannot learn it ({split} split); known types: "
                    f"{', '.join(sorted(known))}"
                )
