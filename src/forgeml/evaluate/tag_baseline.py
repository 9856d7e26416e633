"""The classic token-classification yardstick: each word gets the tag it had most often in training.

Known words take their most frequent training tag (exact spelling first, then lower-cased); unknown words are
O. The tag sequence is scored like the model's (seqeval, strict IOB2), so an I- tag that continues nothing
counts for nothing, as in the model's scores. It is what the CoNLL shared tasks' baselines did (tag words
seen in training as they were tagged there), and it takes a second.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

from datasets import Dataset

from forgeml.data.tagged import TAGS, TOKENS
from forgeml.tasks.entities import entity_metrics


def most_frequent_tags(sentences: list[list[str]], tags: list[list[str]]) -> dict[str, str]:
    """Word -> its most frequent tag in training, for each spelling and each lower-cased spelling."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for words, labels in zip(sentences, tags, strict=True):
        for word, tag in zip(words, labels, strict=True):
            counts[word][tag] += 1
            counts["\0" + word.lower()][tag] += 1  # "\0": a lower-cased key never collides with a spelling
    return {word: tally.most_common(1)[0][0] for word, tally in counts.items()}


def predict_frequent_tags(lexicon: dict[str, str], sentences: list[list[str]]) -> list[list[str]]:
    return [[lexicon.get(word) or lexicon.get("\0" + word.lower(), "O") for word in words] for words in sentences]


def fit_tag_baselines(splits: dict[str, Dataset | None]) -> dict[str, Any]:
    """The most-frequent-tag baseline fitted on `splits['train']`, scored on the test (else validation) split,
    in the shape `evaluate.baseline.fit_baselines` returns (the card shows it beside the model)."""
    started = time.perf_counter()
    name = next((name for name in ("test", "validation") if splits.get(name) is not None), None)
    if name is None:
        return {"skipped": "no labelled validation or test split to score baselines on"}
    train, held_out = splits["train"], splits[name]
    lexicon = most_frequent_tags(train[TOKENS], train[TAGS])
    predicted = predict_frequent_tags(lexicon, held_out[TOKENS])
    metrics = entity_metrics(held_out[TAGS], predicted)
    seconds = time.perf_counter() - started
    return {
        "split": name,
        "train_rows": len(train),
        "seconds": seconds,
        "models": {
            "frequent_tag": {
                "label": "most frequent tag per word",
                "description": "each word tagged as it was most often in training (exact, then lower-cased "
                "spelling); unknown words O",
                "seconds": seconds,
                "metrics": {key: value for key, value in metrics.items() if key != "per_class"},
            }
        },
    }
