"""Building blocks of language-model pre-training: corpus tokenizers, GPT models from a config,
and packing documents into training blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forgeml.data.packing import PackedBlocks, held_out_tail, pack_documents, random_windows
from forgeml.errors import ConfigError
from forgeml.models.gpt import gpt_from_architecture, parameter_count, training_flops_per_token
from forgeml.models.tokenizers import bpe_tokenizer, char_tokenizer, train_tokenizer

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 16, "context": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def shakespeare(shared_datasets: Path) -> str:
    path = shared_datasets / "tiny_shakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path}")
    return path.read_text(encoding="utf-8")


# --- tokenizers ---------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_shakespeare_and_saves(shakespeare: str, tmp_path: Path):
    text = shakespeare[:20_000]
    tokenizer = char_tokenizer([text])
    characters = sorted(set(text))
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(characters))] == characters  # nanoGPT's stoi
    assert len(tokenizer) == len(characters) + 2
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"

    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one id per character, no special token added
    assert tokenizer.decode(ids) == text
    tricky = "a  b\n\n   c\n"  # repeated spaces and newlines survive
    assert tokenizer.decode(tokenizer(tricky)["input_ids"]) == tricky
    assert tokenizer("aé")["input_ids"] == [tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id]

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert (loaded.eos_token, loaded.unk_token) == ("<|endoftext|>", "<unk>")


def test_char_vocabulary_of_full_shakespeare_is_its_65_characters(shakespeare: str):
    tokenizer = char_tokenizer([shakespeare])
    assert len(tokenizer) == 65 + 2  # the README's 65 characters, plus <|endoftext|> and <unk>


def test_bpe_round_trips_unseen_scripts_and_respects_vocab_size(tmp_path: Path):
    corpus = ["the quick brown fox jumps over the lazy dog\n"] * 50 + ["to be, or not to be: that is the question"] * 50
    tokenizer = bpe_tokenizer(corpus, vocab_size=300)
    assert len(tokenizer) <= 300
    assert len(tokenizer) > 257  # learnt some merges beyond the bytes
    text = "the fox 说中文 😀 naïve  \n\tdouble  spaces <tag>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id not in ids  # nothing added automatically

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text


def test_tokenizers_are_deterministic():
    corpus = ["hello world, hello there, world of words\n"] * 20
    assert char_tokenizer(corpus).get_vocab() == char_tokenizer(iter(corpus)).get_vocab()
    assert bpe_tokenizer(corpus, 280).get_vocab() == bpe_tokenizer(iter(corpus), 280).get_vocab()


def test_train_tokenizer_dispatches_and_names_the_setting():
    assert len(train_tokenizer("char", ["abc"], None)) == 3 + 2
    assert len(train_tokenizer("bpe", ["abc abc abc"], 260)) <= 260
    with pytest.raises(ConfigError, match=r"model\.tokenizer.*'char', 'bpe'"):
        train_tokenizer("wordpiece", ["abc"], 100)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        train_tokenizer("bpe", ["abc"], None)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        train_tokenizer("char", ["abc"], 100)


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_gpt_forward_and_save_load_round_trip(style: str, tmp_path: Path):
    torch.manual_seed(0)
    model = gpt_from_architecture(TINY, vocab_size=50, style=style, eos_token_id=49).eval()
    batch = torch.randint(0, 50, (2, TINY["context"]))
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape == (2, TINY["context"], 50)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, logits)
    assert loaded.config.eos_token_id == 49


def test_gpt2_parameter_count_matches_hand_count():
    layers, width, context, vocab = 2, 16, 8, 50
    model = gpt_from_architecture({"n_layer": layers, "n_head": 2, "n_embd": width, "context": context}, vocab)
    layer_norm = 2 * width
    attention = (width * 3 * width + 3 * width) + (width * width + width)
    mlp = (width * 4 * width + 4 * width) + (4 * width * width + width)
    block = 2 * layer_norm + attention + mlp
    token_embedding, position_embedding = vocab * width, context * width
    non_embedding = layers * block + layer_norm + token_embedding  # lm_head is tied to the token embedding
    assert parameter_count(model) == non_embedding
    assert parameter_count(model, non_embedding=False) == non_embedding + position_embedding
    assert training_flops_per_token(model) == 6 * non_embedding + 12 * layers * width * context


def test_llama_style_has_no_position_table_and_a_rounded_mlp():
    model = gpt_from_architecture(TINY, vocab_size=50, style="llama")
    assert parameter_count(model) == parameter_count(model, non_embedding=False)
    assert model.config.intermediate_size == 64  # 8/3 * 16 = 42.7, rounded up to a multiple of 32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"n_embd": 15}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"context": 2.5}, "context"),
        ({"dropout": 1.0}, "dropout"),
        ({"bias": "yes"}, "bias"),
        ({"bias": False}, "bias"),  # GPT-2 layers always have biases
        ({"block_size": 8}, "block_size"),
    ],
)
def test_bad_architecture_is_a_config_error_naming_the_key(change: dict, key: str):
    with pytest.raises(ConfigError, match=rf"model\.architecture.*{key}"):
        gpt_from_architecture({**TINY, **change}, vocab_size=50)


def test_unknown_style_and_missing_key_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.style.*'gpt2', 'llama'"):
        gpt_from_architecture(TINY, vocab_size=50, style="mamba")
    without_heads = {key: value for key, value in TINY.items() if key != "n_head"}
    with pytest.raises(ConfigError, match=r"model\.architecture\.n_head is required"):
        gpt_from_architecture(without_heads, vocab_size=50)


def test_packed_block_trains_a_model_with_the_hf_loss():
    torch.manual_seed(0)
    model = gpt_from_architecture(TINY, vocab_size=50).eval()
    row = torch.from_numpy(pack_documents([list(range(30))], TINY["context"], None).blocks[:1])
    inputs, targets = row[:, :-1], row[:, 1:]
    with torch.no_grad():
        output = model(input_ids=inputs, labels=targets, shift_labels=targets)
    expected = torch.nn.functional.cross_entropy(output.logits.reshape(-1, 50), targets.reshape(-1))
    assert torch.allclose(output.loss, expected)


# --- packing ------------------------------------------------------------------------------------


def test_blocks_cover_the_stream_with_separators_between_documents():
    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]]
    packed = pack_documents(documents, block_size=4, separator_id=0)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 11, 0, 12, 0]  # 16 tokens
    assert isinstance(packed, PackedBlocks)
    assert packed.total_tokens == 16
    assert packed.blocks.shape == (3, 5) and packed.blocks.dtype == np.int64  # (16 - 1) // 4 blocks
    # Overlapping by one token: drop each later block's first token and the stream comes back.
    rebuilt = [*packed.blocks[0], *(token for block in packed.blocks[1:] for token in block[1:])]
    assert rebuilt == stream[: len(rebuilt)]
    assert packed.dropped_tokens == len(stream) - len(rebuilt) == 3
    targets = packed.blocks[:, 1:].ravel().tolist()
    assert targets == stream[1:13]  # every kept token after the first is predicted exactly once


def test_packing_without_separator_and_exact_fit():
    packed = pack_documents([[1, 2, 3], [4, 5]], block_size=2, separator_id=None)
    assert packed.blocks.tolist() == [[1, 2, 3], [3, 4, 5]]
    assert (packed.dropped_tokens, packed.total_tokens) == (0, 5)


def test_stream_shorter_than_a_block_gives_zero_blocks():
    packed = pack_documents([[1, 2], [3]], block_size=8, separator_id=0)
    assert packed.blocks.shape == (0, 9)
    assert packed.dropped_tokens == packed.total_tokens == 5
    assert pack_documents([], block_size=8, separator_id=0).blocks.shape == (0, 9)


def test_held_out_tail_cuts_after_a_newline():
    lines = [f"line number {index:03d}\n" for index in range(200)]  # 16 characters each, 3200 in all
    text = "".join(lines)
    head, tail = held_out_tail(text, 0.1 - 11 / 3200)  # the exact cut, 2891, falls mid-line 181
    assert head == "".join(lines[:180])  # moved back to the end of line 180
    assert head + tail == text


def test_held_out_tail_without_nearby_newline_cuts_at_the_fraction():
    text = "x" * 1000
    head, tail = held_out_tail(text, 0.25)
    assert (len(head), len(tail)) == (750, 250)
    with pytest.raises(ConfigError, match=r"data\.split\.validation"):
        held_out_tail(text, 1.0)
    with pytest.raises(ConfigError, match=r"data\.split\.validation"):
        held_out_tail(text, 0)


def test_held_out_tail_of_shakespeare_keeps_lines_whole(shakespeare: str):
    head, tail = held_out_tail(shakespeare, 0.1)
    assert head + tail == shakespeare
    assert head.endswith("\n")
    assert abs(len(tail) / len(shakespeare) - 0.1) < 0.001


def test_random_windows_stay_inside_the_stream():
    generator = np.random.default_rng(0)
    offsets = random_windows(n_tokens=20, block_size=8, count=2000, generator=generator)
    assert offsets.shape == (2000,)
    assert offsets.min() == 0 and offsets.max() == 20 - 8 - 1  # both ends reached, nothing past them
    again = random_windows(20, 8, 2000, np.random.default_rng(0))
    assert np.array_equal(offsets, again)
    with pytest.raises(ValueError, match="block_size"):
        random_windows(n_tokens=8, block_size=8, count=1, generator=generator)
