"""The run configuration: a pydantic schema plus :func:`load_config`.

The YAML file is the user contract (see DESIGN.md). Every mistake is reported with the full key
path, the value given and what is allowed, so that a person can fix it without reading code.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forgeml.errors import ConfigError

TASKS = (
    "text-classification",
    "text-pair-classification",
    "regression",
    "tabular-classification",
    "tabular-regression",
    "language-modeling",
    "instruction-tuning",
    "masked-lm",
    "image-classification",
    "token-classification",
    "image-generation",
)
TaskName = Literal[
    "text-classification",
    "text-pair-classification",
    "regression",
    "tabular-classification",
    "tabular-regression",
    "language-modeling",
    "instruction-tuning",
    "masked-lm",
    "image-classification",
    "token-classification",
    "image-generation",
]
# Tasks that model text itself (no label): loss and perplexity are their metrics.
GENERATIVE_TASKS = ("language-modeling", "instruction-tuning", "masked-lm")
# Validation metrics early stopping can watch, and those where a smaller value is better.
CLASSIFICATION_METRICS = ("f1", "accuracy", "precision", "recall", "roc_auc", "log_loss", "loss")
REGRESSION_METRICS = ("rmse", "mae", "mse", "r2", "loss")
LANGUAGE_MODEL_METRICS = ("loss", "perplexity", "bits_per_character")
# Token classification: entity-level (seqeval, strict IOB2) precision/recall/F1, word-level tag accuracy.
TAGGING_METRICS = ("f1", "precision", "recall", "accuracy", "loss")
# Image generation: bits/dim of the VAE's negative ELBO; the Fréchet distance of samples in a classifier's features;
# a GAN without a classifier watches its step count (it only grows: the last weights are kept).
GENERATION_METRICS = ("bits_per_dim", "frechet_distance", "training_steps", "loss")
LOWER_IS_BETTER = frozenset(
    {"loss", "log_loss", "mae", "rmse", "mse", "perplexity", "bits_per_character", "bits_per_dim", "frechet_distance"}
)
# `model.backbone` naming a new causal LM / BERT-style encoder built from `model.architecture` (not a pre-trained one).
NEW_GPT = "gpt"
NEW_ENCODER = "bert"
RESNET_SMALL = "resnet_small"  # the image backbone trained from scratch
IMAGE_BACKBONES = f"{RESNET_SMALL!r} or a folder holding a pre-trained timm or torchvision checkpoint"
IMAGE_GENERATORS = ("vae", "gan")  # image-generation: model.kind (also its model.backbone and its family)
DEFAULT_LATENT_SIZE = {"vae": 64, "gan": 100}  # DCGAN's 100; a VAE on 32 x 32 images needs no more than 64
# nanoGPT's small CPU model for character-level Shakespeare ("baby GPT" scaled down).
DEFAULT_GPT_ARCHITECTURE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "context": 64, "dropout": 0.0}
DEFAULT_BPE_VOCAB = 4096

# Training settings whose best value depends on the kind of network, keyed by model family (see
# `model_family`); a `train` key left out (or null) takes its family's value. A small network trained
# from scratch on standardised columns wants a far larger step and many more passes than a pre-trained
# encoder being fine-tuned (measured in benchmarks/tabular_baselines.py, results in benchmarks/RESULTS.md).
# A GPT trained from scratch follows nanoGPT's recipe (lr 1e-3, cosine to a tenth of it, AdamW beta2 0.99,
# weight decay 0.1); a pre-trained causal LM is fine-tuned like an encoder.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # A small ResNet from scratch on augmented images: AdamW with a short warm-up and a cosine decay; early
    # stopping watches validation accuracy (the loss of an augmented model is a noisy signal).
    "cnn": {
        "lr": 2.0e-3,
        "epochs": 30,
        "batch_size": 128,
        "scheduler": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 5.0e-2,
        "early_stopping.patience": 8,
        "early_stopping.metric": "accuracy",
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
    },
    # A pre-trained CNN (a timm or torchvision checkpoint folder) fine-tuned with a new head: a quarter of the
    # from-scratch step, batches of 64 and 10 epochs (the features are learnt already), the same short warm-up,
    # cosine decay and weight decay; early stopping watches validation accuracy, as for the small ResNet.
    "cnn-pretrained": {
        "lr": 5.0e-4,
        "epochs": 10,
        "batch_size": 64,
        "scheduler": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 5.0e-2,
        "early_stopping.patience": 3,
        "early_stopping.metric": "accuracy",
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
    },
    # A convolutional VAE from scratch: Adam at 2e-3 with a cosine decay, no weight decay (the KL term already
    # regularises); early stopping watches validation bits/dim.
    "vae": {
        "lr": 2.0e-3,
        "epochs": 20,
        "batch_size": 128,
        "scheduler": "cosine",
        "warmup_ratio": 0.02,
        "weight_decay": 0.0,
        "early_stopping.patience": 4,
        "min_lr_ratio": 0.05,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
    },
    # DCGAN (Radford et al. 2016): Adam 2e-4 with beta1 0.5, batch 64, a constant rate, no weight decay.
    "gan": {
        "lr": 2.0e-4,
        "epochs": 15,
        "batch_size": 64,
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "early_stopping.patience": 5,
        "min_lr_ratio": 0.0,
        "adam_beta1": 0.5,
        "adam_beta2": 0.999,
    },
    "mlp": {
        "lr": 1.0e-3,
        "epochs": 100,
        "batch_size": 128,
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 1.0e-4,
        "early_stopping.patience": 5,
        "early_stopping.metric": "loss",
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
    },
    "encoder": {
        "lr": 5.0e-5,
        "epochs": 3,
        "batch_size": 32,
        "scheduler": "linear",
        "warmup_ratio": 0.06,
        "weight_decay": 0.01,
        "early_stopping.patience": 2,
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
    },
    "gpt": {
        "lr": 1.0e-3,
        "epochs": 10,
        "batch_size": 32,
        "scheduler": "cosine",
        "warmup_ratio": 0.05,
        "weight_decay": 0.1,
        "early_stopping.patience": 3,
        "early_stopping.metric": "loss",
        "min_lr_ratio": 0.1,
        "adam_beta2": 0.99,
    },
    "causal-lm": {
        "lr": 5.0e-5,
        "epochs": 3,
        "batch_size": 8,
        "scheduler": "linear",
        "warmup_ratio": 0.06,
        "weight_decay": 0.01,
        "early_stopping.patience": 2,
        "early_stopping.metric": "loss",
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
    },
    # A pre-trained encoder fine-tuned to tag every word (NER): a new per-token head learns from far fewer
    # examples per label than a sentence head gets, so a larger step and a longer warm-up (BERT's CoNLL-2003
    # recipe, 5e-5 for a 12-layer encoder, doubled for 6-layer MiniLM; measured in benchmarks/RESULTS.md).
    "token-encoder": {
        "lr": 1.0e-4,
        "epochs": 4,
        "batch_size": 32,
        "scheduler": "linear",
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "early_stopping.patience": 2,
        "early_stopping.metric": "f1",
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.999,
    },
    # A BERT-style encoder pre-trained from scratch with masked-LM (RoBERTa's small-model recipe, shortened).
    "bert": {
        "lr": 5.0e-4,
        "epochs": 10,
        "batch_size": 32,
        "scheduler": "linear",
        "warmup_ratio": 0.06,
        "weight_decay": 0.01,
        "early_stopping.patience": 3,
        "early_stopping.metric": "loss",
        "min_lr_ratio": 0.0,
        "adam_beta2": 0.98,
    },
}
# LoRA trains a few new low-rank matrices from zero, so it wants a larger step than full fine-tuning
# (Hu et al. 2021 used 4e-4 to 5e-4 for RoBERTa on GLUE; QLoRA 2e-4 for causal LMs); the rest is the family's.
LORA_LR = {"encoder": 5.0e-4, "causal-lm": 2.0e-4}
for _family, _lr in LORA_LR.items():
    FAMILY_DEFAULTS[f"{_family}-lora"] = {**FAMILY_DEFAULTS[_family], "lr": _lr}


def model_family(backbone: str | None, task: str | None = None, lora: bool = False) -> str:
    """The FAMILY_DEFAULTS key of a `model.backbone` for `task`: 'mlp'; 'cnn' (resnet_small) or 'cnn-pretrained'
    (an image checkpoint folder); 'gpt' (a new causal LM); 'causal-lm' (a pre-trained one); 'bert' (a new
    encoder); else a pre-trained 'encoder'. With LoRA adapters on a pre-trained model, '<family>-lora'."""
    if backbone == "mlp":
        return "mlp"
    if backbone == RESNET_SMALL:
        return "cnn"
    if task == "image-classification":
        return "cnn-pretrained"
    if task == "image-generation" and backbone in IMAGE_GENERATORS:
        return backbone
    if task == "token-classification":
        return "token-encoder"
    if task in ("language-modeling", "instruction-tuning"):
        family = "gpt" if backbone == NEW_GPT else "causal-lm"
    else:
        family = "bert" if task == "masked-lm" and backbone == NEW_ENCODER else "encoder"
    return f"{family}-lora" if lora and family in LORA_LR else family


def family_defaults_used(
    train: dict[str, Any], backbone: str | None, task: str | None = None, lora: bool = False
) -> dict[str, str]:
    """Train keys (dotted below `train`) whose value in `train` is its family's default -> the family.

    Works on plain dicts (a run's config.yaml) as on a validated config (`model_dump()`), so the card
    can say "lr 0.001 (default for mlp)" for any run directory.
    """
    family = model_family(backbone, task, lora)
    used = {}
    for key, default in FAMILY_DEFAULTS[family].items():
        value: Any = train
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and value == default:
            used[key] = family
    return used


def _family_note(key: str) -> str:
    values = ", ".join(
        f"{family} {value if isinstance(value, str) else format(value, 'g')}"
        for family, defaults in FAMILY_DEFAULTS.items()
        if (value := defaults.get(key)) is not None
        # A LoRA family is named only where it differs from its base family (the learning rate).
        and not (family.endswith("-lora") and value == FAMILY_DEFAULTS[family.removesuffix("-lora")].get(key))
    )
    return f"default by model family: {values}"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(Section):
    """How validation/test splits are carved from `train` when no file is given."""

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out for validation")
    test: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out for test")
    stratify: bool = Field(True, description="keep class proportions equal across splits")
    seed: int = 42

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitConfig:
        if self.validation + self.test >= 1.0:
            raise ValueError(
                f"data.split: validation + test must be < 1 to leave rows for training, got "
                f"{self.validation} + {self.test}"
            )
        return self


class CleanConfig(Section):
    """Cleaning applied to every split before training; counts go to data_profile.json."""

    normalize: bool = Field(True, description="Unicode NFKC and whitespace normalisation of text columns")
    drop_empty: bool = Field(True, description="drop rows whose input is empty")
    dedupe: bool = Field(True, description="drop exact duplicate rows (inputs and label)")
    conflicting_labels: Literal["flag", "drop"] = Field(
        "flag", description="same input with different labels: report it (flag) or remove every copy (drop)"
    )
    max_chars: int | None = Field(None, ge=1, description="inputs longer than this many characters are over-long")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="what to do with over-long inputs")


class PiiConfig(Section):
    """Personal data in text inputs: detect and replace it before anything is trained on it."""

    redact: bool = Field(False, description="replace emails, phones, cards, IBANs, IPs, URLs, SSNs, NI numbers")
    types: list[str] | None = Field(None, description="entity types to redact; default: all")
    style: Literal["tag", "mask"] = Field("tag", description="tag: '[EMAIL]'; mask: '*' of the same length")
    ner_model: str | None = Field(
        None,
        description="finds PERSON names: a forgeml token-classification run directory (its PER entities) or a "
        "local Hugging Face token-classification checkpoint (none is bundled)",
    )

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str] | None) -> list[str] | None:
        from forgeml.data.pii import ENTITY_TYPES

        unknown = [t for t in value or [] if t.upper() not in (*ENTITY_TYPES, "PERSON")]
        if unknown:
            raise ValueError(f"unknown PII type(s) {', '.join(unknown)}; allowed: {', '.join(ENTITY_TYPES)}, PERSON")
        return value

    @model_validator(mode="after")
    def _names_need_a_model(self) -> PiiConfig:
        if self.types and "PERSON" in [t.upper() for t in self.types] and not self.ner_model:
            raise ValueError("types: PERSON needs a NER model; set data.pii.ner_model to a token-classification model")
        return self


class FeedbackDataConfig(Section):
    """Corrections collected by `forgeml serve` added to the training split (`forgeml retrain` writes this).

    Each row of `path` (JSON lines: the input columns and the label) replaces the training rows with the
    same inputs, or is added; rows whose inputs are in the validation or test split are left out, so the
    splits a model is judged on stay as they were.
    """

    path: Path = Field(..., description="JSON lines of corrections: the input columns and the corrected label")
    weight: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="how many times each correction counts in training (copies; a fraction "
        "is a seeded chance of one more copy)",
    )
    holdout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the corrections kept out of training to evaluate on (split 'feedback')",
    )
    seed: int = Field(0, description="seed of the holdout draw and of the fractional copies")


class AugmentConfig(Section):
    """Image augmentation, drawn afresh for every training batch (off for evaluation and serving)."""

    crop_padding: int = Field(4, ge=0, le=64, description="pad each side by this many pixels, then crop back at random")
    flip: bool = Field(True, description="mirror left-right half of the time")
    jitter: float = Field(0.0, ge=0.0, lt=1.0, description="brightness, contrast, saturation scaled by 1 +- this")
    cutout: int = Field(0, ge=0, description="side of one square per image painted with the mean pixel (0: off)")
    mixup: float = Field(
        0.0,
        ge=0.0,
        description="mixup (Zhang et al. 2018): each image blended with another of its batch, weight drawn from "
        "Beta(a, a), its target mixed alike; a, e.g. 0.2 (0: off)",
    )
    cutmix: float = Field(
        0.0,
        ge=0.0,
        description="CutMix (Yun et al. 2019): a box of another image of the batch pasted in, the target mixed by "
        "its area; Beta(a, a), e.g. 1.0 (0: off). With mixup too, each batch takes one of the two at random",
    )


class DataConfig(Section):
    """Where the data is and which columns mean what. Relative paths resolve against the config file."""

    train: Path
    validation: Path | None = None
    test: Path | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "conll"] = Field(
        "auto",
        description="file format; default from the extension (.conll / .iob / .bio: CoNLL columns, token first "
        "and tag last, a blank line between sentences)",
    )
    text: str = Field("text", description="input text column (premise for NLI; the documents for language models)")
    text_pair: str | None = Field(None, description="second text column (hypothesis for NLI)")
    label: str = Field(
        "label", description="the column to predict (token-classification: the list of tags per sentence, default tags)"
    )
    tokens: str = Field("tokens", description="token-classification: the column holding each sentence's words")
    features: list[str] | None = Field(None, description="tabular input columns; default: every column but the label")
    prompt: str | None = Field(None, description="instruction tuning: the prompt column (with data.response)")
    response: str | None = Field(None, description="instruction tuning: the response column the model learns to write")
    messages: str | None = Field(
        None, description="instruction tuning: a column of conversations, each a list of {role, content}"
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="instruction tuning: 'chat' renders examples with the tokenizer's chat template (a built-in "
        "one when it has none); 'plain' joins prompt and response as they are; 'auto': chat when the tokenizer "
        "has a template or the data are messages, else plain",
    )
    packing: bool = Field(
        False, description="instruction tuning: pack short examples into full rows (no attention across examples)"
    )
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0, description="masked-lm: share of tokens to predict")
    whole_word_mask: bool = Field(False, description="masked-lm: mask every piece of a chosen word together")
    sample: dict[Literal["train", "validation", "test"], int] | None = Field(
        None, description="seeded random subset size per split, e.g. {train: 4000}"
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    sensitive: list[str] = Field(
        default_factory=list, description="columns the fairness audit compares groups by (e.g. [sex, race, age])"
    )
    image: str = Field("image", description="image-classification from a table: the column naming image files")
    image_size: int | None = Field(
        None, ge=8, le=1024, description="images: resize (shorter side) and centre-crop to this; default: as read"
    )
    augment: AugmentConfig | None = Field(
        None, description="image-classification: training-time augmentation; default crop+flip, null: none"
    )
    feedback: FeedbackDataConfig | None = Field(
        None, description="served corrections merged into the training split (set by `forgeml retrain`)"
    )

    @field_validator("sample")
    @classmethod
    def _positive_sample(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for split, size in (value or {}).items():
            if size < 1:
                raise ValueError(f"sample.{split} must be >= 1, got {size}")
        return value


class LoraConfig(Section):
    """LoRA adapters (Hu et al. 2021, with PEFT): the pre-trained weights stay frozen, low-rank updates train."""

    r: int = Field(8, ge=1, le=1024, description="rank of each update")
    alpha: float = Field(16.0, gt=0.0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None, description="names of the Linear layers to adapt; default: PEFT's choice for the architecture"
    )
    merge: bool = Field(True, description="also merge the adapter into a full model in model/ (else adapter only)")


class ModelConfig(Section):
    """The network: a pre-trained text backbone with a head, an MLP for tabular data, or a causal LM."""

    backbone: str | None = Field(
        None,
        description="'minilm' (bundled), a Hugging Face id, a local folder or a forgeml run directory (name/latest: "
        "its newest finished run), 'mlp', 'resnet_small' (images), a folder holding a pre-trained timm or "
        "torchvision checkpoint (images, relative to the config file; needs forgeml[vision]), 'gpt' (a new causal "
        "LM) or 'bert' (a new encoder), both sized by model.architecture; default: minilm for text and masked-lm, "
        "mlp for tabular, resnet_small for images, gpt for language modeling",
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="backbone gpt: nanoGPT's sizes {n_layer, n_head, n_embd, context, dropout, bias}; "
        "default {n_layer: 4, n_head: 4, n_embd: 128, context: 64}",
    )
    style: Literal["gpt2", "llama"] = Field("gpt2", description="backbone gpt: GPT-2 or Llama blocks")
    tokenizer: Literal["char", "bpe", "wordpiece", "backbone"] | None = Field(
        None,
        description="language models: 'char', 'bpe' or 'wordpiece' (masked-lm) trained on the training split, or "
        "the backbone's own; default: char for gpt, wordpiece for bert, backbone otherwise",
    )
    vocab_size: int | None = Field(
        None, ge=257, description="tokenizer bpe / wordpiece: vocabulary size (default 4096)"
    )
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of every weight (needs peft)")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per input (longer inputs are truncated)")
    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    hidden_sizes: list[int] = Field([128, 64], description="MLP hidden layer widths; [] gives a linear model")
    width: int = Field(
        32,
        ge=4,
        le=1024,
        description="resnet_small: channels of the first stage (doubling per stage); image-generation: channels of "
        "the VAE's or GAN's full-resolution layer (doubling at every halving)",
    )
    kind: Literal["vae", "gan"] | None = Field(
        None, description="image-generation (required): 'vae' (likelihood, bits/dim) or 'gan' (DCGAN)"
    )
    latent_size: int | None = Field(
        None, ge=1, le=4096, description="image-generation: numbers in the latent code; default vae 64, gan 100"
    )
    depths: list[int] = Field(
        [1, 1, 1], min_length=1, max_length=6, description="resnet_small: residual blocks in each stage"
    )
    categorical: Literal["onehot", "embedding"] = Field("onehot", description="how the MLP encodes categorical columns")
    embedding_dim: int = Field(8, ge=1, le=512, description="width of categorical embeddings")

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError(f"every hidden size must be >= 1, got {value}")
        return value


class EarlyStoppingConfig(Section):
    patience: int | None = Field(
        None,
        ge=1,
        description="evaluations without improvement before stopping; " + _family_note("early_stopping.patience"),
    )
    metric: str | None = Field(
        None,
        description="validation metric to watch; default: loss for an mlp, the task's primary metric for an encoder",
    )


class DifferentialPrivacyConfig(Section):
    """DP-SGD (Abadi et al. 2016, with Opacus): clip each example's gradient, add Gaussian noise.

    The noise is set so that the whole planned training spends at most `epsilon`; the epsilon
    actually spent (less when early stopping ends training sooner) is reported in the card.
    """

    epsilon: float = Field(..., gt=0.0, le=100.0, description="privacy budget of the whole training")
    delta: float = Field(1.0e-5, gt=0.0, lt=1.0, description="failure probability; keep it below 1 / training rows")
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example gradient clipping bound")
    accountant: Literal["prv", "rdp"] = Field("prv", description="privacy accountant (Opacus): prv is tighter")
    freeze_embeddings: bool = Field(
        True, description="freeze embedding tables (their per-example gradients cost memory and noise)"
    )


def _fraction_of(value: Any) -> Any:
    """'8/255' (as YAML gives it, a string) -> 0.0313...: attack budgets are usually written as such fractions."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*/\s*\d+(\.\d+)?\s*", value):
        numerator, denominator = (float(part) for part in value.split("/"))
        if denominator > 0:
            return numerator / denominator
    return value


ADVERSARIAL_METHODS = {"fgm": "text tasks", "pgd": "task 'image-classification'"}
PGD_EPSILON = 8 / 255  # the usual CIFAR-10 budget (Madry et al. 2018)
FGM_EPSILON = 0.2


class AdversarialConfig(Section):
    """Adversarial training: each step trains on inputs pushed against the model.

    fgm (text): the fast gradient method on the word embeddings (Miyato et al. 2017), beside the clean loss.
    pgd (images): projected gradient descent in pixel space (Madry et al. 2018); the step trains on the attacked
    images only. `steps: 1` with `step_size: 1.25 * epsilon` is "fast" FGSM adversarial training with a random
    start (Wong et al. 2020). The method defaults to the task's one.
    """

    method: Literal["fgm", "pgd"] | None = Field(
        None, description="fgm (text: word embeddings) or pgd (images: pixels); default: the task's method"
    )
    epsilon: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="fgm: L2 norm of each input's word-embedding perturbation (MiniLM's token vectors have norm "
        f"~1.1; default {FGM_EPSILON}); pgd: L-infinity budget as a fraction of the pixel range, e.g. 8/255 (default)",
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=100,
        description="pgd: attack steps per training batch, each about one more forward and "
        "backward pass (default 3; Madry et al. used 7)",
    )
    step_size: float | None = Field(
        None, gt=0.0, le=1.0, description="pgd: fraction of the pixel range per step (default 2.5 * epsilon / steps)"
    )

    @field_validator("epsilon", "step_size", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        return _fraction_of(value)

    def resolve(self, task: str) -> None:
        """Fill the method's defaults for `task` and refuse what the method cannot do, naming the key."""
        wanted = "pgd" if task == "image-classification" else "fgm"
        allowed = f"'fgm' for {ADVERSARIAL_METHODS['fgm']}, 'pgd' for {ADVERSARIAL_METHODS['pgd']}"
        if task.startswith("tabular"):
            raise ValueError(
                f"train.adversarial: needs a text task (method 'fgm') or task 'image-classification' (method "
                f"'pgd'), not {task}"
            )
        method = self.method or wanted
        if method != wanted:
            raise ValueError(
                f"train.adversarial.method: {method!r} does not work for task {task!r}; allowed: {allowed}"
            )
        if method == "fgm":
            for key in ("steps", "step_size"):
                if getattr(self, key) is not None:
                    raise ValueError(f"train.adversarial.{key}: is for method 'pgd' (images); method is 'fgm'")
            self.epsilon = self.epsilon or FGM_EPSILON
        else:
            self.epsilon = self.epsilon or PGD_EPSILON
            if self.epsilon > 1.0:
                raise ValueError(
                    "train.adversarial.epsilon: for method 'pgd' a fraction of the pixel range in (0, 1], e.g. 8/255 "
                    f"(= 0.0314); got {self.epsilon}"
                )
            self.steps = self.steps or 3
            self.step_size = self.step_size or 2.5 * self.epsilon / self.steps
        self.method = method


class TrainConfig(Section):
    """Optimisation. One readable loop (train/loop.py) uses every field here.

    Keys left null take the model family's value from FAMILY_DEFAULTS when the whole config is
    validated (`ForgeConfig`), so a loaded config always holds concrete numbers.
    """

    epochs: int | None = Field(None, ge=1, le=10_000, description="maximum passes; " + _family_note("epochs"))
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int | None = Field(None, ge=1, description=_family_note("batch_size"))
    eval_batch_size: int = Field(64, ge=1)
    lr: float | None = Field(None, gt=0.0, le=10.0, description="peak learning rate; " + _family_note("lr"))
    min_lr_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="the schedule decays to lr * this; " + _family_note("min_lr_ratio")
    )
    adam_beta1: float | None = Field(
        None, ge=0.0, lt=1.0, description="AdamW beta1 (0.9 unless the family says otherwise: gan 0.5)"
    )
    adam_beta2: float | None = Field(None, gt=0.0, lt=1.0, description="AdamW beta2; " + _family_note("adam_beta2"))
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    scheduler: Literal["linear", "cosine", "constant"] | None = Field(
        None, description="learning-rate decay after warm-up; " + _family_note("scheduler")
    )
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="share of steps warming up; " + _family_note("warmup_ratio")
    )
    weight_decay: float | None = Field(None, ge=0.0, description=_family_note("weight_decay"))
    l1: float = Field(0.0, ge=0.0, description="L1 penalty on weights (not biases or norms)")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; null disables")
    grad_accum_steps: int = Field(1, ge=1)
    group_by_length: bool = Field(True, description="batch inputs of similar length together (less padding)")
    early_stopping: EarlyStoppingConfig | None = Field(default_factory=EarlyStoppingConfig)
    eval_every: int | None = Field(None, ge=1, description="evaluate every N optimizer steps; default once per epoch")
    eval_batches: int | None = Field(
        None,
        ge=1,
        description="evaluations during training score this many validation batches (the same seeded rows each "
        "time); the final report scores the whole split. Default: all of it",
    )
    checkpoint_every: int = Field(200, ge=1, description="save a resumable checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 42
    loss_on: Literal["response", "all"] = Field(
        "response", description="instruction tuning: learn from response tokens only, or from prompts as well"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads; default: torch's choice")
    compile: bool = Field(
        False,
        description="compile the training forward and backward with torch.compile: faster steps for fixed-shape "
        "batches (language-model blocks) after a one-off compilation (about 30 s, a few seconds once cached)",
    )
    privacy: DifferentialPrivacyConfig | None = Field(None, description="differentially private training (DP-SGD)")
    adversarial: AdversarialConfig | None = Field(None, description="adversarial training on word embeddings")

    def fill_family_defaults(self, family: str) -> TrainConfig:
        """Keys left null take `family`'s value from FAMILY_DEFAULTS; values the user gave stay. Returns self."""
        for key, value in FAMILY_DEFAULTS[family].items():
            *parents, name = key.split(".")
            section: Any = self
            for part in parents:
                section = getattr(section, part)
            if section is not None and getattr(section, name) is None:
                setattr(section, name, value)
        return self


class GenerationEvalConfig(Section):
    """Instruction tuning: generate an answer to each test prompt and score it against the reference response."""

    enabled: bool = True
    metric: Literal["exact_match", "contains", "rouge_l"] = Field(
        "exact_match",
        description="exact_match: same text (trimmed, case-folded); contains: the reference occurs in the answer; "
        "rouge_l: longest-common-subsequence F1 over words",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096)
    max_examples: int | None = Field(500, ge=1, description="test prompts answered (seeded choice); null: all")


class EvaluateConfig(Section):
    cross_validation: int | None = Field(None, ge=2, le=50, description="k for stratified k-fold; null disables")
    batch_size: int = Field(64, ge=1)
    baseline: bool = Field(
        True,
        description="also fit simple baselines on the same splits (majority class or mean; TF-IDF or linear "
        "model + logistic/ridge regression) and show their scores beside the model's",
    )
    generation: GenerationEvalConfig | None = Field(
        None, description="instruction tuning: answers generated for test prompts and scored (on by default)"
    )
    classifier: str | None = Field(
        None,
        description="image-generation: a finished image-classification run directory (relative to the workspace, "
        "like a run-directory backbone; NAME/latest: its newest run) whose penultimate features measure the "
        "Fréchet distance of samples, with its confidence on them; null: no Fréchet distance",
    )


class FairnessAuditConfig(Section):
    """Group metrics over `data.sensitive` columns, optional threshold mitigation, identity swaps for text."""

    enabled: bool = True
    positive_label: str | None = Field(
        None, description="the favourable class; default: the last class in sorted order ('1', 'positive', '>50K')"
    )
    bins: int = Field(4, ge=2, le=20, description="numeric sensitive columns are cut into this many quantile bins")
    bootstrap: int = Field(200, ge=0, le=5000, description="bootstrap resamples for 95 % intervals (0 disables)")
    mitigate: Literal["demographic_parity", "equalized_odds"] | None = Field(
        None, description="fit per-group thresholds (Fairlearn ThresholdOptimizer) on validation predictions"
    )
    mitigate_on: str | None = Field(None, description="sensitive column the thresholds use; default: the first")
    counterfactual: bool = Field(True, description="text tasks: swap identity terms and count flipped predictions")
    max_examples: int = Field(500, ge=10, description="texts used by the identity-swap test")


class PrivacyAuditConfig(Section):
    """Membership inference: can an attacker tell training rows from unseen rows by the model's loss?"""

    enabled: bool = True
    max_examples: int = Field(2000, ge=20, description="members and non-members compared (each)")
    bootstrap: int = Field(200, ge=0, le=5000)


class RobustnessAuditConfig(Section):
    """How predictions hold up under typos, case and punctuation changes, word swaps, or numeric noise."""

    enabled: bool = True
    rates: list[float] = Field([0.1, 0.3], description="text: share of words perturbed")
    sigmas: list[float] = Field([0.1, 0.3, 0.5], description="tabular: Gaussian noise in training standard deviations")
    max_examples: int = Field(500, ge=10, description="rows scored under each perturbation")
    attack_examples: int = Field(50, ge=0, description="text: rows given the word-substitution attack (0 skips it)")
    epsilons: list[float] = Field(
        [1 / 255, 2 / 255, 4 / 255, 8 / 255],
        description="images: L-infinity budgets of the FGSM and PGD attacks, as fractions of the pixel range "
        "(8/255 may be written as such)",
    )
    pgd_steps: int = Field(10, ge=1, le=1000, description="images: steps of the PGD attack (random start)")
    baseline: str | None = Field(
        None,
        description="a run directory whose model gets the same probes, for a before/after table "
        "(e.g. the same recipe without train.adversarial)",
    )

    @field_validator("rates", "sigmas")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 or v > 5 for v in value):
            raise ValueError(f"each value must be > 0 (and at most 5), got {value}")
        return value

    @field_validator("epsilons", mode="before")
    @classmethod
    def _pixel_fractions(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        value = [_fraction_of(v) for v in value]
        if not value or any(not isinstance(v, int | float) or v <= 0 or v > 1 for v in value):
            raise ValueError(f"each value must be a fraction of the pixel range in (0, 1], e.g. 8/255; got {value}")
        return sorted(float(v) for v in value)


class AuditConfig(Section):
    """Trust audits run after evaluation; each writes JSON and plots under trust/ and a card section."""

    fairness: FairnessAuditConfig = Field(default_factory=FairnessAuditConfig)
    privacy: PrivacyAuditConfig = Field(default_factory=PrivacyAuditConfig)
    robustness: RobustnessAuditConfig = Field(default_factory=RobustnessAuditConfig)
    explain: int = Field(
        8, ge=0, le=500, description="examples explained in the card (from the validation split, else test; 0 disables)"
    )
    memorization: dict[str, Any] | None = Field(
        None,
        description="language models: canary exposure (canaries inserted into the training text), verbatim "
        "extraction and membership inference, e.g. {canaries: {count: 4, repetitions: [1, 5, 20]}}; {} for defaults",
    )

    @field_validator("memorization")
    @classmethod
    def _memorization_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from forgeml.trust.memorization import resolve_options  # names the bad key and what is allowed

        resolve_options(value)
        return value

    @field_validator("fairness", "privacy", "robustness", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """`fairness: false` is short for `fairness: {enabled: false}`."""
        return {"enabled": value} if isinstance(value, bool) else value


class CompressSelectConfig(Section):
    max_accuracy_drop: float = Field(
        0.01, ge=0.0, le=1.0, description="serve the fastest variant at most this far below the original"
    )
    require_parity: bool = Field(
        True,
        description="serve an int8 file only if it gives its PyTorch model's label on >= 99 % of rows "
        "(false: the accuracy tolerance alone decides)",
    )


class DistillConfig(Section):
    """A student with fewer of the teacher's transformer layers, trained on the teacher's softened logits."""

    layers: int = Field(3, ge=1, description="transformer layers the student keeps (evenly spaced)")
    epochs: int = Field(1, ge=1, le=100)
    lr: float = Field(1.0e-4, gt=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="softens both models' logits")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the teacher's answers (the rest: labels)")


class PruneConfig(Section):
    """Pruned variants, each followed by a short recovery fine-tune on the original model's answers."""

    sparsity: float | None = Field(0.5, gt=0.0, lt=1.0, description="unstructured: share of Linear weights zeroed")
    ffn_keep: float | None = Field(
        0.5, gt=0.0, lt=1.0, description="structured (text): share of feed-forward neurons kept in each layer"
    )
    heads_keep: float | None = Field(
        0.5, gt=0.0, lt=1.0, description="structured (text): share of attention heads kept in each layer"
    )
    epochs: int = Field(1, ge=1, le=100, description="recovery fine-tune epochs")
    lr: float = Field(1.0e-4, gt=0.0, le=1.0)


class CompressConfig(Section):
    """Smaller, faster variants of the model, compared on the test split (`forgeml compress`)."""

    quantize: bool = Field(True, description="int8 variants: PyTorch dynamic and ONNX Runtime dynamic")
    distill: DistillConfig | None = Field(None, description="text classifiers: a distilled shallower student")
    prune: PruneConfig | None = Field(None, description="classifiers: magnitude- and neuron-pruned variants")
    select: CompressSelectConfig = Field(default_factory=CompressSelectConfig)
    latency_rows: int = Field(100, ge=1, description="single-row calls timed for the batch-1 latency")
    throughput_rows: int = Field(512, ge=1, description="rows timed in batches of 32 for throughput")


class ServeConfig(Section):
    """How `forgeml serve` answers: where it listens, how it batches, what it accepts."""

    host: str = Field("127.0.0.1", description="address to bind; anything but loopback needs API keys")
    port: int = Field(8000, ge=1, le=65535)
    engine: Literal["auto", "onnx", "onnx_fp32", "pytorch"] = Field(
        "auto",
        description="auto: the variant `forgeml compress` selected; onnx: the int8 ONNX export (per-token "
        "scales: an answer does not depend on the batch); onnx_fp32: the fp32 export; pytorch: the trained model",
    )
    max_batch: int = Field(32, ge=1, le=1024, description="records scored together in one model call")
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="how long a batch waits to fill up")
    workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="batches scored at once, each on its own inference thread; default: one per CPU core for "
        "ONNX engines (each session single-threaded), 1 for PyTorch (each call uses every core)",
    )
    max_inputs: int = Field(64, ge=1, le=10_000, description="records per request (413 beyond)")
    max_chars: int = Field(10_000, ge=1, description="characters per text (413 beyond)")
    max_body_bytes: int = Field(1 << 20, ge=1_024, description="request body size (413 beyond)")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="image models: width x height of one uploaded image (413 beyond)"
    )
    rate_limit: float | None = Field(
        None, gt=0.0, description="requests per minute per API key (429 beyond); null: no limit"
    )
    rate_burst: int | None = Field(
        None, ge=1, description="requests a key may send at once; default: ten seconds' worth of rate_limit"
    )
    explain_steps: int = Field(20, ge=1, le=500, description="integration steps for /v1/explain")
    drift_every_s: float | None = Field(
        None,
        gt=0.0,
        description="check the newest drift_window served inputs against the training data this "
        "often, in the background, for /metrics (forgeml_drift_*); null: off",
    )
    drift_window: int = Field(500, ge=20, le=100_000, description="served rows per background drift check")
    reload_poll_s: float = Field(
        2.0,
        ge=0.0,
        description="served by NAME@ALIAS: how often to check whether the alias moved (0: only on "
        "POST /v1/admin/reload)",
    )
    # Language models (completions and chat); max_batch is the number of sequences decoding together.
    max_queue: int = Field(64, ge=0, le=100_000, description="requests waiting for a decoding slot (429 beyond)")
    max_prompt_tokens: int = Field(4_096, ge=1, description="prompt tokens per request (413 beyond)")
    max_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for (422 beyond)")
    max_n: int = Field(4, ge=1, le=64, description="largest n (choices per request) a request may ask for")
    max_stop: int = Field(4, ge=0, le=64, description="stop strings per request (OpenAI allows 4)")
    request_timeout_s: float = Field(
        300.0, gt=0.0, description="a generation still running after this long ends with finish_reason length"
    )
    token_rate_limit: float | None = Field(
        None, gt=0.0, description="tokens (prompt + max_tokens) per minute per API key (429 beyond); null: no limit"
    )
    drain_s: float = Field(
        10.0, ge=0.0, description="on shutdown, how long running generations may go on before they are cut short"
    )


class GateConfig(Section):
    """When a candidate may replace a model under a protected alias (`forgeml models promote`).

    The candidate and the current holder are scored on the same fixed test split: McNemar's exact test
    on paired correctness for classification (Dietterich 1998), a paired bootstrap of the metric's
    difference for regression. Each regression limit applies when both runs measured it.
    """

    min_gain: float = Field(
        0.0, ge=0.0, description="smallest improvement of the primary metric (accuracy, or RMSE lower by) to promote"
    )
    alpha: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="significance level of the one-sided paired test: the chance of "
        "promoting a candidate that is not better",
    )
    max_fairness_regression: float | None = Field(
        0.05, ge=0.0, description="largest rise of any group's demographic parity difference; null: not checked"
    )
    max_robustness_regression: float | None = Field(
        0.05, ge=0.0, description="largest rise of the worst robustness flip rate (or mean change); null: not checked"
    )
    max_latency_regression: float | None = Field(
        0.25, ge=0.0, description="largest relative rise of the served variant's batch-1 latency (0.25: 25 % slower)"
    )
    bootstrap: int = Field(2_000, ge=100, le=100_000, description="resamples of the paired bootstrap")
    protected: list[str] = Field(
        default_factory=lambda: ["champion"], description="aliases that move only through the gate (or --force)"
    )


class SearchRange(Section):
    """Where `forgeml tune` looks for one config key's value: a float or int range, or a list of choices."""

    type: Literal["float", "int", "choice"] = Field(description="float | int (a range) or choice (a list)")
    low: float | None = Field(None, description="float/int: smallest value")
    high: float | None = Field(None, description="float/int: largest value")
    log: bool = Field(False, description="float/int: search on a log scale (learning rates, widths)")
    step: float | None = Field(None, gt=0, description="float/int: only multiples of this above low")
    values: list[Any] | None = Field(None, description="choice: the values to choose from")

    @model_validator(mode="after")
    def _complete(self) -> SearchRange:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty list of values")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a choice takes values only (low, high, log and step are for float and int)")
            return self
        if self.values is not None:
            raise ValueError(f"values: for type choice; a {self.type} range takes low and high")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} range needs low < high, got low={self.low!r}, high={self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: a log-scale range needs low > 0, got {self.low!r}")
        if self.log and self.step is not None:
            raise ValueError("step: a log-scale range cannot also have a step")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("an int range needs whole numbers for low, high and step")
        return self


class TuneConfig(Section):
    """A hyper-parameter search over config keys (`forgeml tune`): an Optuna study in the workspace database,
    so any number of worker processes, on any machine that reaches the database, share it."""

    space: dict[str, SearchRange] = Field(
        min_length=1, description="config key path -> its range, e.g. train.lr: {type: float, low: 1e-4, high: 1e-2}"
    )
    study: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="study name; default: the run name"
    )
    trials: int = Field(20, ge=1, le=100_000, description="trials this worker runs (forgeml tune --trials)")
    sampler: Literal["tpe", "random", "grid", "cmaes"] = Field(
        "tpe", description="tpe (default), random, grid (choices and stepped ranges only), cmaes (ranges only)"
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stop trials whose validation metric lags: median, hyperband or none"
    )
    startup_trials: int = Field(
        5, ge=0, description="trials before TPE models the space and before the median pruner prunes"
    )
    start_from_config: bool = Field(
        True, description="the first trial of a new study tries the config's own values (where they lie in the space)"
    )
    prune_after: int = Field(
        2, ge=0, description="validations a trial always gets before it may be pruned (early epochs mislead)"
    )
    metric: str | None = Field(None, description="validation metric to optimise; default: the task's primary metric")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: inferred from the metric")
    seed: int = Field(42, description="sampler seed of the worker that creates the study (others draw their own)")
    timeout_s: float | None = Field(None, gt=0, description="this worker stops starting trials after this long")
    heartbeat_s: int = Field(
        30, ge=1, description="a running trial's heartbeat; a trial silent for 2x this (a killed worker) is failed"
    )

    @model_validator(mode="after")
    def _space_fits_sampler(self) -> TuneConfig:
        for key in self.space:
            if key.split(".")[0] in ("name", "task", "tune", "data"):
                raise ValueError(
                    f"tune.space.{key}: {key.split('.')[0]} is not tuned (it defines the run and its data)"
                )
        if self.sampler == "grid":
            continuous = [k for k, r in self.space.items() if r.type == "float" and r.step is None]
            if continuous:
                raise ValueError(
                    f"tune.space.{continuous[0]}: the grid sampler needs finite values: give a step or use a choice"
                )
        if self.sampler == "cmaes":
            choices = [k for k, r in self.space.items() if r.type == "choice"]
            if choices:
                raise ValueError(f"tune.space.{choices[0]}: CMA-ES searches ranges only; use tpe for choices")
        return self


class TrackingConfig(Section):
    """Where else a run is logged. Nothing is sent anywhere unless set."""

    mlflow: str | None = Field(
        None, description="MLflow tracking URI (file:./mlruns or http://host:5000); needs forgeml[mlflow]"
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the run name")


class FederatedPrivacyConfig(Section):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each client's update is clipped,
    Gaussian noise is added to their average, and Flower's RDP accountant reports the epsilon spent. It
    protects whether a whole client took part, not single rows."""

    noise_multiplier: float = Field(
        1.0, gt=0.0, le=100.0, description="noise standard deviation on the sum of updates, in clipping norms"
    )
    clipping_norm: float = Field(
        1.0, gt=0.0, description="largest L2 norm of one client's update (its weights minus the global ones)"
    )
    delta: float = Field(1.0e-5, gt=0.0, lt=1.0, description="the reported epsilon holds at this delta")


class EnsembleConfig(Section):
    """Finished runs fused into one model instead of training one (`forgeml ensemble RUN...` writes this).

    The members must solve this config's task with the same labels on the same data (equal `data:`
    sections); the ensemble is scored on those splits. `stack` fits a logistic (ridge, for a number)
    regression on the members' validation outputs."""

    members: list[str] = Field(..., min_length=2, description="run directories (or runs/NAME/latest) to combine")
    method: Literal["mean", "vote", "stack"] = Field(
        "mean",
        description="mean: average the probabilities (values); vote: majority label; stack: fitted on validation",
    )


class FederatedConfig(Section):
    """Federated training simulated with Flower: the training data split among clients that never pool it,
    each training locally on its share; Flower's FedAvg or FedProx combines their weights round by round.
    `train` sets each client's local optimizer (its epochs are federated.local_epochs)."""

    clients: int | None = Field(
        None, ge=2, le=10_000, description="Dirichlet split: how many clients (default 10); unused with by_column"
    )
    alpha: float = Field(
        0.5, gt=0.0, le=1_000.0, description="Dirichlet concentration of each client's label mix: small = non-IID"
    )
    by_column: str | None = Field(
        None, description="one client per value of this column (a hospital, a region) instead of a Dirichlet split"
    )
    strategy: Literal["fedavg", "fedprox"] = Field("fedavg", description="fedavg or fedprox (FedAvg + proximal term)")
    proximal_mu: float | None = Field(
        None, ge=0.0, description="FedProx: weight of mu/2 * ||w - w_global||^2 in each client's loss (default 0.01)"
    )
    rounds: int = Field(20, ge=1, le=10_000, description="federated rounds (each: local training, then averaging)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of clients sampled to train in each round")
    local_epochs: int = Field(1, ge=1, le=1_000, description="passes over its own rows a client makes per round")
    min_client_rows: int = Field(10, ge=1, description="a Dirichlet split is redrawn until every client has this many")
    privacy: FederatedPrivacyConfig | None = Field(None, description="client-level differential privacy")
    seed: int | None = Field(None, description="seed of the split and of client sampling; default: train.seed")

    @model_validator(mode="after")
    def _consistent(self) -> FederatedConfig:
        if self.by_column and self.clients is not None:
            raise ValueError(
                "federated.clients: by_column makes one client per value of the column; remove clients (or by_column)"
            )
        if self.strategy == "fedavg" and self.proximal_mu is not None:
            raise ValueError("federated.proximal_mu: is for strategy fedprox; strategy is fedavg")
        if self.strategy == "fedprox" and self.proximal_mu is None:
            self.proximal_mu = 0.01
        if self.clients is None and not self.by_column:
            self.clients = 10
        return self


class ForgeConfig(Section):
    """A whole run: one YAML file."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name (folder under runs/)")
    description: str = Field("", description="intended use; goes into the model card")
    task: TaskName
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    audit: AuditConfig | None = Field(None, description="trust audits after evaluation; null skips them")
    compress: CompressConfig | None = Field(None, description="compressed variants after the audits; null skips")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    tune: TuneConfig | None = Field(None, description="hyper-parameter search (forgeml tune); a run ignores it")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    federated: FederatedConfig | None = Field(
        None, description="federated training simulated with Flower (needs forgeml[federated]); null: one dataset"
    )
    ensemble: EnsembleConfig | None = Field(
        None, description="combine finished runs (ensemble.members) instead of training a model; null: train one"
    )

    @model_validator(mode="after")
    def _backbone_fits_task(self) -> ForgeConfig:
        if self.task in GENERATIVE_TASKS:
            checks = {
                "language-modeling": self._check_language_modeling,
                "instruction-tuning": self._check_instruction_tuning,
                "masked-lm": self._check_masked_lm,
            }
            checks[self.task]()
            self._refuse_for_generative()
            allowed = LANGUAGE_MODEL_METRICS if self.task == "language-modeling" else LANGUAGE_MODEL_METRICS[:2]
        elif self.task == "image-classification":
            self._check_image_classification()
            allowed = CLASSIFICATION_METRICS
        elif self.task == "token-classification":
            self._check_token_classification()
            allowed = TAGGING_METRICS
        elif self.task == "image-generation":
            self._check_image_generation()
            allowed = GENERATION_METRICS
        else:
            self._check_predictive_backbone()
            allowed = CLASSIFICATION_METRICS if self.is_classification else REGRESSION_METRICS
        if self.task != "image-generation":
            generation_keys = (
                ("model.kind", self.model.kind),
                ("model.latent_size", self.model.latent_size),
                ("evaluate.classifier", self.evaluate.classifier),
            )
            for key, value in generation_keys:
                if value is not None:
                    raise ValueError(f"{key}: is for task 'image-generation'; task is {self.task!r}")
        if self.model.lora and self.model.backbone in ("mlp", NEW_GPT, NEW_ENCODER):
            raise ValueError(
                f"model.lora: adapters go on a pre-trained model; backbone {self.model.backbone!r} is built new "
                "here, so train all of it (remove model.lora)"
            )
        if (
            self.model.lora
            and not self.model.lora.merge
            and self.task not in ("language-modeling", "instruction-tuning")
        ):
            raise ValueError(
                f"model.lora.merge: false keeps a causal LM as adapter only; a {self.task} model is always saved "
                "merged (the adapter is saved beside it as well)"
            )
        self.train.fill_family_defaults(self.family)
        stopping = self.train.early_stopping
        if stopping and stopping.metric and stopping.metric not in allowed:
            raise ValueError(
                f"train.early_stopping.metric: {stopping.metric!r} is not a {self.task} metric; "
                f"choose one of {', '.join(allowed)}"
            )
        fairness = self.audit.fairness if self.audit else None
        if fairness and fairness.mitigate_on and fairness.mitigate_on not in self.data.sensitive:
            raise ValueError(
                f"audit.fairness.mitigate_on: {fairness.mitigate_on!r} is not one of data.sensitive "
                f"({', '.join(self.data.sensitive) or 'empty'})"
            )
        self._check_training_modes()
        self._check_federated()
        self._check_ensemble()
        if self.task == "text-pair-classification" and not self.data.text_pair:
            raise ValueError("data.text_pair: task 'text-pair-classification' needs a second text column")
        return self

    def _check_image_classification(self) -> None:
        """A CNN from scratch on images, or a pre-trained network from a checkpoint folder (found by
        `_resolve_paths`, which knows the config file's folder); augmentation on by default; what is built for
        text and tables is refused."""
        model, data = self.model, self.data
        if model.backbone is None:
            model.backbone = RESNET_SMALL
        if model.backbone != RESNET_SMALL:
            if not model.backbone.strip():
                raise ValueError(f"model.backbone: task 'image-classification' needs {IMAGE_BACKBONES}, got ''")
            # Compared with the defaults rather than asked whether set: a saved run's config.yaml lists every key.
            for key in ("width", "depths", "dropout"):
                if getattr(model, key) != ModelConfig.model_fields[key].default:
                    raise ValueError(
                        f"model.{key}: is for backbone {RESNET_SMALL!r}; the pre-trained network in "
                        f"{model.backbone!r} keeps its own layers (remove model.{key})"
                    )
        if "augment" not in data.model_fields_set:
            data.augment = AugmentConfig()
        if any(d < 1 for d in model.depths):
            raise ValueError(f"model.depths: every stage needs at least one block, got {model.depths}")
        refused = [
            ("compress", self.compress),
            ("train.privacy", self.train.privacy),  # Opacus cannot clip per example through batch norm
            ("data.sensitive", data.sensitive),
            ("data.text_pair", data.text_pair),
            ("data.features", data.features),
            ("data.feedback", data.feedback),
            ("model.lora", model.lora),
            ("evaluate.generation", self.evaluate.generation),
        ]
        for key, value in refused:
            if value:
                raise ValueError(f"{key}: not available for task 'image-classification' yet; remove it")

    def _check_image_generation(self) -> None:
        """A VAE or a DCGAN from scratch on images; model.kind picks it (and its training defaults); what
        predicts labels (audits, compression, export) is refused."""
        model, data = self.model, self.data
        if model.kind is None:
            raise ValueError("model.kind: task 'image-generation' needs 'vae' or 'gan'")
        if model.backbone not in (None, model.kind):
            raise ValueError(
                f"model.backbone: task 'image-generation' builds its network from model.kind ({model.kind!r}); "
                f"remove model.backbone (got {model.backbone!r})"
            )
        model.backbone = model.kind  # the family whose training defaults apply
        model.latent_size = model.latent_size or DEFAULT_LATENT_SIZE[model.kind]
        if model.kind == "gan" and "max_grad_norm" not in self.train.model_fields_set:
            # DCGAN clips nothing, and one clip over both players' gradients would tie their step sizes together.
            self.train.max_grad_norm = None
        refused = [
            ("audit", self.audit),
            ("compress", self.compress),
            ("evaluate.cross_validation", self.evaluate.cross_validation),
            ("evaluate.generation", self.evaluate.generation),
            ("train.privacy", self.train.privacy),
            ("train.adversarial", self.train.adversarial),
            ("data.augment", data.augment),
            ("data.sensitive", data.sensitive),
            ("data.text_pair", data.text_pair),
            ("data.features", data.features),
            ("data.feedback", data.feedback),
            ("model.lora", model.lora),
            ("model.architecture", model.architecture),
        ]
        for key, value in refused:
            if value:
                raise ValueError(f"{key}: not available for task 'image-generation'; remove it")

    def _check_token_classification(self) -> None:
        """A pre-trained encoder (MiniLM by default) tags each word; the tags column defaults to `tags`; what is
        built for whole texts, tables, images and language models is refused."""
        model, data = self.model, self.data
        if "label" not in data.model_fields_set:
            data.label = "tags"  # JSON lines {"tokens": [...], "tags": [...]}, as CoNLL-2003 and HF datasets ship
        if model.backbone is None:
            model.backbone = "minilm"
        if model.backbone in ("mlp", NEW_GPT, NEW_ENCODER, RESNET_SMALL):
            raise ValueError(
                "model.backbone: task 'token-classification' fine-tunes a pre-trained encoder: 'minilm', a Hugging "
                f"Face id, a local folder or a masked-lm run directory, got {model.backbone!r}"
            )
        if model.architecture or model.tokenizer or model.vocab_size:
            key = "architecture" if model.architecture else "tokenizer" if model.tokenizer else "vocab_size"
            raise ValueError(f"model.{key}: a pre-trained encoder keeps its own sizes and tokenizer; remove it")
        if data.tokens == data.label:
            raise ValueError(
                f"data.tokens and data.label: the words and the tags need two columns, both are {data.label!r}"
            )
        refused = [
            ("data.text_pair", data.text_pair),
            ("data.features", data.features),
            ("data.prompt", data.prompt),
            ("data.response", data.response),
            ("data.messages", data.messages),
            ("data.packing", data.packing),
            ("data.augment", data.augment),
            ("data.image_size", data.image_size),
            ("data.sensitive", data.sensitive),
            ("data.feedback", data.feedback),
            # Redaction rewrites words, and tags belong to words: redact the data before it is tagged.
            ("data.pii.redact", data.pii.redact),
            ("model.lora", model.lora),
            ("audit", self.audit),
            ("compress", self.compress),
            ("federated", self.federated),
            ("evaluate.cross_validation", self.evaluate.cross_validation),
            ("evaluate.generation", self.evaluate.generation),
            ("train.privacy", self.train.privacy),
            ("train.adversarial", self.train.adversarial),
        ]
        for key, value in refused:
            if value:
                raise ValueError(f"{key}: not available for task 'token-classification' yet; remove it")

    def _check_predictive_backbone(self) -> None:
        """An encoder for text tasks, an MLP for tabular ones; the language-model keys are refused."""
        tabular = self.task.startswith("tabular")
        if self.model.backbone is None:
            self.model.backbone = "mlp" if tabular else "minilm"
        if self.model.backbone == NEW_GPT or self.model.architecture or self.model.tokenizer or self.model.vocab_size:
            raise ValueError(
                f"model.backbone gpt, model.architecture, model.tokenizer and model.vocab_size are for task "
                f"'language-modeling'; task is {self.task!r}"
            )
        data = self.data
        for key in ("prompt", "response", "messages"):
            if getattr(data, key):
                raise ValueError(f"data.{key}: is for task 'instruction-tuning'; task is {self.task!r}")
        if data.packing or data.template != "auto" or self.evaluate.generation:
            key = (
                "data.packing"
                if data.packing
                else "data.template"
                if data.template != "auto"
                else "evaluate.generation"
            )
            raise ValueError(f"{key}: is for task 'instruction-tuning'; task is {self.task!r}")
        if self.audit and self.audit.memorization is not None:
            raise ValueError(f"audit.memorization: is for task 'language-modeling'; task is {self.task!r}")
        if data.augment or data.image_size or self.model.backbone == RESNET_SMALL:
            key = "data.augment" if data.augment else "data.image_size" if data.image_size else "model.backbone"
            raise ValueError(f"{key}: is for task 'image-classification'; task is {self.task!r}")
        if tabular and self.model.backbone != "mlp":
            raise ValueError(f"model.backbone: task {self.task!r} needs 'mlp', got {self.model.backbone!r}")
        if not tabular and self.model.backbone == "mlp":
            raise ValueError(f"model.backbone: 'mlp' works for tabular tasks only; task is {self.task!r}")

    def _check_language_modeling(self) -> None:
        """Backbone, architecture and tokenizer of a causal LM; what does not apply to one is refused."""
        model = self.model
        if model.backbone is None:
            model.backbone = NEW_GPT
        if model.backbone in ("mlp", "minilm"):
            raise ValueError(
                f"model.backbone: task 'language-modeling' needs 'gpt' (a new model) or a causal LM "
                f"(Hugging Face id or local folder), got {model.backbone!r}"
            )
        if model.backbone == NEW_GPT:
            model.architecture = {**DEFAULT_GPT_ARCHITECTURE, **(model.architecture or {})}
            from forgeml.models.gpt import validate_architecture  # names the bad key and what is allowed

            validate_architecture(model.architecture, model.style)
            model.tokenizer = model.tokenizer or "char"
            if model.tokenizer == "backbone":
                raise ValueError("model.tokenizer: a new gpt has no backbone tokenizer; use char or bpe")
        else:
            self._keep_backbone_tokenizer(NEW_GPT, "causal LM")
        if model.tokenizer == "wordpiece":
            raise ValueError("model.tokenizer: wordpiece is for masked-lm encoders; a gpt uses char or bpe")
        memorization = self.audit.memorization if self.audit else None
        if memorization is not None and model.tokenizer == "char":  # a canary must fit the context to be scored
            from forgeml.trust.memorization import resolve_options

            canaries = resolve_options(memorization)["canaries"]
            length = len(canaries["prefix"]) + 2 * canaries["digits"] - 1  # "my secret number is 4 8 1 ..."
            if canaries["count"] and length + 1 > self.block_size:
                raise ValueError(
                    f"audit.memorization.canaries: a canary is {length} characters, longer than the model's context "
                    f"of {self.block_size} minus one; use fewer digits or a shorter prefix"
                )
        self._check_vocab_size()

    def _check_instruction_tuning(self) -> None:
        """A pre-trained causal LM with its own tokenizer; prompt + response columns or a messages column."""
        model, data = self.model, self.data
        if model.backbone in (None, "mlp", "minilm", NEW_GPT):
            raise ValueError(
                "model.backbone: task 'instruction-tuning' fine-tunes a pre-trained causal LM; give its Hugging Face "
                f"id, a local folder or a language-modeling run directory, got {model.backbone!r}"
            )
        if model.architecture or model.vocab_size or model.tokenizer not in (None, "backbone"):
            raise ValueError(
                "model.architecture, model.tokenizer and model.vocab_size: a pre-trained causal LM keeps its own "
                "sizes and tokenizer; remove them"
            )
        model.tokenizer = "backbone"
        if data.messages and (data.prompt or data.response):
            raise ValueError("data.messages: give either a messages column or data.prompt + data.response, not both")
        if not data.messages and not (data.prompt and data.response):
            missing = "data.response" if data.prompt else "data.prompt"
            raise ValueError(
                f"{missing}: task 'instruction-tuning' needs data.prompt and data.response columns "
                "(or data.messages, a column of conversations)"
            )
        if data.messages and data.template == "plain":
            raise ValueError(
                "data.template: conversations (data.messages) are rendered with a chat template, not plain"
            )
        self.evaluate.generation = self.evaluate.generation or GenerationEvalConfig()

    def _check_masked_lm(self) -> None:
        """A pre-trained encoder (MiniLM by default) keeps its tokenizer; a new one (`bert`) trains its own."""
        model = self.model
        if model.backbone is None:
            model.backbone = "minilm"
        if model.backbone in ("mlp", NEW_GPT):
            raise ValueError(
                f"model.backbone: task 'masked-lm' needs an encoder: 'minilm', a Hugging Face id or local folder, "
                f"or 'bert' (a new one from model.architecture), got {model.backbone!r}"
            )
        if model.backbone == NEW_ENCODER:
            from forgeml.models.bert import DEFAULT_BERT_ARCHITECTURE, validate_bert_architecture

            # Names the bad key and what is allowed; fills the position table's size (model.max_length).
            model.architecture = validate_bert_architecture(
                {**DEFAULT_BERT_ARCHITECTURE, **(model.architecture or {})}, model.max_length
            )
            model.tokenizer = model.tokenizer or "wordpiece"
            if model.tokenizer == "backbone":
                raise ValueError("model.tokenizer: a new encoder has no backbone tokenizer; use wordpiece, bpe or char")
        else:
            self._keep_backbone_tokenizer(NEW_ENCODER, "encoder")
        self._check_vocab_size()

    def _keep_backbone_tokenizer(self, new_backbone: str, kind: str) -> None:
        """A pre-trained model has its own sizes and tokenizer (its embeddings are indexed by it)."""
        model = self.model
        if model.architecture:
            raise ValueError(
                f"model.architecture: sizes apply to backbone {new_backbone}; a pre-trained model has its own"
            )
        model.tokenizer = model.tokenizer or "backbone"
        if model.tokenizer != "backbone":
            raise ValueError(
                f"model.tokenizer: a pre-trained {kind} keeps its own tokenizer (backbone), got {model.tokenizer!r}"
            )

    def _check_vocab_size(self) -> None:
        model = self.model
        if model.tokenizer in ("bpe", "wordpiece"):
            model.vocab_size = model.vocab_size or DEFAULT_BPE_VOCAB
        elif model.vocab_size is not None:
            raise ValueError("model.vocab_size: applies to model.tokenizer bpe or wordpiece only")

    def _refuse_for_generative(self) -> None:
        """Keys of label-predicting tasks that a text-modelling task cannot use (yet)."""
        data = self.data
        audit = self.audit
        if self.task == "language-modeling" and audit is not None and audit.memorization is not None:
            # A language model's audit is the memorisation audit; the label-based ones do not apply.
            others = sorted(audit.model_fields_set - {"memorization"})
            if others:
                raise ValueError(
                    f"audit.{others[0]}: not available for task 'language-modeling'; use audit.memorization"
                )
            audit = None
        refused = [
            ("audit", audit),
            ("compress", self.compress),
            ("evaluate.cross_validation", self.evaluate.cross_validation),
            ("train.privacy", self.train.privacy),
            ("train.adversarial", self.train.adversarial),
            ("data.sensitive", data.sensitive),
            ("data.text_pair", data.text_pair),
            ("data.features", data.features),
            ("data.augment", data.augment),
            ("data.image_size", data.image_size),
        ]
        if self.task != "instruction-tuning":
            # A language model's corrections are prompt/response examples: only instruction tuning learns them.
            refused.append(("data.feedback", data.feedback))
            refused += [("data.sample", data.sample), ("data.prompt", data.prompt), ("data.response", data.response)]
            refused += [("data.messages", data.messages), ("data.packing", data.packing)]
            refused += [("evaluate.generation", self.evaluate.generation)]
        if self.task == "masked-lm":
            refused.append(("model.lora", self.model.lora))
        for key, value in refused:
            if value:
                raise ValueError(f"{key}: not available for task {self.task!r} yet; remove it")

    @property
    def family(self) -> str:
        """The model family whose training defaults apply (see FAMILY_DEFAULTS)."""
        return model_family(self.model.backbone, self.task, self.model.lora is not None)

    @property
    def block_size(self) -> int:
        """Language modeling: tokens per training block (the architecture's context, else model.max_length)."""
        return int((self.model.architecture or {}).get("context") or self.model.max_length)

    @property
    def family_defaults(self) -> dict[str, str]:
        """`train` keys (dotted) holding their family's default value -> the family, e.g. {'lr': 'mlp'}."""
        return family_defaults_used(
            self.train.model_dump(), self.model.backbone, self.task, self.model.lora is not None
        )

    def _check_training_modes(self) -> None:
        """DP-SGD and adversarial training each change how a step is taken; some settings cannot go with them."""
        train = self.train
        if train.adversarial:
            train.adversarial.resolve(self.task)
        if not train.privacy:
            return
        if train.adversarial:
            raise ValueError("train.adversarial: cannot be combined with train.privacy (DP-SGD)")
        if train.grad_accum_steps != 1:
            raise ValueError("train.grad_accum_steps: must be 1 with train.privacy (DP-SGD samples its own batches)")
        if train.l1:
            raise ValueError("train.l1: must be 0 with train.privacy (the penalty is not clipped per example)")

    def _check_ensemble(self) -> None:
        """An ensemble is made of trained runs: training a model of its own, in any way, is refused with it."""
        if self.ensemble is None:
            return
        if self.task in GENERATIVE_TASKS:
            raise ValueError(f"ensemble: combines models that predict labels or numbers; task is {self.task!r}")
        if self.federated:
            raise ValueError("ensemble: combines trained runs; it cannot be trained federated (remove federated)")
        if self.evaluate.cross_validation:
            raise ValueError("evaluate.cross_validation: an ensemble's members are trained already (set it to null)")
        if self.ensemble.method == "vote" and not self.is_classification:
            raise ValueError(f"ensemble.method: vote needs classes; task {self.task!r} predicts a number")

    def _check_federated(self) -> None:
        """Federated training replaces the one-dataset loop; what assumes one dataset is refused."""
        federated = self.federated
        if federated is None:
            return
        if self.task in GENERATIVE_TASKS:
            raise ValueError(f"federated: trains label-predicting tasks; task is {self.task!r}")
        if not federated.by_column and not self.is_classification:
            raise ValueError(
                f"federated.by_column: a Dirichlet split shares each class among clients, and task {self.task!r} "
                "has no classes; name the column that says which client a row belongs to"
            )
        if self.train.privacy:
            raise ValueError(
                "train.privacy: DP-SGD protects rows of one dataset; for federated training use federated.privacy "
                "(client-level)"
            )
        if self.evaluate.cross_validation:
            raise ValueError("evaluate.cross_validation: not available with federated training (set it to null)")

    @property
    def is_classification(self) -> bool:
        return self.task.endswith("classification")


SectionT = typing.TypeVar("SectionT", bound=Section)


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> ForgeConfig:
    """Read a YAML file (or a dict), apply ``key.path=value`` overrides and validate.

    Relative data paths resolve against the config file's folder (the current folder for a dict).
    Raises :class:`ConfigError` naming the key path, the value given and what is allowed.
    """
    if isinstance(source, dict):
        raw, base_dir, origin = dict(source), Path.cwd(), "config"
    else:
        path = Path(source)
        raw, base_dir, origin = _read_yaml(path), path.resolve().parent, str(path)
    for override in overrides:
        _apply_override(raw, override)
    try:
        config = ForgeConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{origin}: " + "; ".join(_describe(e) for e in error.errors())) from None
    _resolve_paths(config, base_dir)
    return config


def with_changes(section: SectionT, path: str, **changes: Any) -> SectionT:
    """`section` with `changes` applied (None leaves a value as it is), validated; errors name `path.key`."""
    values = section.model_dump() | {key: value for key, value in changes.items() if value is not None}
    try:
        return type(section).model_validate(values)
    except ValidationError as error:
        raise ConfigError("; ".join(_describe({**e, "loc": (path, *e["loc"])}) for e in error.errors())) from None


def dump_config(config: ForgeConfig) -> str:
    """The resolved config as YAML (what is saved in the run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_schema() -> dict[str, Any]:
    """JSON schema of the config file."""
    return ForgeConfig.model_json_schema()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {error.problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, task, data, ...), got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.path=value, e.g. train.lr=3e-5")
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {override!r}: {prefix} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = text


def _describe(error: dict) -> str:
    loc = tuple(str(part) for part in error["loc"])
    path = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f" (did you mean {'.'.join((*loc[:-1], hint[0]))!r}?)" if hint else ""
        return f"unknown key {path!r}{suggestion}; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{path} is required"
    message = error["msg"].removeprefix("Value error, ")
    if not loc or message.startswith(path):  # our validators already name the path
        return message
    return f"{path}: {message} (got {error.get('input')!r})"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """Field names of the config section at `loc` (for did-you-mean hints)."""
    model: Any = ForgeConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[Section] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _resolve_paths(config: ForgeConfig, base_dir: Path) -> None:
    for split in ("train", "validation", "test"):
        path = getattr(config.data, split)
        if path is not None and not path.is_absolute():
            setattr(config.data, split, (base_dir / path).resolve())
    feedback = config.data.feedback
    if feedback is not None and not feedback.path.is_absolute():
        feedback.path = (base_dir / feedback.path).resolve()
    backbone = config.model.backbone
    if config.task == "image-classification" and backbone != RESNET_SMALL:
        config.model.backbone = _checkpoint_folder(str(backbone), base_dir)
    elif backbone and Path(backbone).name == "latest":
        from forgeml.workspace import latest_run

        # Pinned now, so the saved config names the run it started from, whatever runs come later.
        config.model.backbone = str(latest_run(Path(backbone).parent))
    if config.ensemble:
        config.ensemble.members = [
            member if Path(member).is_absolute() else str((base_dir / member).resolve())
            for member in config.ensemble.members
        ]
    classifier = config.evaluate.classifier
    if classifier:  # a run directory, found as a run-directory backbone is (relative to the current folder)
        from forgeml.errors import ArtifactError
        from forgeml.workspace import latest_run

        try:
            found = latest_run(Path(classifier).parent) if Path(classifier).name == "latest" else Path(classifier)
        except ArtifactError as error:
            raise ConfigError(
                f"evaluate.classifier: {error}; train an image-classification run there first (e.g. forgeml run "
                "examples/cifar10.yaml) or set evaluate.classifier: null"
            ) from None
        if not (found / "model" / "task.json").is_file():
            raise ConfigError(
                f"evaluate.classifier: {found} is not a finished run directory (no model/task.json); name an "
                "image-classification run, or set evaluate.classifier: null"
            )
        config.evaluate.classifier = str(Path(found).resolve())
    robustness = config.audit.robustness if config.audit else None
    if robustness and robustness.baseline and not Path(robustness.baseline).is_absolute():
        robustness.baseline = str((base_dir / robustness.baseline).resolve())


def _checkpoint_folder(backbone: str, base_dir: Path) -> str:
    """An image-classification `model.backbone` other than resnet_small: a checkpoint folder, relative to the
    config file's folder as data files are. A relative one must exist now. An absolute one is taken as it is: a
    saved run's config.yaml names the folder its weights came from, and the run must still load once that folder
    is gone (a new run refuses a missing folder when it builds its model)."""
    folder = Path(backbone).expanduser()
    if folder.is_absolute():
        return str(folder)
    resolved = (base_dir / folder).resolve()
    if not resolved.is_dir():
        raise ConfigError(
            f"model.backbone: task 'image-classification' needs {IMAGE_BACKBONES}; {backbone!r} is neither (no "
            f"folder {resolved})"
        )
    return str(resolved)
