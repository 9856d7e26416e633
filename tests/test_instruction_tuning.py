"""instruction-tuning on tiny models: only response tokens are learnt, every response ends with the end-of-
sequence token, chat templates (the tokenizer's or the built-in one) render turn by turn, packing keeps
examples apart, LoRA adapters merge into a model that answers exactly like the adapter model, and a whole
run learns a toy sentiment task well enough to answer it with generated labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

import forgeml
from forgeml.api import evaluate
from forgeml.config import load_config
from forgeml.errors import ConfigError, DataError, ForgeError
from forgeml.evaluate.generation import rouge_l, score_answer
from forgeml.generate import GenerationOptions, generate
from forgeml.models.gpt import gpt_from_architecture
from forgeml.models.lora import load_adapter
from forgeml.models.tokenizers import bpe_tokenizer
from forgeml.tasks.instruction_tuning import BUILTIN_CHAT_TEMPLATE, InstructionTuningTask

from conftest import save_tiny_causal_lm, write_csv

GOOD = ["great", "lovely", "superb", "charming", "moving", "witty"]
BAD = ["awful", "dull", "boring", "clumsy", "weak", "tedious"]
PROMPT = "Review: {text}\nSentiment:"
# ChatML, as Qwen2 instruct tokenizers ship it (without the default system prompt).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def reviews(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        positive = rng.random() < 0.5
        word = rng.choice(GOOD if positive else BAD)
        rows.append({"text": f"film {index} was {word}", "label": "positive" if positive else "negative"})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("base"))


def save_base(folder: Path) -> Path:
    """A tiny random GPT-2 with a BPE tokenizer learnt from the review words, saved as a Hugging Face folder."""
    texts = [PROMPT.format(text=row["text"]) + " " + row["label"] for row in reviews(400, seed=1)]
    tokenizer = bpe_tokenizer(texts, 300)
    torch.manual_seed(0)
    architecture = {"n_layer": 2, "n_head": 2, "n_embd": 48, "context": 64, "dropout": 0.0}
    model = gpt_from_architecture(architecture, len(tokenizer), "gpt2", tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sft_config(data_file: Path, backbone: Path, **sections) -> dict:
    config = {
        "name": "tiny_sft",
        "task": "instruction-tuning",
        "data": {
            "train": str(data_file),
            "prompt": PROMPT,
            "response": " {label}",
            "split": {"validation": 0.1, "test": 0.2},
        },
        "model": {"backbone": str(backbone)},
        "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3, "threads": 1},
        "evaluate": {"generation": {"max_new_tokens": 6}},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def task_for(backbone: Path, columns: list[str], **options) -> InstructionTuningTask:
    settings = {"template": "auto", "loss_on": "response", "packing": False, "columns": columns, **options}
    return InstructionTuningTask({"backbone": str(backbone), "lora": None}, 64, settings)


# --- what is learnt ---------------------------------------------------------------------------------------


def test_prompt_tokens_carry_no_loss_and_every_response_ends_with_eos(base: Path):
    task = task_for(base, ["prompt", "response"])
    assert task.template == "plain"  # this tokenizer has no chat template and the data are pairs
    rows = [{"prompt": PROMPT.format(text=r["text"]), "response": " " + r["label"]} for r in reviews(20)]
    split = task.encode(forgeml_dataset(rows), "train")
    eos = task.tokenizer.eos_token_id
    for row, inputs, labels in zip(rows, split.inputs, split.labels, strict=True):
        prompt_ids = task.tokenizer(row["prompt"])["input_ids"]
        sequence = np.append(inputs, labels[-1])  # inputs are the sequence without its last token
        assert list(sequence[: len(prompt_ids)]) == prompt_ids
        # labels are shifted: position i predicts token i + 1, so the first len(prompt) - 1 predict prompt tokens
        assert (labels[: len(prompt_ids) - 1] == -100).all()
        learnt = labels[labels != -100]
        assert learnt[-1] == eos
        assert task.tokenizer.decode(learnt[:-1]) == row["response"]
    everything = task_for(base, ["prompt", "response"], loss_on="all").encode(forgeml_dataset(rows), "train")
    assert all((labels != -100).all() for labels in everything.labels)


def test_the_built_in_chat_template_renders_turn_by_turn_and_learns_assistant_turns_only(base: Path):
    task = task_for(base, ["messages"])
    assert task.template == "builtin" and task.tokenizer.chat_template == BUILTIN_CHAT_TEMPLATE
    conversation = [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "film 1 was great"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "film 2 was dull"},
        {"role": "assistant", "content": "negative"},
    ]
    pieces = task.pieces(conversation)
    whole = task.tokenizer.apply_chat_template(conversation, tokenize=False)
    assert task.tokenizer.decode([i for ids, _ in pieces for i in ids]) == whole
    learnt = [task.tokenizer.decode(ids) for ids, is_response in pieces if is_response]
    eos = task.tokenizer.eos_token
    assert learnt == [f"positive{eos}\n", f"negative{eos}\n"]
    # The generation prompt is exactly what training put before the first answer.
    before_answer = [i for ids, _ in pieces[:3] for i in ids]
    assert task.prompt_ids(conversation[:2]) == before_answer


def test_a_tokenizers_own_chat_template_is_used(base: Path, tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(tmp_path)
    task = task_for(tmp_path, ["prompt", "response"])
    assert task.template == "chat"
    pieces = task.pieces([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    response_ids = next(ids for ids, is_response in pieces if is_response)
    # ChatML ends a turn with <|im_end|>, not the tokenizer's eos: eos is appended so generation stops.
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response_ids[:-1]) == "hello<|im_end|>\n"


def test_truncated_examples_are_counted_not_silent(base: Path):
    task = InstructionTuningTask(
        {"backbone": str(base), "lora": None},
        12,
        {"template": "plain", "loss_on": "response", "packing": False, "columns": ["prompt", "response"]},
    )
    rows = [{"prompt": "Review: " + "very " * 20 + "good\nSentiment:", "response": " positive"}]
    rows += [{"prompt": "good", "response": " positive"}]
    split = task.encode(forgeml_dataset(rows), "train")
    counts = task.token_profile(split)
    assert counts["truncated"] == 1 and counts["no_response_tokens"] == 1 and counts["examples"] == 2
    assert split.lengths.max() == 12


def test_packed_rows_give_each_example_the_loss_it_has_alone(base: Path):
    rows = [{"prompt": PROMPT.format(text=r["text"]), "response": " " + r["label"]} for r in reviews(12)]
    dataset = forgeml_dataset(rows)
    plain = task_for(base, ["prompt", "response"])
    packed = task_for(base, ["prompt", "response"], packing=True)
    model = plain.build_model().eval()
    alone, packed_split = plain.encode(dataset, "train"), packed.encode(dataset, "train")
    assert len(packed_split) < len(alone)  # several examples share a row
    with torch.no_grad():
        inputs, _ = alone.batch(range(len(alone)))
        per_example = model(**inputs)
        inputs, _ = packed_split.batch(range(len(packed_split)))
        per_row = model(**inputs)
    # Attention across examples would change the packed losses; summed, they equal the examples' own.
    assert per_row[:, 1].sum() == per_example[:, 1].sum()
    assert float(per_row[:, 0].sum()) == pytest.approx(float(per_example[:, 0].sum()), rel=1e-5)


# --- a whole run --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, base: Path) -> forgeml.RunResult:
    folder = tmp_path_factory.mktemp("sft")
    train = write_csv(folder / "reviews.csv", reviews(500))
    return forgeml.run(sft_config(train, base), workspace=folder)


def test_a_run_learns_to_answer_with_the_label_and_stop(trained: forgeml.RunResult):
    test = trained.metrics["test"]
    assert test["exact_match"] >= 0.9, test
    assert test["ended_with_eos"] >= 0.9, test
    assert test["generated_examples"] == 100
    log = [json.loads(line) for line in (trained.run_dir / "train.log").read_text().splitlines()]
    losses = [event["loss"] for event in log if event["event"] == "eval"]
    assert losses[-1] < losses[0] / 3
    answers = [json.loads(line) for line in (trained.run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(answers) == 100 and {"prompt", "reference", "answer", "score"} <= set(answers[0])
    profile = json.loads((trained.run_dir / "data_profile.json").read_text())
    assert profile["tokens"]["train"]["truncated"] == 0 and profile["tokens"]["train"]["examples"] == 350
    card = (trained.run_dir / "card.md").read_text()
    assert "exact match" in card.lower() and "plain (prompt, response, end-of-sequence)" in card


def test_the_trained_model_answers_through_the_api_and_plain_transformers(trained: forgeml.RunResult):
    predictor = forgeml.load(trained.run_dir)
    assert predictor.generates
    answer = predictor.generate(PROMPT.format(text="film 7 was superb"), max_new_tokens=6, temperature=0)
    assert answer.strip() == "positive"
    model = AutoModelForCausalLM.from_pretrained(trained.run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(trained.run_dir / "model")
    ids = tokenizer(PROMPT.format(text="film 8 was tedious"), return_tensors="pt")["input_ids"]
    output = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip() == "negative"


def test_lora_trains_a_tenth_of_the_weights_and_merges_into_an_identical_model(
    trained: forgeml.RunResult, tmp_path: Path
):
    """LoRA on the fine-tuned model (the pre-train -> fine-tune chain: a run directory is a backbone)."""
    train = write_csv(tmp_path / "reviews.csv", reviews(200, seed=3))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
    config = sft_config(train, trained.run_dir, model={"lora": lora}, train={"epochs": 1})
    result = forgeml.run(config, workspace=tmp_path)
    sizes = result.metrics["model"]
    assert 0 < sizes["trainable_parameters"] <= 0.1 * sizes["parameters"]
    merged_model = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    adapter_model = load_adapter(
        AutoModelForCausalLM.from_pretrained(trained.run_dir / "model"), result.run_dir / "model" / "adapter"
    )
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    options = GenerationOptions(max_new_tokens=8, temperature=0)
    # The adapter really changed the model (else equality below would prove nothing) ...
    adapter_weights = [p for n, p in adapter_model.named_parameters() if "lora_B" in n]
    assert adapter_weights and any(w.abs().max() > 0 for w in adapter_weights)
    for row in reviews(5, seed=4):
        prompt = PROMPT.format(text=row["text"])
        # ... and the merged model answers exactly as the adapter model does.
        assert (
            generate(merged_model, tokenizer, prompt, options).text
            == generate(adapter_model, tokenizer, prompt, options).text
        )
    assert result.metrics["test"]["exact_match"] >= 0.9


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_llama_and_qwen2_folders_fine_tune_on_conversations(style: str, base: Path, tmp_path: Path):
    folder = tmp_path / style
    save_tiny_causal_lm(style, AutoTokenizer.from_pretrained(base), folder, key_value_heads=1)  # grouped queries
    conversations = [
        {"messages": [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": row["label"]}]}
        for row in reviews(120)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    config = {
        "name": f"tiny_{style}",
        "task": "instruction-tuning",
        "data": {"train": str(data), "messages": "messages", "split": {"validation": 0.2, "test": 0.0}},
        "model": {"backbone": str(folder)},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "threads": 1},
        "evaluate": {"generation": {"max_new_tokens": 4, "max_examples": 8}},
    }
    result = forgeml.run(config, workspace=tmp_path)
    log = [json.loads(line) for line in (result.run_dir / "train.log").read_text().splitlines()]
    losses = [event["loss"] for event in log if event["event"] == "eval"]
    assert losses[-1] < losses[0]
    assert result.metrics["validation"]["generated_examples"] == 8
    predictor = forgeml.load(result.run_dir)
    assert isinstance(predictor.generate([{"role": "user", "content": "film 3 was dull"}], max_new_tokens=3), str)
    saved = AutoTokenizer.from_pretrained(result.run_dir / "model")
    assert saved.chat_template == BUILTIN_CHAT_TEMPLATE  # the template the model learnt is saved with it


# --- bad configs and data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"train": "x.csv", "prompt": "p"}}, "data.response"),
        ({"data": {"train": "x.csv", "prompt": "p", "response": "r", "messages": "m"}}, "data.messages"),
        ({"model": {"backbone": "gpt"}}, "model.backbone"),
        ({"model": {"backbone": "some/model", "tokenizer": "bpe"}}, "model.tokenizer"),
        ({"data": {"train": "x.csv", "messages": "m", "template": "plain"}}, "data.template"),
        ({"data": {"train": "x.csv", "prompt": "p", "response": "r", "sample": {"train": 0}}}, "sample"),
    ],
)
def test_bad_instruction_configs_name_the_key(changes: dict, message: str):
    config = {"task": "instruction-tuning", "data": {"train": "x.csv", "prompt": "p", "response": "r"}}
    config["model"] = {"backbone": "some/model"}
    for name, values in changes.items():
        config[name] = values
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_keys_of_other_tasks_are_refused():
    with pytest.raises(ConfigError, match=r"evaluate\.generation"):
        load_config({"task": "text-classification", "data": {"train": "x.csv"}, "evaluate": {"generation": {}}})
    with pytest.raises(ConfigError, match=r"data\.prompt"):
        load_config({"task": "text-classification", "data": {"train": "x.csv", "prompt": "p"}})
    with pytest.raises(ConfigError, match=r"model\.lora"):
        load_config({"task": "language-modeling", "data": {"train": "x.txt"}, "model": {"lora": {}}})
    config = load_config(
        {
            "task": "instruction-tuning",
            "data": {"train": "x.csv", "prompt": "p", "response": "r"},
            "model": {"backbone": "m", "lora": {}},
        }
    )
    assert config.family == "causal-lm-lora" and config.train.lr == 2e-4


def test_bad_rows_are_reported_with_row_and_column(tmp_path: Path, base: Path):
    chats = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    chats.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    config = {"task": "instruction-tuning", "data": {"train": str(chats), "messages": "messages"}}
    config["model"] = {"backbone": str(base)}
    with pytest.raises(DataError, match=r"row 2, column 'messages': message 2 needs a role"):
        forgeml.run(config, workspace=tmp_path)
    table = write_csv(tmp_path / "t.csv", [{"text": "a", "label": "x"}])
    config = sft_config(table, base, data={"prompt": "Review: {review}"})
    with pytest.raises(DataError, match="no column 'review'"):
        forgeml.run(config, workspace=tmp_path)


def test_generation_scores():
    assert score_answer(" Positive\n", "positive", "exact_match") == 1.0
    assert score_answer("it is positive.", "positive", "exact_match") == 0.0
    assert score_answer("It is positive.", "positive", "contains") == 1.0
    assert score_answer("negative", "positive", "contains") == 0.0
    assert rouge_l(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == pytest.approx(0.75)
    assert rouge_l([], []) == 1.0 and rouge_l(["a"], []) == 0.0


def forgeml_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_a_latest_backbone_is_pinned_to_the_newest_finished_run(trained: forgeml.RunResult):
    runs = trained.run_dir.parent
    config = load_config(
        {
            "task": "instruction-tuning",
            "data": {"train": "x.csv", "prompt": "p", "response": "r"},
            "model": {"backbone": str(runs / "latest")},
        }
    )
    assert config.model.backbone == str(trained.run_dir)
    assert forgeml.load(runs / "latest").run.path == trained.run_dir  # commands take NAME/latest too
    with pytest.raises(ForgeError, match="no finished run"):
        load_config({**config.model_dump(mode="json"), "model": {"backbone": str(runs.parent / "nothing" / "latest")}})


def test_an_instruction_run_evaluates_another_file_with_loss_and_generated_answers(
    trained: forgeml.RunResult, tmp_path: Path
):
    other = write_csv(tmp_path / "other.csv", reviews(30, seed=9))
    scores = evaluate(trained.run_dir, other)
    assert scores["tokens"] >= 60  # " positive" / " negative" and the end-of-sequence token, for each of 30
    assert scores["exact_match"] >= 0.9 and scores["generated_examples"] == 30
    written = list((trained.run_dir / "evaluations").glob("other-*/generations.jsonl"))
    assert len(written) == 1 and len(written[0].read_text().splitlines()) == 30


def test_lora_without_merging_keeps_the_adapter_alone_and_loads_it_on_the_backbone(base: Path, tmp_path: Path):
    train = write_csv(tmp_path / "reviews.csv", reviews(120, seed=5))
    lora = {"r": 2, "target_modules": ["c_attn"], "merge": False}
    config = sft_config(train, base, model={"lora": lora}, train={"epochs": 1})
    config["evaluate"] = {"generation": {"max_new_tokens": 3, "max_examples": 4}}
    result = forgeml.run(config, workspace=tmp_path)
    model_dir = result.run_dir / "model"
    assert not (model_dir / "model.safetensors").exists() and (model_dir / "adapter" / "adapter_config.json").is_file()
    predictor = forgeml.load(result.run_dir)  # the backbone with the adapter applied
    assert isinstance(predictor.generate(PROMPT.format(text="film 1 was great"), max_new_tokens=3), str)
