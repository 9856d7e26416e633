"""token-classification (NER): sub-word alignment and span offsets on a tiny random-initialised BERT, strict IOB2
scoring, IOB2 / CoNLL reading with errors that name the line and column, config errors naming the key, run round
trips with a tiny model (real CoNLL rows; synthetic names for the PII redactor), and MiniLM on real CoNLL rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

import forgeml
from forgeml.config import load_config
from forgeml.data.pii import find_names, redact_texts
from forgeml.data.prepare import prepare
from forgeml.data.tagged import read_sentences, read_tagged
from forgeml.errors import ConfigError, DataError, ForgeError
from forgeml.tasks.entities import entity_metrics, split_words, tag_entities
from forgeml.tasks.token_classification import IGNORED, TokenClassificationTask

from conftest import FILLER, NEGATIVE, POSITIVE

pytestmark = pytest.mark.usefixtures("one_thread")

TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def tiny_task(backbone: Path, max_length: int = 32) -> TokenClassificationTask:
    task = TokenClassificationTask({"backbone": str(backbone), "max_length": max_length, "dropout": 0.0})
    task.fit(Dataset.from_dict({"tokens": [["x", "y"]], "tags": [["B-PER", "B-LOC"]]}))
    return task


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- sub-word alignment and spans -------------------------------------------------------------------------


def test_the_first_piece_of_each_word_carries_its_tag_and_the_other_pieces_are_ignored(tiny_backbone: Path):
    task = tiny_task(tiny_backbone)
    assert task.tags == TAGS
    split = task.encode_words([["the", "blackburn", "film", "."]], [["O", "B-PER", "O", "O"]])
    pieces = task.tokenizer.convert_ids_to_tokens(split.ids[0])
    # The tiny vocabulary knows "the" and "film" but spells "blackburn" letter by letter: nine pieces.
    assert pieces == ["[CLS]", "the", "b", *(f"##{c}" for c in "lackburn"), "film", ".", "[SEP]"]
    assert split.first_pieces[0].tolist() == [1, 2, 11, 12]
    labels = split.labels[0]
    assert labels[[1, 2, 11, 12]].tolist() == [TAGS.index("O"), TAGS.index("B-PER"), 0, 0]
    ignored = np.setdiff1d(np.arange(len(labels)), [1, 2, 11, 12])
    assert (labels[ignored] == IGNORED).all()  # [CLS], "##l" ... "##n", [SEP]

    inputs, targets = split.batch([0])
    assert targets.shape == (1, 32)  # padded to max_length with the ignored label, like the model's outputs
    assert (targets[0, 14:] == IGNORED).all() and inputs["input_ids"].shape == (1, 14)
    model = task.build_model().eval()
    assert model(**inputs).shape == (1, 32, len(TAGS))


def test_words_past_max_length_are_truncated_counted_and_tagged_o(tiny_backbone: Path):
    task = tiny_task(tiny_backbone, max_length=8)
    split = task.encode_words([["the", "blackburn", "film"], ["the", "film"]], [["O", "B-PER", "O"], ["O", "O"]])
    # [CLS] the b ##l ##a ##c ##k [SEP]: "film" has no piece left.
    assert split.first_pieces[0].tolist() == [1, 2, -1]
    assert (split.truncated_words, split.truncated_rows) == (1, 1)
    assert task.token_profile(split)["truncated_words"] == 1
    answers = task.tag(task.build_model(), [["film", "the", "blackburn", "film"]])
    assert all(entity["words"][1] <= 3 for entity in answers[0])  # the cut-off 4th word is in no entity


def biased_task(backbone: Path, favoured: dict[str, float]) -> tuple[TokenClassificationTask, torch.nn.Module]:
    """A tiny task whose head ignores the encoder and scores tags by bias alone, so every word gets the same
    tag probabilities and the decoding is known."""
    task = tiny_task(backbone, max_length=64)
    model = task.build_model().eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([favoured.get(tag, 0.0) for tag in task.tags]))
    return task, model


def test_span_offsets_point_into_the_original_string(tiny_backbone: Path):
    text = "Paris  and   Paris, then U.S.-based O'Neill's 1996-08-22 talks."
    words, offsets = split_words(text)
    assert words == [
        "Paris",
        "and",
        "Paris",
        ",",
        "then",
        "U.S.",
        "-",
        "based",
        "O'Neill",
        "'s",
        "1996-08-22",
        "talks",
        ".",
    ]
    assert [text[a:b] for a, b in offsets] == words
    # Every word its own entity (B-PER everywhere): each span is exactly one word, repeated words included.
    task, model = biased_task(tiny_backbone, {"B-PER": 5.0})
    entities = task.tag(model, [text])[0]
    assert [(e["start"], e["end"]) for e in entities] == offsets
    assert all(e["text"] == text[e["start"] : e["end"]] and e["entity"] == "PER" for e in entities)
    probability = torch.softmax(model.head.bias.detach(), 0)[task.tags.index("B-PER")]
    assert entities[0]["score"] == pytest.approx(float(probability))
    # I-PER likeliest everywhere: valid IOB2 needs a B-PER first, then one entity runs over the whole sentence.
    task, model = biased_task(tiny_backbone, {"I-PER": 5.0, "B-PER": 4.0})
    (entity,) = task.tag(model, [text])[0]
    assert (entity["start"], entity["end"], entity["text"]) == (0, len(text), text)
    # Pre-tokenised input: offsets into the words joined by single spaces.
    (entity,) = task.tag(model, [["EU", "rejects", "it"]])[0]
    assert (entity["text"], entity["start"], entity["end"], entity["words"]) == ("EU rejects it", 0, 13, [0, 3])
    assert task.tag(model, ["", "   "]) == [[], []]


def test_strict_iob2_scores_differ_from_the_lenient_default_on_a_stray_i_tag():
    from seqeval.metrics import f1_score

    true = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["I-PER", "I-PER", "O", "B-LOC"]]  # PER starts with I-: an entity only for the lenient scorer
    assert f1_score(true, predicted) == pytest.approx(1.0)
    strict = entity_metrics(true, predicted)
    assert strict["precision"] == pytest.approx(1.0) and strict["recall"] == pytest.approx(0.5)
    assert strict["f1"] == pytest.approx(2 / 3)
    assert strict["per_class"]["PER"]["f1"] == 0.0 and strict["per_class"]["LOC"]["f1"] == 1.0
    assert strict["accuracy"] == pytest.approx(0.75)
    assert tag_entities(["I-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER"]) == [("LOC", 3, 5)]


def test_decoding_never_predicts_an_i_tag_that_continues_nothing(tiny_backbone: Path):
    task = tiny_task(tiny_backbone)
    logits = np.zeros((3, len(TAGS)))
    logits[0, TAGS.index("O")] = 3.0
    logits[1, TAGS.index("I-PER")] = 3.0  # arg-max would give O I-PER: invalid after O
    logits[1, TAGS.index("B-PER")] = 2.0
    logits[2, TAGS.index("I-PER")] = 3.0
    tags, probabilities = task.decode(logits)
    assert tags == ["O", "B-PER", "I-PER"]
    assert probabilities.shape == (3,) and (probabilities > 0).all() and (probabilities < 1).all()


# --- reading tagged files -----------------------------------------------------------------------------------


def test_jsonl_and_conll_files_read_alike_and_iob1_starts_become_b_tags(tmp_path: Path):
    rows = [{"tokens": ["EU", "rejects", "German", "call"], "tags": ["I-ORG", "O", "I-MISC", "O"]}]
    jsonl, rewritten = read_tagged(write_jsonl(tmp_path / "a.jsonl", rows))
    conll = tmp_path / "a.conll"
    conll.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\ncall NN I-NP O\n"
    )
    from_columns, rewritten_columns = read_tagged(conll)
    assert jsonl["tags"] == from_columns["tags"] == [["B-ORG", "O", "B-MISC", "O"]]
    assert jsonl["tokens"] == from_columns["tokens"] and rewritten == rewritten_columns == 2
    assert from_columns["line"] == [3]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
            r"line 2: 2 words in column 'tokens' but 1 tags in column 'tags'",
        ),
        (
            "bad.jsonl",
            '{"tokens": ["a", "b"], "tags": ["O", "E-PER"]}\n',
            r"line 1, tag 2: column 'tags': tag 'E-PER' is not IOB2",
        ),
        ("bad.jsonl", '{"words": ["a"], "tags": ["O"]}\n', r"line 1: no column 'tokens' \(data.tokens\)"),
        ("bad.jsonl", '{"tokens": ["a", " "], "tags": ["O", "O"]}\n', r"line 1: column 'tokens': word 2 is empty"),
        ("bad.conll", "EU B-ORG\nrejects O\n\nGerman PER\n", r"line 4: the tag \(last\) column: tag 'PER' is not IOB2"),
        ("bad.conll", "EU B-ORG\nrejects\n", r"line 2: one column \('rejects'\)"),
        ("bad.txt", "EU B-ORG\n", r"cannot tell the format.*data.format"),
    ],
)
def test_bad_tagged_files_name_the_line_and_column(tmp_path: Path, name: str, content: str, message: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_tagged(path)


def config_for(train: Path, **changes) -> dict:
    config = {"name": "ner", "task": "token-classification", "data": {"train": str(train)}}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[section] = value
    return config


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"data.text_pair": "b"}, "data.text_pair"),
        ({"data.sensitive": ["x"]}, "data.sensitive"),
        ({"data.pii": {"redact": True}}, "data.pii.redact"),
        ({"audit": {}}, "audit"),
        ({"compress": {}}, "compress"),
        ({"model.backbone": "mlp"}, "model.backbone"),
        ({"model.tokenizer": "char"}, "model.tokenizer"),
        ({"data.tokens": "tags"}, "data.tokens and data.label"),
        ({"train.early_stopping": {"metric": "rmse"}}, "train.early_stopping.metric"),
        ({"data.format": "xml"}, "data.format"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, changes: dict, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(config_for(tmp_path / "train.jsonl", **changes))


def test_a_config_with_only_the_required_keys_gets_the_tagging_defaults(tmp_path: Path):
    config = load_config(config_for(tmp_path / "train.jsonl"))
    assert (config.data.tokens, config.data.label, config.model.backbone) == ("tokens", "tags", "minilm")
    assert config.family == "token-encoder" and config.train.lr == 1e-4 and config.train.warmup_ratio == 0.1
    assert config.train.early_stopping.metric == "f1"
    assert load_config(config_for(tmp_path / "t.jsonl", **{"data.label": "ner_tags"})).data.label == "ner_tags"


# --- runs with a tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conll_rows(shared_datasets: Path) -> dict[str, Path]:
    folder = shared_datasets / "ner"
    if not (folder / "train.jsonl").is_file():
        pytest.skip(f"CoNLL-2003 not found in {folder}")
    return {name: folder / f"{name}.jsonl" for name in ("train", "validation", "test")}


def test_a_tiny_run_on_real_conll_rows_round_trips_through_card_predict_and_evaluate(
    tiny_backbone: Path, conll_rows: dict[str, Path], tmp_path: Path
):
    config = {
        "name": "tiny_ner",
        "task": "token-classification",
        "data": {**{k: str(v) for k, v in conll_rows.items()}, "sample": {"train": 200, "validation": 60, "test": 60}},
        "model": {"backbone": str(tiny_backbone), "max_length": 64},
        "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 5},
    }
    result = forgeml.run(config, workspace=tmp_path)
    test = result.metrics["test"]
    assert set(test["per_class"]) == {"LOC", "MISC", "ORG", "PER"} and test["entities"] == sum(
        scores["support"] for scores in test["per_class"].values()
    )
    baseline = result.metrics["baselines"]["models"]["frequent_tag"]["metrics"]
    assert 0.0 < baseline["f1"] < 1.0 and result.metrics["baselines"]["split"] == "test"
    card = (result.run_dir / "card.md").read_text()
    assert "Per class (test)" in card and "Example predictions" in card and "most frequent tag per word" in card
    profile = json.loads((result.run_dir / "data_profile.json").read_text())
    assert profile["splits"]["train"]["rows"] == 200 and profile["tokens"]["test"]["truncated_words"] >= 0

    model = forgeml.load(result.run_dir)
    text = "Peter Blackburn met EU officials in Brussels."
    (answer,) = model.predict([text])
    assert all(text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1 for e in answer)
    sentences = tmp_path / "sentences.txt"
    sentences.write_text(f"{text}\n\nGerman call\n", encoding="utf-8")
    written = forgeml.api.predict(result.run_dir, sentences, tmp_path / "entities.jsonl")
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert [line["text"] for line in lines] == [text, "German call"] and lines[0]["entities"] == answer
    with pytest.raises(ForgeError, match=r"\.jsonl"):
        forgeml.api.predict(result.run_dir, sentences, tmp_path / "entities.csv")
    assert read_sentences(conll_rows["test"])[0] == json.loads(conll_rows["test"].read_text().split("\n")[0])["tokens"]
    # Re-evaluation scores every entity of a file (sentences short enough that no word is cut off).
    rows = [json.loads(line) for line in conll_rows["validation"].read_text().splitlines()]
    short = [row for row in rows if len(" ".join(row["tokens"])) <= 40][:50]
    scores = forgeml.api.evaluate(result.run_dir, write_jsonl(tmp_path / "short.jsonl", short))
    assert scores["entities"] == sum(tag.startswith("B-") for row in short for tag in row["tags"]) > 0
    from forgeml.serve.runtime import load_runtime

    for action, call in [
        ("serve", lambda: load_runtime(result.run_dir)),
        ("export", lambda: forgeml.api.export(result.run_dir)),
        ("explain", lambda: forgeml.api.explain(result.run_dir, [text])),
    ]:  # not built for taggers: each says so and points at predict
        with pytest.raises(ForgeError, match=f"{action} is not available for token-classification runs; tag"):
            call()


def synthetic_names(count: int, seed: int) -> list[dict]:
    """Sentences of filler words with one-token 'names': positive words are persons, negative words places."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(FILLER, rng.randint(3, 6))
        tags = ["O"] * len(words)
        for word, tag in ((rng.choice(POSITIVE), "B-PER"), (rng.choice(NEGATIVE), "B-LOC")):
            slot = rng.randint(0, len(words))
            words.insert(slot, word)
            tags.insert(slot, tag)
        rows.append({"tokens": words, "tags": tags})
    return rows


def test_the_pii_redactor_takes_person_names_from_a_token_classification_run(tiny_backbone: Path, tmp_path: Path):
    config = {
        "name": "names",
        "task": "token-classification",
        "data": {"train": str(write_jsonl(tmp_path / "names.jsonl", synthetic_names(400, 0))), "split": {"test": 0.1}},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "early_stopping": None},
    }
    result = forgeml.run(config, workspace=tmp_path)
    assert result.metrics["test"]["f1"] >= 0.9  # redaction by a tagger that has not learned means nothing
    texts = ["the film was great and the cast was awful", "a plot", ""]
    spans = find_names(texts, str(result.run_dir))
    assert spans == [[(13, 18)], [], []]  # "great" (a person here); "awful" is a place, not redacted
    redacted, counts = redact_texts(texts, None, "tag", spans)
    assert redacted[0] == "the film was [PERSON] and the cast was awful" and counts["PERSON"] == 1
    # As another run's data.pii.ner_model: its training texts lose the names before anything learns from them.
    reviews = text_classification(tiny_backbone, tmp_path)
    reviews["data"]["pii"] = {"redact": True, "ner_model": str(result.run_dir)}
    prepared = prepare(load_config(reviews))
    texts = [text for split in prepared.splits.values() if split is not None for text in split["text"]]
    assert any("[PERSON]" in text for text in texts) and not any(word in POSITIVE for t in texts for word in t.split())
    with pytest.raises(ValueError, match="not a token-classification"):
        find_names(texts, str(forgeml.run(text_classification(tiny_backbone, tmp_path), workspace=tmp_path).run_dir))


def text_classification(backbone: Path, folder: Path) -> dict:
    from conftest import sentiment_rows, write_csv

    return {
        "name": "sentiment",
        "task": "text-classification",
        "data": {"train": str(write_csv(folder / "reviews.csv", sentiment_rows(60))), "split": {"test": 0.2}},
        "model": {"backbone": str(backbone), "max_length": 16},
        "train": {"epochs": 1, "batch_size": 16},
    }


# --- the real backbone --------------------------------------------------------------------------------------


def test_minilm_learns_conll_entities_from_a_few_hundred_sentences(conll_rows: dict[str, Path], tmp_path: Path):
    config = {
        "name": "minilm_ner",
        "task": "token-classification",
        "data": {
            **{k: str(v) for k, v in conll_rows.items()},
            "sample": {"train": 300, "validation": 50, "test": 120},
        },
        "model": {"max_length": 64},
        "train": {"epochs": 2, "batch_size": 8, "lr": 2e-4, "early_stopping": None},
        "evaluate": {"baseline": False},
    }
    result = forgeml.run(config, workspace=tmp_path)
    test = result.metrics["test"]
    # Predicting O everywhere scores 0; the most-frequent-tag baseline ~0.3 on such a small training split.
    assert test["f1"] >= 0.5, test
    assert test["per_class"]["PER"]["f1"] >= 0.5, test["per_class"]
