"""language-modeling runs on tiny models: a GPT from scratch learns, its model folder is a plain Hugging Face
one, `forgeml generate` is seeded and refuses bad options, pre-trained Llama/Qwen2 folders continue training,
and corpora come from a text file, a folder of files or a table column."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

import forgeml
from forgeml.config import load_config
from forgeml.errors import ConfigError
from forgeml.models.tokenizers import char_tokenizer

from conftest import kill_at_checkpoint, resume_run, save_tiny_causal_lm, write_csv

SUBJECTS = ["the cat", "a dog", "the bird", "my fox"]
PLACES = ["on the mat", "in the hall", "by the door", "under a tree"]


def corpus(lines: int, seed: int = 0) -> str:
    """Short sentences with a fixed grammar: easy to learn, so a few steps show the model learning."""
    rng = random.Random(seed)
    return "".join(f"{rng.choice(SUBJECTS)} sat {rng.choice(PLACES)}.\n" for _ in range(lines))


def lm_config(train: Path, **train_options) -> dict:
    return {
        "name": "tiny_lm",
        "task": "language-modeling",
        "data": {"train": str(train), "split": {"validation": 0.1, "test": 0.0}},
        "model": {"architecture": {"n_layer": 2, "n_head": 2, "n_embd": 48, "context": 32}},
        "train": {"max_steps": 200, "batch_size": 16, "lr": 3e-3, "eval_every": 50, "threads": 1, **train_options},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> forgeml.RunResult:
    folder = tmp_path_factory.mktemp("lm")
    text = folder / "corpus.txt"
    text.write_text(corpus(1500), encoding="utf-8")
    return forgeml.run(lm_config(text), workspace=folder)


def test_a_char_gpt_learns_the_corpus_and_writes_a_hugging_face_model_folder(trained: forgeml.RunResult) -> None:
    validation = trained.metrics["validation"]
    log = [json.loads(line) for line in (trained.run_dir / "train.log").read_text().splitlines()]
    first_train = next(event for event in log if event["event"] == "train")
    first_eval = next(event for event in log if event["event"] == "eval")
    # 25 characters: a model that learnt nothing scores ln(25) = 3.2; the grammar's own entropy is ~0.12 nats a
    # character (4 x 4 choices per ~23-character sentence).
    assert first_train["loss"] > 2.5 and validation["loss"] < 0.5 and validation["loss"] < first_eval["loss"]
    assert validation["perplexity"] == pytest.approx(torch.tensor(validation["loss"]).exp().item(), rel=1e-6)
    assert validation["bits_per_character"] == pytest.approx(validation["loss"] / 0.693147, rel=1e-4)

    folder = trained.run_dir / "model"
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # no forgeml code needed
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("the cat sat on")["input_ids"]])
    ours = forgeml.load(trained.run_dir)
    assert torch.allclose(plain(ids).logits, ours.model.lm(ids).logits, atol=1e-6)
    assert ours.generate("the cat sat ", max_new_tokens=12, temperature=0).startswith(("on", "in", "by", "under"))

    profile = json.loads((trained.run_dir / "data_profile.json").read_text())
    assert profile["splits"]["validation"]["documents"] == 1
    assert profile["tokens"]["train"]["blocks"] > 0 and profile["unknown_token_share"]["train"] == 0.0
    samples = [json.loads(line) for line in (trained.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(sample["seed"] == 42 for sample in samples)
    card = (trained.run_dir / "card.md").read_text()
    for expected in ("Sample generations", "Parameters", "perplexity", "Text per split", "n_layer=2"):
        assert expected in card, expected
    assert "Pooling" not in card and "Label" not in card


def test_forgeml_generate_is_seeded_and_refuses_bad_options(
    trained: forgeml.RunResult, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from test_encryption import cli_in_process

    run = str(trained.run_dir)
    sample = ("generate", run, "the ", "--max-new-tokens", "60", "--temperature", "1.0")
    first = cli_in_process(monkeypatch, capsys, *sample, "--seed", "3")
    again = cli_in_process(monkeypatch, capsys, *sample, "--seed", "3")
    other = cli_in_process(monkeypatch, capsys, *sample, "--seed", "4")
    assert first[0] == again[0] == 0 and first[1] == again[1] and first[1].startswith("the ")
    assert other[1] != first[1]
    two = cli_in_process(monkeypatch, capsys, *sample, "--seed", "3", "--num-samples", "2")
    assert two[1].count("--- sample") == 2 and first[1].strip() in two[1]  # sample 1 uses seed 3

    for options, named in (
        (("--temperature", "-1"), "temperature"),
        (("--top-p", "0"), "top_p"),
        (("--top-p", "1.5"), "top_p"),
        (("--top-k", "-2"), "top_k"),
        (("--max-new-tokens", "0"), "max_new_tokens"),
        (("--repetition-penalty", "0"), "repetition_penalty"),
        (("--truncate", "right"), "truncate"),
    ):
        code, output = cli_in_process(monkeypatch, capsys, "generate", run, "the ", *options)
        assert code == 2 and named in output and "Traceback" not in output, (options, output)
    code, output = cli_in_process(monkeypatch, capsys, "generate", run, "")
    assert code == 2 and "prompt" in output
    code, output = cli_in_process(monkeypatch, capsys, "generate", run, "the " * 40, "--max-new-tokens", "5")
    assert code == 2 and "context of 32 tokens" in output
    code, output = cli_in_process(monkeypatch, capsys, "generate", run, "the " * 40, "--truncate", "left")
    assert code == 0


def test_evaluate_gives_the_perplexity_of_a_text_file_and_predict_points_to_generate(
    trained: forgeml.RunResult, tmp_path: Path
) -> None:
    seen, unseen = tmp_path / "seen.txt", tmp_path / "unseen.txt"
    seen.write_text(corpus(40, seed=9), encoding="utf-8")
    unseen.write_text("zzq xxv qqz vvx " * 20, encoding="utf-8")  # letters the grammar never puts together
    from forgeml import api  # `forgeml.evaluate` is also the name of a subpackage

    on_seen, on_unseen = api.evaluate(trained.run_dir, seen), api.evaluate(trained.run_dir, unseen)
    assert on_seen["perplexity"] < 2.0 < on_unseen["perplexity"] and on_seen["tokens"] == len(seen.read_text()) - 1
    with pytest.raises(forgeml.ForgeError, match="forgeml generate"):
        api.predict(trained.run_dir, seen, tmp_path / "out.csv")


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_a_saved_pretrained_causal_lm_continues_training_with_its_own_tokenizer(style: str, tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(400), encoding="utf-8")
    tokenizer = char_tokenizer([text.read_text()])
    backbone = tmp_path / style
    model = save_tiny_causal_lm(style, tokenizer, backbone)

    config = lm_config(text, max_steps=40, eval_every=20, lr=3e-3)
    config["model"] = {"backbone": str(backbone), "max_length": 24}
    result = forgeml.run(config, workspace=tmp_path / "ws")
    assert load_config(result.run_dir / "config.yaml").family == "causal-lm"
    log = [json.loads(line) for line in (result.run_dir / "train.log").read_text().splitlines()]
    losses = [event["loss"] for event in log if event["event"] == "eval"]
    assert losses[-1] < losses[0] and "bits_per_character" not in result.metrics["validation"]
    reloaded = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    assert type(reloaded).__name__ == type(model).__name__
    assert isinstance(forgeml.load(result.run_dir).generate("the ", max_new_tokens=8, seed=1), str)


def test_corpora_from_a_folder_of_files_and_a_table_column_hold_out_whole_documents(tmp_path: Path) -> None:
    from forgeml.data.corpus import prepare_corpus

    folder = tmp_path / "docs"
    folder.mkdir()
    documents = [corpus(20, seed) for seed in range(20)]
    for index, document in enumerate(documents):
        (folder / f"{index:02d}.txt").write_text(document, encoding="utf-8")
    table = write_csv(tmp_path / "docs.csv", [{"body": document} for document in documents])
    for source, text_column in ((folder, "text"), (table, "body")):
        config = load_config({**lm_config(source), "data": {"train": str(source), "text": text_column}})
        data = prepare_corpus(config)
        held_out = [*data.splits["validation"]["text"], *data.splits["test"]["text"]]
        assert sorted([*data.splits["train"]["text"], *held_out]) == sorted(documents)  # none cut in two
        assert len(data.splits["validation"]) == len(data.splits["test"]) == 2
    (folder / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(forgeml.ForgeError, match=r"bad\.txt: not UTF-8"):
        prepare_corpus(load_config(lm_config(folder)))


def test_a_bpe_tokenizer_is_trained_on_the_training_split_only(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(600) + "zebra quagga okapi\n" * 30, encoding="utf-8")  # the tail is held out
    config = lm_config(text, max_steps=20, eval_every=10)
    config["model"] = {"tokenizer": "bpe", "vocab_size": 300, "architecture": {**config["model"]["architecture"]}}
    result = forgeml.run(config, workspace=tmp_path / "ws")
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    assert len(tokenizer) <= 300 and "bits_per_character" not in result.metrics["validation"]
    # Merges come from the training text: its words are single tokens, the held-out tail's are not.
    assert len(tokenizer("the cat sat")["input_ids"]) < len(tokenizer("zebra quagga")["input_ids"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model": {"backbone": "minilm"}}, "model.backbone"),
        ({"model": {"architecture": {"n_embd": 50, "n_head": 4}}}, "model.architecture.n_embd"),
        ({"model": {"architecture": {"layers": 2}}}, "model.architecture"),
        ({"model": {"tokenizer": "char", "vocab_size": 500}}, "model.vocab_size"),
        ({"audit": {}}, "audit"),
        ({"data": {"sample": {"train": 10}}}, "data.sample"),
        ({"train": {"early_stopping": {"metric": "accuracy"}}}, "train.early_stopping.metric"),
    ],
)
def test_language_modeling_config_errors_name_the_key(change: dict, named: str, tmp_path: Path) -> None:
    config = {"name": "lm", "task": "language-modeling", "data": {"train": str(tmp_path / "c.txt")}}
    for section, values in change.items():
        config[section] = {**config.get(section, {}), **values}
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(yaml.safe_load(yaml.safe_dump(config)))


def test_a_language_model_killed_mid_training_resumes_to_the_same_result(tmp_path: Path) -> None:
    # ~1,000 blocks of 32 characters, batch 16 -> 63 steps an epoch; killed in epoch 1, resumed into epoch 2.
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(1500), encoding="utf-8")
    config = lm_config(text, max_steps=120, eval_every=40, checkpoint_every=10)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    reference = forgeml.run(config, workspace=tmp_path / "reference")

    run_dir = kill_at_checkpoint(config_path, tmp_path / "killed", "runs/tiny_lm/*/checkpoints/step-00000050")
    assert not (run_dir / "metrics.json").exists()

    resume_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validation"] == reference.metrics["validation"]
    assert metrics["training"]["steps"] == reference.metrics["training"]["steps"] == 120
    assert (run_dir / "samples.jsonl").read_text() == (reference.run_dir / "samples.jsonl").read_text()


def test_the_memorization_audit_inserts_canaries_and_reports_exposure(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(1500), encoding="utf-8")
    config = lm_config(text)
    canaries = {"count": 2, "repetitions": [1, 20], "candidates": 200, "prefix": "pin ", "digits": 6}
    config["audit"] = {"memorization": {"canaries": canaries}}
    result = forgeml.run(config, workspace=tmp_path)
    profile = json.loads((result.run_dir / "data_profile.json").read_text())
    canaries = profile["canaries"]
    assert len(canaries) == 4 and sorted({c["repetitions"] for c in canaries}) == [1, 20]
    report = json.loads((result.run_dir / "trust" / "memorization.json").read_text())
    exposure = {row["repetitions"]: row["mean_exposure"] for row in report["canaries"]["table"]}
    assert exposure[20] > exposure[1]  # twenty copies are memorised more than one
    headline = result.metrics["audit"]
    assert set(headline["canary_exposure_bits"]) == {"1", "20"} and 0 <= headline["membership_auc"] <= 1
    card = (result.run_dir / "card.md").read_text()
    assert "Canary exposure (bits) by repetition count" in card
    assert (result.run_dir / "trust" / "memorization_exposure.png").is_file()


def test_memorization_audit_settings_are_checked(tmp_path: Path) -> None:
    base = {"task": "language-modeling", "data": {"train": "x.txt"}}
    with pytest.raises(ConfigError, match=r"audit\.memorization\.canaries"):
        load_config({**base, "audit": {"memorization": {"canaries": {"colour": 1}}}})
    with pytest.raises(ConfigError, match=r"audit\.memorization\.canaries: a canary is 37 characters"):
        load_config({**base, "audit": {"memorization": {}}, "model": {"architecture": {"context": 32}}})
    with pytest.raises(ConfigError, match=r"audit\.fairness"):
        load_config({**base, "audit": {"memorization": {}, "fairness": {"bins": 3}}})
    with pytest.raises(ConfigError, match=r"audit\.memorization: is for task 'language-modeling'"):
        load_config({"task": "text-classification", "data": {"train": "x.csv"}, "audit": {"memorization": {}}})


def test_eval_batches_score_a_fixed_subset_while_training_and_the_whole_split_at_the_end(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(1500), encoding="utf-8")
    config = lm_config(text, max_steps=60, eval_every=20, eval_batches=1, eval_batch_size=4)
    result = forgeml.run(config, workspace=tmp_path)
    log = [json.loads(line) for line in (result.run_dir / "train.log").read_text().splitlines()]
    evaluations = [event for event in log if event["event"] == "eval"]
    assert len(evaluations) == 3 and {event["tokens"] for event in evaluations} == {4 * 32}  # 4 blocks of 32
    assert result.metrics["validation"]["tokens"] > 4 * 32  # the report scores every block


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="torch.compile needs a C++ compiler"
)
def test_train_compile_learns_the_same_as_eager(tmp_path: Path) -> None:
    """torch.compile of the training step (fixed-shape blocks) reaches the eager loop's loss; evaluation stays eager."""
    text = tmp_path / "corpus.txt"
    text.write_text(corpus(600), encoding="utf-8")
    results = {
        compiled: forgeml.run(
            lm_config(text, max_steps=30, eval_every=30, compile=compiled), workspace=tmp_path / str(compiled)
        )
        for compiled in (False, True)
    }
    eager, compiled = results[False].metrics["validation"]["loss"], results[True].metrics["validation"]["loss"]
    assert compiled == pytest.approx(eager, abs=1e-3)
    assert compiled < 2.5  # it learnt: 25 characters alone would be ln(25) = 3.2
