"""A new, randomly initialised BERT-style encoder with its masked-LM head, from an architecture dict.

The model is a stock Hugging Face `BertForMaskedLM`, so it trains, saves and loads
(`AutoModelForMaskedLM.from_pretrained`, or `AutoModel.from_pretrained` for the encoder alone) with no
forgeml code. The architecture dict uses the same nanoGPT names as `models.gpt`::

    {n_layer: 4, n_head: 4, n_embd: 256, context: 128, dropout: 0.1, intermediate_size: 1024}

`context` is the number of position embeddings (the longest input the encoder can ever take, later
fine-tuning included); `intermediate_size` the feed-forward width (BERT's 4 * n_embd by default). Weights
are drawn from torch's global random generator: seed it for a reproducible model.
"""

from __future__ import annotations

from typing import Any

from transformers import BertConfig, BertForMaskedLM

from forgeml.errors import ConfigError

REQUIRED_KEYS = ("n_layer", "n_head", "n_embd")
ARCHITECTURE_KEYS = (*REQUIRED_KEYS, "context", "dropout", "intermediate_size")
# BERT's own dropout on embeddings, attention and residuals.
DEFAULT_DROPOUT = 0.1
# BERT-mini's shape (Turc et al. 2019: 4 layers, 256 wide, 4 heads): trains on a CPU in minutes.
DEFAULT_BERT_ARCHITECTURE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "dropout": DEFAULT_DROPOUT}


def bert_from_architecture(
    architecture: dict[str, Any], vocab_size: int, max_length: int, pad_token_id: int | None = 0
) -> BertForMaskedLM:
    """A new BERT (post-LayerNorm, GELU, learnt positions, token types 0/1) with a masked-LM head tied to
    its input embeddings. `max_length` is the longest input this run feeds it: `context` defaults to it
    and may not be smaller."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    sizes = validate_bert_architecture(architecture, max_length)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=sizes["n_embd"],
        num_hidden_layers=sizes["n_layer"],
        num_attention_heads=sizes["n_head"],
        intermediate_size=sizes["intermediate_size"],
        hidden_dropout_prob=sizes["dropout"],
        attention_probs_dropout_prob=sizes["dropout"],
        max_position_embeddings=sizes["context"],
        type_vocab_size=2,  # a text pair's two halves, for text-pair fine-tuning later
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )
    return BertForMaskedLM(config)


def validate_bert_architecture(architecture: dict[str, Any], max_length: int) -> dict[str, Any]:
    """The architecture with defaults filled in, or a ConfigError naming the first bad key."""
    unknown = sorted(set(architecture) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise ConfigError(
            f"model.architecture has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(ARCHITECTURE_KEYS)}"
        )
    sizes: dict[str, Any] = {}
    for key in REQUIRED_KEYS:
        if key not in architecture:
            raise ConfigError(f"model.architecture.{key} is required (an integer >= 1)")
        sizes[key] = _positive_integer(architecture, key)
    if sizes["n_embd"] % sizes["n_head"]:
        raise ConfigError(
            f"model.architecture.n_embd ({sizes['n_embd']}) must be divisible by model.architecture.n_head "
            f"({sizes['n_head']}): each head gets n_embd / n_head dimensions"
        )
    sizes["intermediate_size"] = _positive_integer(architecture, "intermediate_size", 4 * sizes["n_embd"])
    sizes["context"] = _positive_integer(architecture, "context", max_length)
    if sizes["context"] < max_length:
        raise ConfigError(
            f"model.architecture.context ({sizes['context']}) must be at least model.max_length ({max_length}): "
            "the encoder has one position embedding per input token"
        )
    dropout = architecture.get("dropout", DEFAULT_DROPOUT)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"model.architecture.dropout must be a number in [0, 1), got {dropout!r}")
    sizes["dropout"] = float(dropout)
    return sizes


def _positive_integer(architecture: dict[str, Any], key: str, default: int | None = None) -> int:
    value = architecture.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.architecture.{key} must be an integer >= 1, got {value!r}")
    return value
