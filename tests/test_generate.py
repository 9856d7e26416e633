"""Generation and perplexity on tiny random-initialised causal LMs (GPT-2, Llama, Qwen2) with a
character-level tokenizer, checked against transformers' own `generate` and `labels=` loss."""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from forgeml.errors import ConfigError
from forgeml.generate import GenerationOptions, generate, perplexity, stream

END = "<|endoftext|>"
CHARACTERS = list(string.ascii_lowercase + " .,!?'")
CONTEXT = 64
PROMPT = "the cat sat on the mat"
LONG_TEXT = "a quick brown fox jumps over the lazy dog, then naps. " * 3  # 162 characters > CONTEXT


def char_tokenizer(eos: str = END) -> PreTrainedTokenizerFast:
    """One token per character; `eos` may name one of the characters, to make the model end early."""
    vocab = {END: 0, **{character: index + 1 for index, character in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=END))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos)


def tiny_model(config) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()  # from_config leaves dropout on


SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
VOCAB_SIZE = len(CHARACTERS) + 1


# Models this small run faster on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="module")
def gpt2() -> PreTrainedModel:
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT, vocab_size=VOCAB_SIZE, **SPECIAL_IDS)
    return tiny_model(config)


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        **SPECIAL_IDS,
    )
    return tiny_model(config)


@pytest.fixture(scope="module")
def qwen2() -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
        **SPECIAL_IDS,
    )
    return tiny_model(config)


def transformers_greedy(model, tokenizer, prompt: str, max_new_tokens: int, repetition_penalty: float = 1.0) -> str:
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        pad_token_id=0,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "qwen2"])
def test_greedy_matches_transformers_generate(request, tokenizer, architecture, repetition_penalty):
    model = request.getfixturevalue(architecture)
    options = GenerationOptions(max_new_tokens=20, temperature=0, repetition_penalty=repetition_penalty)
    result = generate(model, tokenizer, PROMPT, options)
    assert result.text == transformers_greedy(model, tokenizer, PROMPT, 20, repetition_penalty)
    assert result.prompt_tokens == len(PROMPT)
    assert result.completion_tokens == 20
    assert result.finish_reason == "length"


def test_multi_byte_characters_split_across_tokens_are_streamed_whole():
    """A byte-level tokenizer (one token per byte): the model's output contains a character whose bytes
    arrive in several tokens; the stream must not send the replacement character in between."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {character: index for index, character in enumerate(alphabet)} | {END: len(alphabet)}
    byte_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token=END)
    end_id = len(alphabet)
    ids = {"bos_token_id": end_id, "eos_token_id": end_id, "pad_token_id": end_id}
    model = tiny_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT, vocab_size=len(vocab), **ids))
    prompt, options = "café ü", GenerationOptions(max_new_tokens=40, temperature=0, repetition_penalty=1.5)

    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    output = model.generate(input_ids, do_sample=False, max_new_tokens=40, repetition_penalty=1.5, pad_token_id=end_id)
    produced = output[0, input_ids.shape[1] :].tolist()
    prefixes = [tokenizer.decode(produced[:length]) for length in range(1, len(produced) + 1)]
    completed_later = [shorter for shorter, longer in itertools.pairwise(prefixes) if not longer.startswith(shorter)]
    assert completed_later and all(text.endswith("\ufffd") for text in completed_later), "no split character"

    pieces = list(stream(model, tokenizer, prompt, options))
    assert "".join(pieces) == tokenizer.decode(produced, skip_special_tokens=True)
    assert generate(model, tokenizer, prompt, options).text == "".join(pieces)


def test_same_seed_same_text_and_global_random_state_untouched(gpt2, tokenizer):
    def sample(seed: int) -> str:
        options = GenerationOptions(max_new_tokens=30, temperature=0.8, top_k=5, seed=seed)
        return generate(gpt2, tokenizer, PROMPT, options).text

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = sample(1)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert sample(1) == first
    assert sample(2) != first


def test_stream_yields_one_piece_per_token_and_joins_to_generate(gpt2, tokenizer):
    options = GenerationOptions(max_new_tokens=15, temperature=0.8, seed=0)  # a seed that samples no end token
    pieces = stream(gpt2, tokenizer, PROMPT, options)
    first = next(pieces)
    rest = list(pieces)
    result = generate(gpt2, tokenizer, PROMPT, options)
    assert first and rest
    assert len([first, *rest]) == result.completion_tokens == 15  # one character per token here
    assert first + "".join(rest) == result.text


def test_generation_restores_training_mode(gpt2, tokenizer):
    gpt2.train()
    try:
        generate(gpt2, tokenizer, PROMPT, GenerationOptions(max_new_tokens=2, temperature=0))
        assert gpt2.training
    finally:
        gpt2.eval()


def test_top_k_one_and_tiny_top_p_equal_greedy(llama, tokenizer):
    greedy = generate(llama, tokenizer, PROMPT, GenerationOptions(max_new_tokens=20, temperature=0)).text
    top_k_one = GenerationOptions(max_new_tokens=20, temperature=1.0, top_k=1, seed=3)
    tiny_top_p = GenerationOptions(max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3)
    assert generate(llama, tokenizer, PROMPT, top_k_one).text == greedy
    assert generate(llama, tokenizer, PROMPT, tiny_top_p).text == greedy
    sampled = GenerationOptions(max_new_tokens=20, temperature=1.0, seed=3)
    assert generate(llama, tokenizer, PROMPT, sampled).text != greedy  # the filters did the work


def test_stop_string_ends_text_before_it(gpt2, tokenizer):
    options = GenerationOptions(max_new_tokens=30, temperature=1.0, seed=5)
    unstopped = generate(gpt2, tokenizer, PROMPT, options)
    assert unstopped.finish_reason == "length"
    full = unstopped.text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 1) if full[i : i + 2] not in full[: i + 1])
    with_stop = GenerationOptions(max_new_tokens=30, temperature=1.0, seed=5, stop=["never seen", stop])

    result = generate(gpt2, tokenizer, PROMPT, with_stop)
    assert result.text == full[: full.index(stop)]
    assert stop not in result.text
    assert result.finish_reason == "stop"
    # The stream must hold back the stop string's first character until it knows whether the rest follows.
    assert "".join(stream(gpt2, tokenizer, PROMPT, with_stop)) == result.text


def test_end_of_sequence_token_ends_text_and_is_not_included(gpt2):
    options = GenerationOptions(max_new_tokens=30, temperature=1.0, seed=0)
    unstopped = generate(gpt2, char_tokenizer(), PROMPT, options)
    assert unstopped.finish_reason == "length"
    full = unstopped.text
    position = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    tokenizer_ending_there = char_tokenizer(eos=full[position])

    result = generate(gpt2, tokenizer_ending_there, PROMPT, options)
    assert result.text == full[:position]
    assert result.finish_reason == "stop"
    assert result.completion_tokens == position


def test_prompt_longer_than_context_is_refused_or_cut_from_the_left(gpt2, tokenizer):
    prompt = (string.ascii_lowercase * 3)[:70]
    with pytest.raises(ConfigError, match=r"70.*64"):
        generate(gpt2, tokenizer, prompt, GenerationOptions(max_new_tokens=5))

    options = GenerationOptions(max_new_tokens=5, temperature=0, truncate="left")
    result = generate(gpt2, tokenizer, prompt, options)
    assert result.prompt_tokens == CONTEXT - 5
    assert result.completion_tokens == 5
    assert result.text == generate(gpt2, tokenizer, prompt[-(CONTEXT - 5) :], options).text


def test_generation_stops_when_the_context_is_full_unless_the_window_slides(gpt2, tokenizer):
    prompt = (string.ascii_lowercase * 3)[:60]
    options = GenerationOptions(max_new_tokens=10, temperature=0, slide=False)
    result = generate(gpt2, tokenizer, prompt, options)
    assert result.completion_tokens == CONTEXT - 60
    assert result.finish_reason == "length"

    # Sliding (the default, nanoGPT's cropped context) goes on: each token from at most the last CONTEXT tokens.
    slid = generate(gpt2, tokenizer, prompt, GenerationOptions(max_new_tokens=10, temperature=0))
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(gpt2(torch.tensor([ids[-CONTEXT:]])).logits[0, -1].argmax()))
    assert slid.completion_tokens == 10 and slid.text == tokenizer.decode(ids[len(prompt) :])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("repetition_penalty", 0),
        ("stop", [""]),
        ("truncate", "right"),
        ("seed", "seven"),
    ],
)
def test_bad_option_is_refused_naming_it(option, value):
    with pytest.raises(ConfigError, match=rf"^{option}: must"):
        GenerationOptions(**{option: value})


def test_empty_prompt_is_refused(gpt2, tokenizer):
    with pytest.raises(ConfigError, match=r"^prompt: empty"):
        generate(gpt2, tokenizer, "", GenerationOptions())
    with pytest.raises(ConfigError, match=r"^prompt: empty"):
        stream(gpt2, tokenizer, "", GenerationOptions())  # refused before the first piece is asked for


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_perplexity_of_a_short_text_is_exp_of_the_model_loss(request, tokenizer, architecture):
    model = request.getfixturevalue(architecture)
    text = "the quick brown fox jumps"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected_loss = model(ids, labels=ids).loss.item()

    result = perplexity(model, tokenizer, [text])
    assert result["tokens"] == len(text) - 1
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-4)
    assert result["texts"] == [{key: result[key] for key in ("loss", "perplexity", "tokens")}]


def test_perplexity_with_stride_equal_to_context_is_the_chunked_loss(gpt2, tokenizer):
    ids = torch.tensor(tokenizer(LONG_TEXT)["input_ids"])
    summed_loss, scored = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(CONTEXT):
            summed_loss += gpt2(chunk[None], labels=chunk[None]).loss.item() * (len(chunk) - 1)
            scored += len(chunk) - 1

    result = perplexity(gpt2, tokenizer, [LONG_TEXT], stride=CONTEXT)
    assert result["tokens"] == scored == len(ids) - math.ceil(len(ids) / CONTEXT)
    assert result["loss"] == pytest.approx(summed_loss / scored, rel=1e-4)


def test_perplexity_with_overlapping_windows_scores_every_token_once(gpt2, tokenizer):
    """The Hugging Face sliding-window recipe, written with `labels=` and -100 masks, as the reference."""
    ids = torch.tensor(tokenizer(LONG_TEXT)["input_ids"])
    stride, summed_loss, scored, previous_end = 16, 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + CONTEXT, len(ids))
            labels = ids[begin:end].clone()
            labels[: -(end - previous_end)] = -100
            predicted = int((labels[1:] != -100).sum())  # the model shifts labels; the first is never predicted
            summed_loss += gpt2(ids[None, begin:end], labels=labels[None]).loss.item() * predicted
            scored += predicted
            previous_end = end
            if end == len(ids):
                break

    result = perplexity(gpt2, tokenizer, [LONG_TEXT], stride=stride)
    assert result["tokens"] == scored == len(ids) - 1
    assert math.isfinite(result["perplexity"])
    assert result["loss"] == pytest.approx(summed_loss / scored, rel=1e-4)
    assert perplexity(gpt2, tokenizer, [LONG_TEXT])["tokens"] == len(ids) - 1  # default stride: context // 2


def test_perplexity_over_several_texts_is_token_weighted(gpt2, tokenizer):
    texts = ["a short one", "a rather longer text than the first"]
    result = perplexity(gpt2, tokenizer, texts)
    per_text = result["texts"]
    assert [entry["tokens"] for entry in per_text] == [len(text) - 1 for text in texts]
    assert result["tokens"] == sum(entry["tokens"] for entry in per_text)
    weighted = sum(entry["loss"] * entry["tokens"] for entry in per_text) / result["tokens"]
    assert result["loss"] == pytest.approx(weighted, rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(weighted), rel=1e-9)


@pytest.mark.parametrize(
    ("settings", "option"), [({"stride": 0}, "stride"), ({"stride": 65}, "stride"), ({"context": 65}, "context")]
)
def test_perplexity_refuses_a_bad_window(gpt2, tokenizer, settings, option):
    with pytest.raises(ConfigError, match=rf"^{option}: must"):
        perplexity(gpt2, tokenizer, [PROMPT], **settings)
