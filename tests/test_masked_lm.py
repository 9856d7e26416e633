"""masked-lm on tiny random-initialised BERTs: BERT's masking (rates, 80/10/10, whole words, special tokens),
fixed evaluation masks against dynamic training masks, chunking of long documents, training with the real
loop, a saved folder that plain transformers loads, corpus-trained encoder tokenizers, and clear errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModel, AutoTokenizer, DataCollatorForLanguageModeling

import forgeml
from forgeml.api import evaluate
from forgeml.config import TrainConfig, load_config
from forgeml.errors import ConfigError, ForgeError
from forgeml.evaluate.outputs import model_outputs
from forgeml.models.hf import TextModel
from forgeml.models.tokenizers import encoder_tokenizer, wordpiece_tokenizer
from forgeml.tasks.masked_lm import IGNORE_INDEX, MaskedLanguageModelingTask, mask_tokens, word_ids, word_spans
from forgeml.train.loop import train

from conftest import write_csv

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def sentences(shared_datasets: Path) -> list[str]:
    path = shared_datasets / "sst2" / "train.csv"
    if not path.is_file():
        pytest.skip(f"SST-2 not found at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row, _ in zip(csv.DictReader(handle), range(700), strict=False)]


def tiny_task(texts: list[str], max_length: int = 32, **options) -> MaskedLanguageModelingTask:
    model = {"backbone": "bert", "architecture": TINY, "vocab_size": 500, **options}
    task = MaskedLanguageModelingTask(model, max_length, seed=0)
    task.fit(Dataset.from_dict({"text": texts}))
    return task


def train_config(**changes) -> TrainConfig:
    """The loop's settings for these tests: every family-default key given (no ForgeConfig fills them in)."""
    settings = {
        "lr": 3e-3,
        "batch_size": 32,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
        "early_stopping": None,
        "threads": 1,
        "seed": 0,
    }
    return TrainConfig(**settings | changes)


def rows(split, count: int | None = None):
    return split.batch(list(range(len(split) if count is None else count)))


# --- masking ------------------------------------------------------------------------------------


def random_batch(rows: int = 2000, width: int = 64, vocabulary: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] tokens [SEP] [PAD]...: ids 0-4 are the special tokens, rows of random lengths."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocabulary, (rows, width), generator=generator)
    lengths = torch.randint(3, width + 1, (rows,), generator=generator)
    positions = torch.arange(width)[None, :]
    ids[:, 0] = 2
    ids[positions == (lengths[:, None] - 1)] = 3
    ids[positions >= lengths[:, None]] = 0
    return ids, ~torch.isin(ids, torch.arange(5))


def test_bert_masking_rates_and_the_80_10_10_split():
    ids, maskable = random_batch()
    masked, labels = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    assert not chosen[~maskable].any()  # never [CLS], [SEP] or padding
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])  # the label is the original token
    assert chosen.sum() / maskable.sum() == pytest.approx(0.15, abs=0.005)  # ~70k maskable tokens
    share = lambda selected: float(selected.sum() / chosen.sum())  # noqa: E731
    assert share(masked[chosen] == 4) == pytest.approx(0.8, abs=0.01)
    assert share(masked[chosen] == ids[chosen]) == pytest.approx(0.1 + 0.1 / 1000, abs=0.01)  # kept (or drawn)
    assert share((masked[chosen] != 4) & (masked[chosen] != ids[chosen])) == pytest.approx(0.1, abs=0.01)


def test_token_masking_draws_exactly_as_the_transformers_collator():
    texts = ["the cat sat on the mat", "a dog ran far away"] * 20
    tokenizer = wordpiece_tokenizer(texts, 60)
    ids, maskable = random_batch(rows=64, width=20, vocabulary=len(tokenizer))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    collator.generator = torch.Generator().manual_seed(7)  # what the collator's own `seed` option sets up
    expected = collator.torch_mask_tokens(ids.clone(), special_tokens_mask=(~maskable).long())
    ours = mask_tokens(ids, maskable, 0.15, tokenizer.mask_token_id, len(tokenizer), torch.Generator().manual_seed(7))
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(sentences: list[str]):
    task = tiny_task(sentences[:400], whole_word_mask=True)
    split = task.encode(Dataset.from_dict({"text": sentences[400:700]}), "validation")
    inputs, _ = rows(split)
    words, chosen = inputs["word_ids"], inputs["eval_labels"] != IGNORE_INDEX
    pieces = 0
    for row in range(len(words)):
        for word in words[row].unique().tolist():
            if word < 0:
                continue
            members = chosen[row][words[row] == word]
            pieces += len(members) > 1
            assert members.all() or not members.any()  # a word is masked whole or not at all
    assert pieces > 100  # many words are several pieces long: the check above means something
    maskable = words >= 0
    assert not chosen[~maskable].any()
    assert chosen.sum() / maskable.sum() == pytest.approx(0.15, abs=0.03)  # a word chosen with 15 %: 15 % of tokens

    model = task.build_model().train()  # training masks whole words too
    torch.manual_seed(0)
    _, labels = model.draw_masks(inputs["input_ids"], inputs["attention_mask"], words)
    for row in range(len(words)):
        for word in words[row][words[row] >= 0].unique().tolist():
            members = (labels[row] != IGNORE_INDEX)[words[row] == word]
            assert members.all() or not members.any()


@pytest.mark.parametrize(
    ("kind", "vocab_size", "text", "expected"),
    [
        # WordPiece drops spaces and splits punctuation off; "##" pieces join their word.
        ("wordpiece", 200, "unbelievably good, film", None),
        # Byte-level "Ġgood" spans the space before it; "Ġ" alone (the second space) is a word of its own.
        ("bpe", 300, "the cat  sat", None),
        # Characters: a space is a token and a word of its own.
        ("char", None, "ab c", [0, 0, 1, 2]),
    ],
)
def test_words_are_the_whitespace_separated_words_for_every_tokenizer(kind, vocab_size, text, expected):
    corpus = ["the cat sat on the mat, unbelievably good film", "a good film about the cat  sat"] * 30
    tokenizer = encoder_tokenizer(kind, corpus, vocab_size)
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"])
    offsets = np.asarray(encoded["offset_mapping"])
    maskable = ~np.isin(ids, tokenizer.all_special_ids)
    numbers = word_ids(word_spans(text), offsets, maskable)
    assert (numbers[~maskable] == -1).all()
    if expected is not None:
        assert numbers[maskable].tolist() == expected
    for number in set(numbers[maskable].tolist()):  # each word's pieces rebuild one whitespace word
        spans = offsets[numbers == number]
        piece = text[spans[:, 0].min() : spans[:, 1].max()].strip()
        assert piece in text.split() or piece == ""


# --- evaluation vs training masks -------------------------------------------------------------------


def test_evaluation_masks_are_fixed_and_training_masks_are_new_each_pass(sentences: list[str]):
    task = tiny_task(sentences[:300])
    validation = Dataset.from_dict({"text": sentences[300:400]})
    generator_state = torch.get_rng_state()
    first, second = task.encode(validation, "validation"), task.encode(validation, "validation")
    assert torch.equal(torch.get_rng_state(), generator_state)  # encoding leaves the global generator alone
    assert np.array_equal(first.eval_ids, second.eval_ids) and np.array_equal(first.eval_labels, second.eval_labels)
    assert (first.eval_labels != IGNORE_INDEX).sum() > 0

    torch.manual_seed(0)
    model = task.build_model()
    outputs_a, targets_a = model_outputs(model, first, batch_size=16)
    outputs_b, _ = model_outputs(model, first, batch_size=7)  # other batches, same masks and scores
    assert np.allclose(outputs_a, outputs_b, atol=1e-4)
    assert np.array_equal(outputs_a[:, 1], targets_a)  # targets count the fixed mask's tokens

    inputs, _ = rows(first, 64)
    model.train()
    one = model.draw_masks(inputs["input_ids"], inputs["attention_mask"])
    two = model.draw_masks(inputs["input_ids"], inputs["attention_mask"])
    assert not torch.equal(one[1], two[1])  # a new mask each time a row is seen
    torch.manual_seed(123)
    again = model.draw_masks(inputs["input_ids"], inputs["attention_mask"])
    torch.manual_seed(123)
    assert torch.equal(again[0], model.draw_masks(inputs["input_ids"], inputs["attention_mask"])[0])
    with torch.no_grad():  # training mode scores its own mask, not the fixed one
        torch.manual_seed(123)
        trained = model(**inputs)
    assert torch.equal(trained[:, 1], (again[1] != IGNORE_INDEX).sum(dim=1).float())


def test_loss_at_masked_positions_only_equals_the_full_models_loss(sentences: list[str]):
    task = tiny_task(sentences[:300])
    inputs, _ = rows(task.encode(Dataset.from_dict({"text": sentences[300:340]}), "validation"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        ours = model(**inputs)
        full = model.lm(input_ids=inputs["eval_input_ids"], attention_mask=inputs["attention_mask"])
        reference = model.lm(
            input_ids=inputs["eval_input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["eval_labels"]
        ).loss
    assert float(ours[:, 0].sum() / ours[:, 1].sum()) == pytest.approx(float(reference), rel=1e-5)
    assert full.logits.shape[-1] == len(task.tokenizer)
    assert model.training_flops([0, 1], 32) == 2 * model.training_flops([0], 32) > 0


def test_long_documents_are_cut_into_chunks_with_their_own_cls_and_sep(sentences: list[str]):
    task = tiny_task(sentences[:300], max_length=16)
    document = " ".join(sentences[300:310])
    split = task.encode(Dataset.from_dict({"text": [document, "a short one", ""]}), "validation")
    content = task.tokenizer(document, add_special_tokens=False)["input_ids"]
    chunks = [split.ids[split.offsets[i] : split.offsets[i + 1]] for i in range(len(split))]
    cls, sep = task.tokenizer.cls_token_id, task.tokenizer.sep_token_id
    assert all(len(chunk) <= 16 and chunk[0] == cls and chunk[-1] == sep for chunk in chunks)
    assert [token for chunk in chunks[:-1] for token in chunk[1:-1]] == content  # consecutive, nothing lost
    assert split.lengths.tolist() == [len(chunk) for chunk in chunks]
    profile = task.token_profile(split)
    assert profile["chunks"] == len(split) == math.ceil(len(content) / 14) + 1  # the empty row is dropped
    assert (profile["documents"], profile["chunked_documents"]) == (2, 1)
    short = task.tokenizer("a short one", add_special_tokens=False)["input_ids"]
    assert profile["tokens"] == len(content) + len(short)
    assert profile["masked_tokens"] == (split.eval_labels != IGNORE_INDEX).sum() > 0
    assert 0.0 <= task.unknown_token_share(split) < 0.05


# --- training, saving, loading ---------------------------------------------------------------------


def test_training_with_the_loop_lowers_validation_loss_and_the_folder_loads_anywhere(
    sentences: list[str], tmp_path: Path
):
    task = tiny_task(sentences[:600])
    train_split = task.encode(Dataset.from_dict({"text": sentences[:600]}), "train")
    validation = task.encode(Dataset.from_dict({"text": sentences[600:700]}), "validation")
    torch.manual_seed(0)
    model = task.build_model()
    before = task.metrics(*model_outputs(model, validation))
    config = train_config(epochs=4, scheduler="constant")
    result = train(task, model, train_split, validation, config)
    after = task.metrics(*model_outputs(model, validation, device=next(model.parameters()).device))
    # A new model knows nothing (~ln 500 = 6.2 nats); 600 sentences teach a tiny one at least how often each
    # token comes: it ends near the cross-entropy of the training split's token frequencies (~5.6 nats).
    assert before["loss"] > math.log(len(task.tokenizer)) - 0.5
    assert after["loss"] < before["loss"] - 0.4
    assert after["loss"] < unigram_loss(train_split, validation, task.tokenizer.all_special_ids) + 0.15
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert after["loss"] == pytest.approx(result.best_metric, rel=1e-5)
    assert result.mfu > 0

    folder = tmp_path / "model"
    task.save(folder, model)
    encoder = AutoModel.from_pretrained(folder)  # plain transformers, no forgeml code
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(["a good film", "a bad one"], padding=True, return_tensors="pt")
    assert encoded["input_ids"][0, 0] == tokenizer.cls_token_id and tokenizer.mask_token == "[MASK]"
    assert encoder(**encoded).last_hidden_state.shape[-1] == TINY["n_embd"]
    classifier = TextModel.from_pretrained(str(folder), num_outputs=2)  # as a text task's backbone
    assert classifier(encoded["input_ids"], encoded["attention_mask"]).shape == (2, 2)

    from forgeml.workspace import read_json

    loaded_task, loaded = MaskedLanguageModelingTask.load(folder, read_json(folder / "task.json"))
    again = loaded_task.encode(Dataset.from_dict({"text": sentences[600:700]}), "validation")
    assert np.array_equal(again.eval_ids, validation.eval_ids)  # same tokenizer, same seed: same masks
    assert loaded_task.metrics(*model_outputs(loaded, again)) == pytest.approx(after, rel=1e-5)


def test_a_resumed_run_draws_the_same_training_masks_as_an_uninterrupted_one(sentences: list[str], tmp_path: Path):
    task = tiny_task(sentences[:300])
    train_split = task.encode(Dataset.from_dict({"text": sentences[:300]}), "train")  # 12 batches an epoch
    validation = task.encode(Dataset.from_dict({"text": sentences[600:700]}), "validation")
    config = train_config(epochs=2, scheduler="linear", checkpoint_every=5, keep_checkpoints=100)
    torch.manual_seed(0)
    reference = train(task, task.build_model(), train_split, validation, config, checkpoints=tmp_path / "reference")
    # As if killed after step 5 of epoch 1: only that checkpoint exists; the rest replays from it.
    shutil.copytree(tmp_path / "reference" / "step-00000005", tmp_path / "killed" / "step-00000005")
    resumed = train(task, task.build_model(), train_split, validation, config, tmp_path / "killed", resume=True)
    evaluations = lambda result: [e["loss"] for e in result.history if e["event"] == "eval"]  # noqa: E731
    assert len(evaluations(reference)) == 2
    assert evaluations(resumed) == evaluations(reference)  # exactly: same masks, same dropout, same steps


def unigram_loss(train_split, validation, special_ids: list[int]) -> float:
    """Cross-entropy of the validation split's masked tokens under the training split's token frequencies."""
    tokens = train_split.ids[~np.isin(train_split.ids, special_ids)]
    counts = np.bincount(tokens, minlength=int(validation.eval_labels.max()) + 1) + 0.5  # add-half smoothing
    labels = validation.eval_labels[validation.eval_labels != IGNORE_INDEX]
    return float(-np.log(counts[labels] / counts.sum()).mean())


# --- tokenizers -----------------------------------------------------------------------------------


def test_wordpiece_learns_only_its_text_has_bert_special_tokens_and_round_trips(tmp_path: Path):
    corpus = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    tokenizer = wordpiece_tokenizer(corpus, vocab_size=80)
    vocabulary = tokenizer.get_vocab()
    assert len(vocabulary) <= 80
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(5)] == SPECIALS
    assert {"cat", "dog", "the"} <= set(vocabulary) and "zebra" not in vocabulary
    assert not {"z", "q", "##z", "##q"} & set(vocabulary)  # letters it never saw have no token
    assert tokenizer.tokenize("The CAT sat") == ["the", "cat", "sat"]  # BERT uncased
    assert tokenizer.tokenize("zq") == ["[UNK]"]  # no piece spells a word of unseen letters
    encoded = tokenizer("the cat", "a dog")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == [
        "[CLS]", "the", "cat", "[SEP]", "a", "dog", "[SEP]"
    ]  # fmt: skip
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == "the cat a dog"

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("the cat sat on a log")["input_ids"] == tokenizer("the cat sat on a log")["input_ids"]
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.mask_token_id) == (0, 1, 4)


def test_wordpiece_training_is_deterministic(sentences: list[str]):
    # tokenizers' own WordPiece trainer gives a different vocabulary from call to call on this text.
    vocabularies = [wordpiece_tokenizer(sentences[:300], 600).get_vocab() for _ in range(4)]
    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)


@pytest.mark.parametrize(("kind", "vocab_size"), [("bpe", 300), ("char", None)])
def test_bpe_and_char_encoder_tokenizers_have_bert_special_tokens(kind: str, vocab_size: int | None):
    corpus = ["the cat sat on the mat", "a dog ran"] * 30
    tokenizer = encoder_tokenizer(kind, corpus, vocab_size)
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(5)] == SPECIALS
    ids = tokenizer("the cat")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat"


def test_encoder_tokenizer_settings_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.tokenizer.*'wordpiece', 'bpe', 'char'"):
        encoder_tokenizer("sentencepiece", ["abc"], 100)
    with pytest.raises(ConfigError, match=r"model\.vocab_size.*>= 261"):
        encoder_tokenizer("bpe", ["abc"], 100)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        encoder_tokenizer("char", ["abc"], 100)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        encoder_tokenizer("wordpiece", ["abc"], None)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"n_embd": 31}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
        ({"context": 16}, "context"),  # shorter than max_length 32
        ({"intermediate_size": "wide"}, "intermediate_size"),
        ({"block_size": 8}, "block_size"),
    ],
)
def test_bad_architecture_is_a_config_error_naming_the_key(change: dict, key: str):
    with pytest.raises(ConfigError, match=rf"model\.architecture.*{key}"):
        MaskedLanguageModelingTask({"backbone": "bert", "architecture": {**TINY, **change}}, 32)


def test_missing_architecture_key_and_bad_options_name_the_setting():
    with pytest.raises(ConfigError, match=r"model\.architecture\.n_head is required"):
        MaskedLanguageModelingTask({"backbone": "bert", "architecture": {"n_layer": 2, "n_embd": 32}}, 32)
    bad = [
        ({"backbone": "bert", "mask_probability": 1.5}, r"model\.mask_probability"),
        ({"backbone": "bert", "whole_word_mask": "yes"}, r"model\.whole_word_mask"),
        ({"backbone": "bert", "tokenizer": "backbone"}, r"model\.tokenizer"),
        ({"backbone": "minilm", "architecture": TINY}, r"model\.architecture"),
        ({"backbone": "minilm", "tokenizer": "wordpiece"}, r"model\.tokenizer"),
        ({"backbone": "minilm", "vocab_size": 1000}, r"model\.vocab_size"),
        ({"backbone": "minilm", "style": "gpt2"}, r"style"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            MaskedLanguageModelingTask(options, 32)
    with pytest.raises(ConfigError, match=r"model\.max_length"):
        MaskedLanguageModelingTask({"backbone": "bert"}, 2)


def test_a_masked_lm_predicts_nothing_itself():
    task = tiny_task(["the cat sat on the mat"] * 10, vocab_size=None, tokenizer="char")
    assert len(task.tokenizer) == 5 + len(set("the cat sat on the mat"))
    with pytest.raises(ForgeError, match=r"model\.backbone"):
        task.predictions(np.zeros((1, 2)))


# --- the bundled MiniLM -----------------------------------------------------------------------------


@pytest.mark.integration
def test_minilm_builds_as_a_masked_lm_with_a_finite_validation_perplexity(sentences: list[str]):
    task = MaskedLanguageModelingTask({"backbone": "minilm"}, 64)
    task.fit(Dataset.from_dict({"text": sentences[:64]}))  # keeps MiniLM's own tokenizer
    split = task.encode(Dataset.from_dict({"text": sentences[:64]}), "validation")
    torch.manual_seed(0)
    model = task.build_model()
    assert model.lm.config.vocab_size == len(task.tokenizer) == 30522
    metrics = task.metrics(*model_outputs(model, split, batch_size=32))
    assert metrics["tokens"] > 50 and math.isfinite(metrics["perplexity"])
    assert task.state()["model"] == {
        "backbone": "minilm",
        "architecture": None,
        "tokenizer": "backbone",
        "vocab_size": None,
        "mask_probability": 0.15,
        "whole_word_mask": False,
    }
    with pytest.raises(ConfigError, match=r"model\.max_length \(600\).*512"):
        MaskedLanguageModelingTask({"backbone": "minilm"}, 600).build_model()


# --- whole runs: pre-train an encoder, then fine-tune a classifier from its run directory -------------------


@pytest.fixture(scope="module")
def pretrained_run(sentences: list[str], tmp_path_factory: pytest.TempPathFactory) -> forgeml.RunResult:
    folder = tmp_path_factory.mktemp("mlm_run")
    documents = folder / "documents.csv"
    write_csv(documents, [{"text": text} for text in sentences[:300]])
    config = {
        "name": "tiny_mlm",
        "task": "masked-lm",
        "data": {"train": str(documents), "split": {"validation": 0.2, "test": 0.0}, "whole_word_mask": True},
        "model": {"backbone": "bert", "architecture": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "vocab_size": 400},
        "train": {"epochs": 3, "batch_size": 16, "lr": 2e-3, "threads": 1},
    }
    return forgeml.run(config, workspace=folder)


def test_a_masked_lm_run_pretrains_a_backbone_for_a_text_classifier(
    pretrained_run: forgeml.RunResult, sentences: list[str], tmp_path: Path
):
    log = [json.loads(line) for line in (pretrained_run.run_dir / "train.log").read_text().splitlines()]
    losses = [event["loss"] for event in log if event["event"] == "eval"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    profile = json.loads((pretrained_run.run_dir / "data_profile.json").read_text())
    assert profile["tokens"]["train"]["documents"] == 240 and profile["tokens"]["train"]["masked_tokens"] > 0
    assert "masked (evaluation)" in (pretrained_run.run_dir / "card.md").read_text()
    labelled = write_csv(
        tmp_path / "labelled.csv",
        [{"text": text, "label": "long" if len(text.split()) > 8 else "short"} for text in sentences[:200]],
    )
    classifier = {
        "name": "from_mlm",
        "task": "text-classification",
        "data": {"train": str(labelled), "split": {"validation": 0.2, "test": 0.2}},
        "model": {"backbone": str(pretrained_run.run_dir), "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "threads": 1},
        "evaluate": {"baseline": False},
    }
    result = forgeml.run(classifier, workspace=tmp_path)  # a run directory is a backbone
    assert result.metrics["test"]["accuracy"] > 0


def test_a_masked_lm_run_evaluates_files_and_refuses_to_predict(
    pretrained_run: forgeml.RunResult, sentences: list[str], tmp_path: Path
):
    held_out = write_csv(tmp_path / "held_out.csv", [{"text": text} for text in sentences[600:700]])
    scores = evaluate(pretrained_run.run_dir, held_out)
    assert scores["tokens"] > 0 and np.isfinite(scores["perplexity"])
    with pytest.raises(ForgeError, match="pre-trained encoder, not a predictor"):
        forgeml.load(pretrained_run.run_dir).predict(["a film"])
    with pytest.raises(ConfigError, match="masked-lm"):
        load_config({"task": "masked-lm", "data": {"train": "x.txt"}, "model": {"backbone": "gpt"}})
    with pytest.raises(ConfigError, match=r"model\.lora"):
        load_config({"task": "masked-lm", "data": {"train": "x.txt"}, "model": {"lora": {}}})
