"""A new, randomly initialised causal language model from a nanoGPT-style architecture dict.

The model is a stock Hugging Face one (`GPT2LMHeadModel` or `LlamaForCausalLM`), so it trains,
generates, saves and loads (`AutoModelForCausalLM.from_pretrained`) with no forgeml code.

The architecture dict uses nanoGPT's names::

    {n_layer: 6, n_head: 6, n_embd: 384, context: 256, dropout: 0.2, bias: true}

`context` is nanoGPT's `block_size` (the longest sequence the model sees). Weights are drawn from
torch's global random generator: seed it (`transformers.set_seed`) for a reproducible model.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from forgeml.errors import ConfigError

MODEL_STYLES = ("gpt2", "llama")
SIZE_KEYS = ("n_layer", "n_head", "n_embd", "context")
ARCHITECTURE_KEYS = (*SIZE_KEYS, "dropout", "bias")
# LLaMA rounds its MLP width up to a multiple of 256 for 4k-wide models; 32 keeps small models close
# to 8/3 * n_embd while still giving matmul kernels whole tiles.
INTERMEDIATE_MULTIPLE = 32


def gpt_from_architecture(
    architecture: dict[str, Any],
    vocab_size: int,
    style: str = "gpt2",
    eos_token_id: int | None = None,
) -> PreTrainedModel:
    """A new causal LM (random weights) of the given `style` ("gpt2" or "llama") and sizes.

    - "gpt2": GPT-2 blocks (learnt position embeddings, LayerNorm, GELU MLP 4 * n_embd wide);
      `dropout` applies to embeddings, attention and residuals as in nanoGPT. Biases are always
      present (GPT-2's layers have no switch for them), so `bias: false` is refused.
    - "llama": LLaMA blocks (rotary positions, RMSNorm, SwiGLU MLP); `dropout` applies to attention
      only (LLaMA has no other dropout); `bias` (default false here, as in LLaMA) adds biases to the
      attention and MLP projections.

    Input and output embeddings are tied in both. `eos_token_id` (the tokenizer's end-of-text id)
    becomes the config's eos, bos and pad id, which `generate` uses to stop and to pad.
    """
    if style not in MODEL_STYLES:
        allowed = ", ".join(repr(name) for name in MODEL_STYLES)
        raise ConfigError(f"model.style must be one of {allowed}, got {style!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    sizes = validate_architecture(architecture, style)
    n_layer, n_head, n_embd, context = (sizes[key] for key in SIZE_KEYS)
    dropout, bias = sizes["dropout"], sizes["bias"]

    if style == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=4 * n_embd,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            tie_word_embeddings=True,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
        return GPT2LMHeadModel(config)

    # SwiGLU has three weight matrices where GPT-2's MLP has two; 8/3 * n_embd keeps its parameter
    # count and FLOPs equal to a 4 * n_embd two-matrix MLP (the LLaMA / PaLM choice).
    intermediate_size = INTERMEDIATE_MULTIPLE * math.ceil(8 * n_embd / 3 / INTERMEDIATE_MULTIPLE)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=context,
        attention_dropout=dropout,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return LlamaForCausalLM(config)


def parameter_count(model: PreTrainedModel, non_embedding: bool = True) -> int:
    """Number of distinct parameters (tied input/output embeddings counted once).

    With `non_embedding` (nanoGPT's default report), position-embedding tables are left out: they
    are looked up, not multiplied, so they cost no FLOPs. The token embedding stays in because, tied
    to the output layer, it is a full matmul per token. A LLaMA-style model has no position table
    (rotary positions), so both counts are equal for it.
    """
    total = sum(parameter.numel() for parameter in model.parameters())
    if not non_embedding:
        return total
    token_embedding = model.get_input_embeddings()
    position_tables = {
        id(module.weight): module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Embedding) and module is not token_embedding
    }
    return total - sum(position_tables.values())


def training_flops_per_token(model: PreTrainedModel) -> float:
    """FLOPs to train on one token (forward + backward), nanoGPT's and PaLM's (appendix B) estimate.

    6 * N for the weight matmuls (2 forward, 4 backward per non-embedding parameter N) plus
    12 * n_layer * n_embd * context for attention's scores and weighted sum over a full context
    (the causal mask's saving is ignored, as in PaLM). Sizes are read from the model's config, so it
    works for both styles; divide achieved FLOP/s by peak FLOP/s to get model FLOPs utilisation.
    """
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * config.max_position_embeddings
    return float(6 * parameter_count(model, non_embedding=True) + attention)


def validate_architecture(architecture: dict[str, Any], style: str = "gpt2") -> dict[str, Any]:
    """The architecture with defaults filled in, or a ConfigError naming the first bad key."""
    unknown = sorted(set(architecture) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise ConfigError(
            f"model.architecture has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(ARCHITECTURE_KEYS)}"
        )
    sizes: dict[str, Any] = {"dropout": 0.0, "bias": style == "gpt2"}
    for key in SIZE_KEYS:
        if key not in architecture:
            raise ConfigError(f"model.architecture.{key} is required (an integer >= 1)")
        value = architecture[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.architecture.{key} must be an integer >= 1, got {value!r}")
        sizes[key] = value
    if sizes["n_embd"] % sizes["n_head"]:
        raise ConfigError(
            f"model.architecture.n_embd ({sizes['n_embd']}) must be divisible by model.architecture.n_head "
            f"({sizes['n_head']}): each head gets n_embd / n_head dimensions"
        )
    dropout = architecture.get("dropout", sizes["dropout"])
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"model.architecture.dropout must be a number in [0, 1), got {dropout!r}")
    sizes["dropout"] = float(dropout)
    bias = architecture.get("bias", sizes["bias"])
    if not isinstance(bias, bool):
        raise ConfigError(f"model.architecture.bias must be true or false, got {bias!r}")
    if style == "gpt2" and not bias:
        raise ConfigError(
            "model.architecture.bias: false is not available with model.style 'gpt2' (GPT-2 layers always "
            "have biases); use bias: true or model.style: llama"
        )
    sizes["bias"] = bias
    return sizes
