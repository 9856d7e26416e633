"""Tokenizers trained on the user's own corpus, for language-model pre-training from scratch.

Both kinds are built with the `tokenizers` library and wrapped as a
`transformers.PreTrainedTokenizerFast`, so they save with `save_pretrained` and load back with
`AutoTokenizer.from_pretrained` like any Hugging Face tokenizer.

Only the training split may feed these functions: a vocabulary learnt from validation or test text
leaks those splits into the model (their rare characters and words get their own tokens).

Neither tokenizer adds special tokens when encoding (there is no post-processor): the packing step
decides where the end-of-text token goes. Like every Hugging Face tokenizer, they do read the literal
text "<|endoftext|>" as that special token, which is what a corpus that uses it as a document
separator wants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from forgeml.errors import ConfigError, DataError

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
TOKENIZER_KINDS = ("char", "bpe")
# 256 byte tokens plus the end-of-text token: a byte-level BPE vocabulary cannot be smaller.
MIN_BPE_VOCAB_SIZE = 256 + 1


def char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per character seen in `texts` (the training split only), as nanoGPT's char model.

    Ids 0..n-1 are the distinct characters in sorted order, so they equal nanoGPT's `stoi` for the
    same text; "<|endoftext|>" (eos, bos and pad) and "<unk>" (any character not seen in training)
    follow. Decoding the ids of text made of training characters gives the text back exactly.
    """
    characters: set[str] = set()
    for text in texts:
        characters.update(text)
    if not characters:
        raise DataError("the training text is empty: a character tokenizer needs at least one character")
    vocabulary = {character: index for index, character in enumerate(sorted(characters))}
    vocabulary[END_OF_TEXT] = len(vocabulary)
    vocabulary[UNKNOWN] = len(vocabulary)

    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNKNOWN))
    # Oniguruma's "." skips "\n" (and its "(?s)" flag is a syntax error), so match any code point explicitly.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # the default decoder would put spaces between characters
    tokenizer.add_special_tokens([END_OF_TEXT, UNKNOWN])
    return _wrap(tokenizer, unk_token=UNKNOWN)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) learnt from `texts` (the training split only).

    Every one of the 256 bytes is in the vocabulary, so any Unicode text encodes without an unknown
    token and decodes back exactly, even characters never seen in training. The vocabulary holds at
    most `vocab_size` tokens (fewer when the text has too few pairs seen `min_frequency` times),
    "<|endoftext|>" (eos, bos and pad) included.
    """
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_BPE_VOCAB_SIZE} (256 bytes + <|endoftext|>), not {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = _Counted(texts)
    tokenizer.train_from_iterator(seen, trainer=trainer)
    if seen.characters == 0:
        raise DataError("the training text is empty: a BPE tokenizer needs text to learn merges from")
    return _wrap(tokenizer)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None) -> PreTrainedTokenizerFast:
    """The tokenizer named by `model.tokenizer` ("char" or "bpe"), trained on the training split only.

    `vocab_size` is required for "bpe" and must be None for "char", whose vocabulary is the set of
    characters in the text.
    """
    if kind == "char":
        if vocab_size is not None:
            raise ConfigError(
                "model.vocab_size applies to the 'bpe' tokenizer only: the 'char' tokenizer's vocabulary is "
                "the characters of the training text; remove model.vocab_size or set model.tokenizer: bpe"
            )
        return char_tokenizer(texts)
    if kind == "bpe":
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} for the 'bpe' tokenizer "
                f"(256 bytes + <|endoftext|>), got {vocab_size!r}"
            )
        return bpe_tokenizer(texts, vocab_size)
    allowed = ", ".join(repr(name) for name in TOKENIZER_KINDS)
    raise ConfigError(f"model.tokenizer must be one of {allowed}, got {kind!r}")


def _wrap(tokenizer: Tokenizer, **special_tokens: str) -> PreTrainedTokenizerFast:
    # One token serves as eos, bos and pad, as in GPT-2: packed blocks need no padding, and generation
    # stops at the same token that separates documents in training.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        **special_tokens,
    )


class _Counted:
    """Passes texts through once while counting their characters (the trainer cannot say it saw none)."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.characters = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.characters += len(text)
            yield text
