"""`forgeml init TASK`: an annotated starter config, generated from the schema so it never drifts."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from forgeml.config import TASKS, ForgeConfig, Section
from forgeml.errors import ConfigError

# What differs per task in a starter: the data columns and a sensible description.
STARTERS: dict[str, dict[str, Any]] = {
    "text-classification": {"data": {"train": "train.csv", "text": "text", "label": "label"}},
    "text-pair-classification": {
        "data": {"train": "train.csv", "text": "premise", "text_pair": "hypothesis", "label": "label"}
    },
    "regression": {"data": {"train": "train.csv", "text": "text", "label": "score"}},
    "tabular-classification": {"data": {"train": "train.csv", "label": "label"}},
    "tabular-regression": {"data": {"train": "train.csv", "label": "target"}},
    "language-modeling": {"data": {"train": "corpus.txt"}, "train": {"max_steps": 2000, "eval_every": 250}},
    "instruction-tuning": {
        "data": {"train": "train.jsonl", "prompt": "prompt", "response": "response"},
        "model": {"backbone": "Qwen/Qwen2.5-0.5B-Instruct"},
    },
    "masked-lm": {"data": {"train": "corpus.txt"}},
    "image-classification": {"data": {"train": "images/", "label": "label", "image_size": 32}},
    "image-generation": {"data": {"train": "images/", "image_size": 32}, "model": {"kind": "vae"}},
    "token-classification": {
        "data": {"train": "train.jsonl", "validation": "validation.jsonl", "tokens": "tokens", "label": "tags"}
    },
}
# Training settings (lr, epochs, ...) are not set here: validation fills them from the model family's
# defaults (config.FAMILY_DEFAULTS), and the comments below name the family each value came from.
TEXT_ONLY = {"text", "text_pair", "max_length", "pooling", "max_chars", "overlong"}
TABULAR_ONLY = {"features", "hidden_sizes", "categorical", "embedding_dim"}
LANGUAGE_MODEL_ONLY = {"architecture", "style", "tokenizer", "vocab_size"}
INSTRUCTION_ONLY = {"prompt", "response", "messages", "template", "packing", "loss_on", "generation"}
MASKED_LM_ONLY = {"mask_probability", "whole_word_mask"}
IMAGE_ONLY = {"image", "image_size", "augment", "width", "depths"}
TOKENS_ONLY = {"tokens"}
GENERATION_ONLY = {"kind", "latent_size", "classifier"}
# What a token-classification model cannot use yet (the config refuses it) or has no use for: whole-text
# settings (pooling, character limits, conflicting labels), stratified splits, groups of people, audits.
NOT_FOR_TAGGING = {
    "text",
    "text_pair",
    "pooling",
    "max_chars",
    "overlong",
    "conflicting_labels",
    "stratify",
    "lora",
    "sensitive",
    "pii",
    "privacy",
    "adversarial",
    "audit",
    "compress",
    "feedback",
    "cross_validation",
    "federated",
}
# What an image model cannot use yet (the config refuses it) or has no use for.
NOT_FOR_IMAGES = {"text", "lora", "sensitive", "pii", "privacy", "adversarial", "audit", "compress", "feedback"}
# What a language model has no use for: labels, row cleaning, groups of people, label-based audits.
NOT_FOR_LANGUAGE_MODELS = {
    *TABULAR_ONLY,
    "text_pair",
    "label",
    "pooling",
    "dropout",
    "clean",
    "sensitive",
    "stratify",
    "group_by_length",
    "privacy",
    "adversarial",
    "cross_validation",
    "baseline",
    "audit",
    "compress",
}


def starter_config(task: str) -> str:
    """Annotated YAML for `task`: every key with its default and what it means."""
    if task not in STARTERS:
        raise ConfigError(f"init: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    raw = {"name": task.replace("-", "_"), "task": task, **STARTERS[task]}
    config = ForgeConfig.model_validate(raw)
    if task == "token-classification":
        skip = TABULAR_ONLY | LANGUAGE_MODEL_ONLY | INSTRUCTION_ONLY | MASKED_LM_ONLY | IMAGE_ONLY | NOT_FOR_TAGGING
    elif task == "image-generation":  # a VAE or GAN from scratch: no labels to predict, nothing to audit
        skip = TEXT_ONLY | TABULAR_ONLY | LANGUAGE_MODEL_ONLY | INSTRUCTION_ONLY | MASKED_LM_ONLY | NOT_FOR_IMAGES
        skip |= {"augment", "depths", "dropout", "backbone", "cross_validation", "generation", "stratify"}
    elif task == "image-classification":
        skip = TEXT_ONLY | TABULAR_ONLY | LANGUAGE_MODEL_ONLY | INSTRUCTION_ONLY | MASKED_LM_ONLY | NOT_FOR_IMAGES
    elif task == "language-modeling":  # a new GPT: no adapters
        skip = NOT_FOR_LANGUAGE_MODELS | INSTRUCTION_ONLY | MASKED_LM_ONLY | {"lora"} | IMAGE_ONLY
    elif task == "masked-lm":  # continued pre-training of MiniLM; a new encoder would add model.architecture
        skip = NOT_FOR_LANGUAGE_MODELS | LANGUAGE_MODEL_ONLY | INSTRUCTION_ONLY | {"lora"} | IMAGE_ONLY
    elif task == "instruction-tuning":
        skip = (NOT_FOR_LANGUAGE_MODELS | LANGUAGE_MODEL_ONLY | MASKED_LM_ONLY | IMAGE_ONLY | {"text"}) - {"sample"}
    else:
        skip = (TEXT_ONLY if task.startswith("tabular") else TABULAR_ONLY) | LANGUAGE_MODEL_ONLY
        skip |= INSTRUCTION_ONLY | MASKED_LM_ONLY | IMAGE_ONLY | ({"lora"} if task.startswith("tabular") else set())
    if task != "token-classification":
        skip |= TOKENS_ONLY
    if task != "image-generation":
        skip |= GENERATION_ONLY
    header = [
        f"# forgeml config for {task}. Paths are relative to this file.",
        "# Run it with: forgeml run THIS.yaml   (override any key: train.lr=3e-5)",
        "# Every key below shows its default; delete what you do not change.",
        f"# Training keys marked 'default by model family' show the {config.family} defaults "
        f"(model.backbone {config.model.backbone}).",
    ]
    return "\n".join(header + _emit(config, 0, skip)) + "\n"


def _emit(section: BaseModel, depth: int, skip: set[str]) -> list[str]:
    lines = []
    indent = "  " * depth
    for name, field in type(section).model_fields.items():
        if name in skip:
            continue
        value = getattr(section, name)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, Section):
            lines.append(f"{indent}{name}:{comment}")
            lines += _emit(value, depth + 1, skip)
        else:
            lines.append(f"{indent}{name}: {_scalar(value)}{comment}")
    return lines


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or ":" in value or value.strip() != value else value
    if hasattr(value, "as_posix"):
        return value.name
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        # YAML 1.1 (PyYAML) reads 5e-05 as a string; 5.0e-05 is a float.
        mantissa, exponent = text.split("e")
        return f"{mantissa}.0e{exponent}"
    return text
