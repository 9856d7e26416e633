"""Person names (PERSON) with a NER model: a tiny token-classification BERT trained here on template
sentences stands in for a real checkpoint; `find_names` runs it through the transformers pipeline,
and redaction, data preparation and the config use its spans."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import forgeml
from forgeml.data.pii import find_names, redact_texts
from forgeml.data.prepare import prepare
from forgeml.errors import ConfigError

from conftest import write_csv

NAMES = ["alice", "bob", "carol", "dmitri", "erin", "fatima", "gustav", "hiro"]
SURNAMES = ["smith", "jones", "okafor", "novak"]
WORDS = ["i", "met", "saw", "called", "and", "went", "home", "today", "the", "film", "was", "great", "with", "said"]
TEMPLATES = [
    "i met {name} today",
    "{name} said the film was great",
    "i called {name} and went home",
    "the film with {name} was great",
]


def labelled_sentence(rng: random.Random) -> tuple[list[str], list[int]]:
    name = [rng.choice(NAMES)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
    words, tags = [], []
    for word in rng.choice(TEMPLATES).split():
        if word == "{name}":
            words += name
            tags += [1] + [2] * (len(name) - 1)  # B-PER, I-PER
        else:
            words.append(word)
            tags.append(0)
    return words, tags


@pytest.fixture(scope="module")
def name_tagger(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("ner")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *NAMES, *SURNAMES, *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)})
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = random.Random(0)
    for _ in range(150):  # one word = one token here, so word tags are token tags
        batch = [labelled_sentence(rng) for _ in range(16)]
        encoded = tokenizer([words for words, _ in batch], is_split_into_words=True, padding=True, return_tensors="pt")
        targets = torch.full(encoded["input_ids"].shape, -100)
        for row, (_, tags) in enumerate(batch):
            targets[row, 1 : 1 + len(tags)] = torch.tensor(tags)
        loss = model(**encoded, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_find_names_returns_character_spans(name_tagger: str) -> None:
    texts = ["i met carol novak today", "the film was great", "", "fatima said the film was great"]
    spans = find_names(texts, name_tagger)
    assert [[text[a:b] for a, b in found] for text, found in zip(texts, spans, strict=True)] == [
        ["carol novak"],
        [],
        [],
        ["fatima"],
    ]


def test_names_are_redacted_beside_the_pattern_types(name_tagger: str) -> None:
    texts = ["i called bob jones and went home bob@example.com", "i met hiro today"]
    redacted, counts = redact_texts(texts, None, "tag", find_names(texts, name_tagger))
    assert redacted == ["i called [PERSON] and went home [EMAIL]", "i met [PERSON] today"]
    assert counts == {"PERSON": 2, "EMAIL": 1}
    only_names, counts = redact_texts(texts, ["PERSON"], "mask", find_names(texts, name_tagger))
    # Names only: the name inside the address is a name too, and nothing else is touched.
    assert only_names[0] == "i called ********* and went home ***@example.com" and counts == {"PERSON": 3}
    with pytest.raises(ValueError, match="one list of spans per text"):
        redact_texts(texts, None, "tag", [[]])


def test_prepare_redacts_names_and_counts_them_in_the_profile(name_tagger: str, tmp_path: Path) -> None:
    rows = [{"text": f"i met {name} today", "label": "pos" if i % 2 else "neg"} for i, name in enumerate(NAMES * 5)]
    config = forgeml.load_config(
        {
            "task": "text-classification",
            "data": {
                "train": str(write_csv(tmp_path / "t.csv", rows)),
                "split": {"validation": 0.2, "test": 0.0},
                "clean": {"dedupe": False},
                "pii": {"redact": True, "ner_model": name_tagger},
            },
        }
    )
    data = prepare(config)
    assert set(data.train["text"]) == {"i met [PERSON] today"}
    assert data.profile["cleaning"]["train"]["pii_redacted"] == {"PERSON": len(rows)}  # counted before the split


def test_person_without_a_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.pii.*PERSON needs a NER model.*ner_model"):
        forgeml.load_config(
            {"task": "text-classification", "data": {"train": "t.csv", "pii": {"redact": True, "types": ["PERSON"]}}}
        )
    with pytest.raises(ValueError, match="cannot load the NER model"):
        find_names(["i met bob"], str(tmp_path / "missing"))
