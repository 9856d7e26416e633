"""Tokenizers trained on the user's own corpus, for language-model pre-training from scratch.

Every kind is built with the `tokenizers` library and wrapped as a
`transformers.PreTrainedTokenizerFast`, so they save with `save_pretrained` and load back with
`AutoTokenizer.from_pretrained` like any Hugging Face tokenizer.

Only the training split may feed these functions: a vocabulary learnt from validation or test text
leaks those splits into the model (their rare characters and words get their own tokens).

Two families:

- for causal LMs (`char_tokenizer`, `bpe_tokenizer`, `train_tokenizer`): no special tokens are added
  when encoding (there is no post-processor): the packing step decides where the end-of-text token
  goes. Like every Hugging Face tokenizer, they do read the literal text "<|endoftext|>" as that
  special token, which is what a corpus that uses it as a document separator wants.
- for BERT-style encoders (`wordpiece_tokenizer`, `encoder_tokenizer`): [PAD] [UNK] [CLS] [SEP] [MASK]
  (ids 0-4), and BERT's post-processor, which encodes a text as "[CLS] text [SEP]" and a pair as
  "[CLS] a [SEP] b [SEP]" (token types 0 then 1). A masked-LM model trained with one is a drop-in
  `model.backbone` for the text tasks, which tokenize with the special tokens added.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from forgeml.errors import ConfigError, DataError

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
TOKENIZER_KINDS = ("char", "bpe")
# 256 byte tokens plus the end-of-text token: a byte-level BPE vocabulary cannot be smaller.
MIN_BPE_VOCAB_SIZE = 256 + 1

# BERT's special tokens, in BERT's id order ([PAD] is 0, which BertConfig assumes by default).
BERT_SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
ENCODER_TOKENIZER_KINDS = ("wordpiece", "bpe", "char")
# The special tokens plus at least one learnt token; byte-level BPE needs its 256 bytes besides.
MIN_WORDPIECE_VOCAB_SIZE = len(BERT_SPECIAL_TOKENS) + 1
MIN_ENCODER_BPE_VOCAB_SIZE = 256 + len(BERT_SPECIAL_TOKENS)
# BertWordPieceTokenizer's default: a pair must be seen twice to be merged.
WORDPIECE_MIN_FREQUENCY = 2


def char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per character seen in `texts` (the training split only), as nanoGPT's char model.

    Ids 0..n-1 are the distinct characters in sorted order, so they equal nanoGPT's `stoi` for the
    same text; "<|endoftext|>" (eos, bos and pad) and "<unk>" (any character not seen in training)
    follow. Decoding the ids of text made of training characters gives the text back exactly.
    """
    vocabulary = {character: index for index, character in enumerate(_characters(texts))}
    vocabulary[END_OF_TEXT] = len(vocabulary)
    vocabulary[UNKNOWN] = len(vocabulary)
    tokenizer = _char_level(vocabulary, UNKNOWN)
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
    return _wrap(_byte_level_bpe(texts, vocab_size, [END_OF_TEXT], min_frequency))


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


def wordpiece_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT's uncased WordPiece tokenizer learnt from `texts` (the training split only).

    Text is normalised as BERT uncased does (control characters removed, lower case, NFD with accents
    stripped, spaces around CJK characters), split on whitespace and punctuation, then into word pieces
    ("playing" -> "play", "##ing"). Lower-casing is the better default for the small corpora this
    tokenizer is trained on: "The" and "the" share one token and its statistics instead of splitting
    them, and it matches the default backbone (MiniLM, uncased). Words it cannot spell from its pieces
    become [UNK]. The vocabulary holds at most `vocab_size` tokens, specials included, unless the
    training text has more distinct characters (each character and its "##" form are always kept).
    The same text always gives the same vocabulary.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_WORDPIECE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_WORDPIECE_VOCAB_SIZE}, got {vocab_size!r}")
    texts = list(texts)  # read twice: for the continuing pieces, then to train
    unknown = BERT_SPECIAL_TOKENS["unk_token"]
    tokenizer = _bert_wordpiece(models.WordPiece(unk_token=unknown))
    # tokenizers 0.23's WordPiece trainer numbers each "##c" piece in hash-map order as it meets it, and
    # ties between equally frequent merges go to the lower ids: the same text gives a different vocabulary
    # from one call to the next (huggingface/tokenizers#1794), so a resumed run would re-fit another
    # tokenizer than its checkpoint's. Registering every "##c" up front, in sorted order, fixes the ids.
    # They are registered as trainer "special tokens", which is the only way to give ids before training;
    # the tokenizer is rebuilt from the learnt vocabulary below so that they end up ordinary pieces. Every
    # character is kept (no alphabet limit) so that these are exactly the pieces the trainer would add.
    continuing = sorted(_continuing_pieces(tokenizer, texts))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=WORDPIECE_MIN_FREQUENCY,
        special_tokens=[*BERT_SPECIAL_TOKENS.values(), *continuing],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    seen = _Counted(texts)
    tokenizer.train_from_iterator(seen, trainer=trainer)
    if seen.characters == 0:
        raise DataError("the training text is empty: a WordPiece tokenizer needs text to learn pieces from")
    vocabulary = tokenizer.get_vocab(with_added_tokens=False)
    return _wrap_for_encoder(_bert_wordpiece(models.WordPiece(vocab=vocabulary, unk_token=unknown)))


def _bert_wordpiece(model: models.WordPiece) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)  # strip_accents follows lowercase (BERT)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _continuing_pieces(tokenizer: Tokenizer, texts: list[str]) -> set[str]:
    """The pieces "##c", c every character that follows another inside a word (words as the trainer sees them)."""
    characters: set[str] = set()
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            characters.update(word[1:])
    return {"##" + character for character in characters}


def encoder_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None) -> PreTrainedTokenizerFast:
    """The tokenizer named by `model.tokenizer` for a BERT-style encoder, trained on the training split only.

    - "wordpiece": `wordpiece_tokenizer` (BERT's scheme).
    - "bpe": byte-level BPE as `bpe_tokenizer` (any text encodes, case and spaces kept), with BERT's
      special tokens in place of <|endoftext|>.
    - "char": one token per character seen in training (spaces included), unseen ones [UNK].

    All three have [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4) and add [CLS] ... [SEP] when encoding.
    `vocab_size` is required for "wordpiece" and "bpe" and must be None for "char".
    """
    check_encoder_tokenizer(kind, vocab_size)
    if kind == "char":
        vocabulary = {token: index for index, token in enumerate(BERT_SPECIAL_TOKENS.values())}
        for character in _characters(texts):
            vocabulary.setdefault(character, len(vocabulary))
        return _wrap_for_encoder(_char_level(vocabulary, BERT_SPECIAL_TOKENS["unk_token"]))
    if kind == "wordpiece":
        return wordpiece_tokenizer(texts, vocab_size)
    return _wrap_for_encoder(_byte_level_bpe(texts, vocab_size, list(BERT_SPECIAL_TOKENS.values())))


def check_encoder_tokenizer(kind: str, vocab_size: int | None) -> None:
    """A ConfigError naming `model.tokenizer` or `model.vocab_size` unless `encoder_tokenizer` accepts them
    (checked before any text is read, so a bad config fails at once)."""
    if kind not in ENCODER_TOKENIZER_KINDS:
        allowed = ", ".join(repr(name) for name in ENCODER_TOKENIZER_KINDS)
        raise ConfigError(f"model.tokenizer must be one of {allowed}, got {kind!r}")
    if kind == "char":
        if vocab_size is not None:
            raise ConfigError(
                "model.vocab_size does not apply to the 'char' tokenizer (its vocabulary is the characters of "
                "the training text); remove model.vocab_size or set model.tokenizer: wordpiece or bpe"
            )
        return
    smallest = MIN_WORDPIECE_VOCAB_SIZE if kind == "wordpiece" else MIN_ENCODER_BPE_VOCAB_SIZE
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ConfigError(
            f"model.vocab_size must be an integer >= {smallest} for the {kind!r} tokenizer, got {vocab_size!r}"
        )


def _characters(texts: Iterable[str]) -> list[str]:
    """The distinct characters of `texts`, sorted (nanoGPT's char vocabulary)."""
    characters: set[str] = set()
    for text in texts:
        characters.update(text)
    if not characters:
        raise DataError("the training text is empty: a character tokenizer needs at least one character")
    return sorted(characters)


def _char_level(vocabulary: dict[str, int], unknown: str) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=unknown))
    # Oniguruma's "." skips "\n" (and its "(?s)" flag is a syntax error), so match any code point explicitly.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # the default decoder would put spaces between characters
    return tokenizer


def _byte_level_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = _Counted(texts)
    tokenizer.train_from_iterator(seen, trainer=trainer)
    if seen.characters == 0:
        raise DataError("the training text is empty: a BPE tokenizer needs text to learn merges from")
    return tokenizer


def _wrap_for_encoder(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """BERT's special tokens (registered as such, so text never splits them) and post-processor."""
    tokenizer.add_special_tokens(list(BERT_SPECIAL_TOKENS.values()))
    cls, sep = BERT_SPECIAL_TOKENS["cls_token"], BERT_SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.BertProcessing(
        (sep, tokenizer.token_to_id(sep)), (cls, tokenizer.token_to_id(cls))
    )
    # Token types tell a pair's two texts apart (text-pair tasks); the plain wrapper would not return them.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **BERT_SPECIAL_TOKENS,
    )


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
