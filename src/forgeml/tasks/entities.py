"""Entities from IOB2 tags: words of raw text with their character offsets, entity spans with scores, and
entity-level precision/recall/F1 (seqeval, strict IOB2).

Strict IOB2 (seqeval's `mode="strict", scheme=IOB2`, as the CoNLL-2003 evaluation script counts): an entity
is a B-TYPE tag followed by any number of I-TYPE tags of the same type; an I- tag that does not continue an
entity of its type starts nothing, and a prediction counts only when its type and both boundaries match.
The same rule turns predicted tags into the entity spans `Predictor.predict` returns, so what the card
scores is what a user gets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# Words as CoNLL-2003 (Reuters, Penn-Treebank style) cut them: abbreviations ("U.S.") and numbers with
# inner separators ("1996-08-22", "1,000", "3.5") stay whole, clitics ("'s", "n't") and every other
# punctuation mark are words of their own, hyphenated words ("German-born") and names with an inner
# apostrophe ("O'Neill") stay whole.
WORD = re.compile(
    r"""
    (?:[^\W\d_]\.){2,}                                   # U.S., U.N.
    | \d+(?:[.,:/-]\d+)*                                 # 1996-08-22, 1,000, 3.5, 10:30
    | \w+(?=n't\b)                                       # do|n't
    | (?i:n't|'s|'re|'ve|'ll|'d|'m)\b                    # clitics
    | \w+(?:-\w+|'(?!(?:s|re|ve|ll|d|m|t)\b)\w+)*        # words, German-born, O'Neill
    | [^\w\s]                                            # any other mark, one at a time
    """,
    re.VERBOSE,
)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of `text` and their (start, end) character offsets, CoNLL-style (see WORD)."""
    words, offsets = [], []
    for match in WORD.finditer(text):
        words.append(match.group())
        offsets.append(match.span())
    return words, offsets


def joined_offsets(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pre-tokenised input: the words joined by single spaces, and each word's offsets in that text."""
    offsets, position = [], 0
    for word in words:
        offsets.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), offsets


def tag_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of each entity in an IOB2 tag sequence, by the strict rule: B-X
    starts an entity, I-X continues one of type X, and an I-X that continues nothing is no entity."""
    entities: list[tuple[str, int, int]] = []
    current: list[Any] | None = None
    for index, tag in enumerate(tags):
        kind, _, name = tag.partition("-")
        if kind == "I" and current is not None and current[0] == name:
            current[2] = index + 1
            continue
        if current is not None:
            entities.append(tuple(current))  # type: ignore[arg-type]
            current = None
        if kind == "B":
            current = [name, index, index + 1]
    if current is not None:
        entities.append(tuple(current))  # type: ignore[arg-type]
    return entities


def entity_spans(
    text: str, offsets: Sequence[tuple[int, int]], tags: Sequence[str], scores: Sequence[float]
) -> list[dict[str, Any]]:
    """Entities of one sentence as {entity, text, start, end, score, words: [first, last + 1]}: character
    offsets into `text`; `score` is the mean probability of the entity's words' predicted tags."""
    spans = []
    for name, first, last in tag_entities(tags):
        start, end = offsets[first][0], offsets[last - 1][1]
        spans.append(
            {
                "entity": name,
                "text": text[start:end],
                "start": int(start),
                "end": int(end),
                "score": round(float(np.mean(scores[first:last])), 6),
                "words": [first, last],
            }
        )
    return spans


def entity_metrics(true: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 overall (micro) and per type, seqeval in strict IOB2 mode, plus
    word-level tag accuracy and the number of true entities."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    words = sum(len(sentence) for sentence in true)
    correct = sum(a == b for t, p in zip(true, predicted, strict=True) for a, b in zip(t, p, strict=True))
    report = classification_report(true, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    overall = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    per_type = {
        name: {
            "precision": float(scores["precision"]),
            "recall": float(scores["recall"]),
            "f1": float(scores["f1-score"]),
            "support": int(scores["support"]),
        }
        for name, scores in sorted(report.items())
        if not name.endswith(" avg")
    }
    return {
        "f1": float(overall["f1-score"]),
        "precision": float(overall["precision"]),
        "recall": float(overall["recall"]),
        "accuracy": correct / words if words else 0.0,
        "entities": int(overall["support"]),
        "per_class": per_type,
    }
