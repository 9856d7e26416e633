"""language-modeling: pre-train a causal LM from scratch (nanoGPT style) or continue training a pre-trained one.

Documents are joined with the tokenizer's end-of-text token and cut into blocks of `context` tokens
(`data.packing`): no padding is computed. The model is a stock Hugging Face causal LM, saved with
`save_pretrained` beside its tokenizer, so `AutoModelForCausalLM.from_pretrained(run/model)` loads it
with no forgeml code.

For the training loop and the evaluator, which batch rows and stack outputs, `CausalLM` returns per
block its summed next-token loss and the number of tokens it predicted: evaluation then keeps two
numbers per block, not a [tokens, vocabulary] array of logits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from forgeml.config import NEW_GPT
from forgeml.data.io import column
from forgeml.data.packing import pack_documents
from forgeml.errors import ConfigError, DataError, ForgeError
from forgeml.models.gpt import gpt_from_architecture, parameter_count
from forgeml.models.hf import load_tokenizer, quiet_loading, resolve_backbone
from forgeml.models.tokenizers import train_tokenizer
from forgeml.tasks.base import HuggingFaceFolderTask

# Sample generations in the card: from a line break, then from the starts of held-out lines.
SAMPLE_COUNT = 3
SAMPLE_TOKENS = 200
PROMPT_CHARACTERS = 24
# The promotion gate pairs two models on held-out text cut into pieces of about this many characters.
PIECE_CHARACTERS = 400


class CausalLM(nn.Module):
    """A Hugging Face causal LM as the loop sees it: rows in, per-row [summed loss, tokens] out.

    `labels` are already shifted (the token each position predicts; -100 where nothing is learnt).
    Padded rows pass an `attention_mask`; rows packing several examples pass `position_ids` that restart
    at each example instead, from which transformers builds a mask with no attention across examples.
    """

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self._layers, self._width = config.num_hidden_layers, config.hidden_size
        self._weights = parameter_count(lm, non_embedding=True)
        self._trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {"attention_mask": attention_mask, "position_ids": position_ids}
        extra = {name: value for name, value in extra.items() if value is not None}
        logits = self.lm(input_ids=input_ids, use_cache=False, **extra).logits
        losses = functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
        counted = (labels != -100).sum(dim=1).to(losses.dtype)
        return torch.stack([losses.sum(dim=1), counted], dim=1)

    def training_flops(self, rows: Sequence[int], length: int) -> float:
        """FLOPs of a forward + backward pass over `len(rows)` rows of `length` tokens (nanoGPT's estimate:
        6 per weight per token plus 12 * layers * width * length per token for attention). A frozen weight
        (LoRA) costs 4, not 6: the backward pass computes no gradient for it."""
        weights = 4 * self._weights + 2 * min(self._trainable, self._weights)
        per_token = weights + 12 * self._layers * self._width * length
        return float(len(rows) * length * per_token)


class BlockSplit:
    """Packed blocks of `context + 1` tokens: inputs are a block but its last token, labels all but its first."""

    def __init__(self, blocks: np.ndarray, dropped_tokens: int = 0, total_tokens: int = 0):
        self.blocks = torch.from_numpy(blocks)
        self.lengths = np.full(len(blocks), blocks.shape[1] - 1, dtype=np.int64)
        self.dropped_tokens, self.total_tokens = dropped_tokens, total_tokens

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        blocks = self.blocks[torch.as_tensor(list(rows), dtype=torch.long)]
        labels = blocks[:, 1:]
        return {"input_ids": blocks[:, :-1], "labels": labels}, (labels != -100).sum(dim=1)


class ExampleSplit:
    """Tokenized examples, padded per batch (right) with an attention mask; labels pre-shifted, -100 unlearnt."""

    def __init__(self, inputs: list[np.ndarray], labels: list[np.ndarray], pad_id: int, counts: dict[str, int]):
        self.inputs, self.labels, self.pad_id, self.counts = inputs, labels, pad_id, counts
        self.lengths = np.array([len(row) for row in inputs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        width = int(self.lengths[list(rows)].max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for slot, row in enumerate(rows):
            length = len(self.inputs[row])
            input_ids[slot, :length] = torch.from_numpy(self.inputs[row])
            labels[slot, :length] = torch.from_numpy(self.labels[row])
            attention_mask[slot, :length] = 1
        inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        return inputs, (labels != -100).sum(dim=1)


def summed_losses(model: CausalLM, split: Any, batch_size: int = 16) -> np.ndarray:
    """[summed next-token loss (nats), tokens predicted] per row of an encoded split, without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for start in range(0, len(split), batch_size):
                inputs, _ = split.batch(range(start, min(start + batch_size, len(split))))
                rows.append(model(**{name: value.to(device) for name, value in inputs.items()}).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows).numpy().astype(np.float64) if rows else np.zeros((0, 2))


def text_pieces(text: str, characters: int) -> list[str]:
    """`text` cut at line breaks into pieces of at least `characters` (the last may be shorter);
    `"".join(pieces) == text`."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= characters:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


class LanguageModelingTask(HuggingFaceFolderTask):
    """Causal language modeling on unlabelled text (the `text` column of every split)."""

    name = "language-modeling"
    primary_metric = "loss"
    target = None  # nothing is predicted per row: no label-based baselines or audits
    generates = True  # Predictor.generate / forgeml generate work on it

    def __init__(self, model: dict[str, Any], block_size: int, tokenizer: PreTrainedTokenizerBase | None = None):
        self.model_options = dict(model)  # backbone, architecture, style, tokenizer, vocab_size
        self.block_size = block_size
        self.tokenizer = tokenizer
        if tokenizer is None and self.model_options["tokenizer"] == "backbone":
            self.tokenizer = load_tokenizer(self.model_options["backbone"])

    @property
    def text_columns(self) -> list[str]:
        return ["text"]

    def fit(self, train: Dataset) -> None:
        """Train the char or BPE tokenizer on the training split (a backbone's tokenizer is kept as it is)."""
        kind = self.model_options["tokenizer"]
        if kind != "backbone":
            vocab_size = self.model_options.get("vocab_size") if kind == "bpe" else None
            self.tokenizer = train_tokenizer(kind, column(train, "text"), vocab_size)

    def build_model(self) -> CausalLM:
        options = self.model_options
        if options["backbone"] == NEW_GPT:
            lm = gpt_from_architecture(
                options["architecture"], len(self.tokenizer), options["style"], self.tokenizer.eos_token_id
            )
            return CausalLM(lm)
        return build_causal_lm(options)

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> BlockSplit:
        texts = column(dataset, "text")
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        packed = pack_documents(ids, self.block_size, self.tokenizer.eos_token_id)
        if len(packed.blocks) == 0:
            raise DataError(
                f"{source or 'input'}: {packed.total_tokens} tokens do not fill one block of "
                f"{self.block_size + 1}; give more text or a smaller model.architecture.context / model.max_length"
            )
        return BlockSplit(packed.blocks, packed.dropped_tokens, packed.total_tokens)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over every token predicted in the batch."""
        return outputs[:, 0].sum() / outputs[:, 1].sum().clamp(min=1)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        tokens = float(outputs[:, 1].sum())
        loss = float(outputs[:, 0].sum()) / max(tokens, 1.0)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
        if self.model_options["tokenizer"] == "char":  # one token per character: bits per character
            metrics["bits_per_character"] = loss / math.log(2)
        return metrics

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        raise ForgeError("a language model generates text: use forgeml generate (or Predictor.generate)")

    def paired_scores(self, model: CausalLM, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Per piece of the documents (lines gathered into pieces of about PIECE_CHARACTERS): the summed loss
        (nats) of its tokens read from an end-of-text token on, in windows of the model's context, and its
        characters. Per character, two models with different tokenizers are scored on the same pieces (the
        promotion gate pairs them by piece)."""
        pieces = [piece for text in column(dataset, "text") for piece in text_pieces(text, PIECE_CHARACTERS)]
        eos = self.tokenizer.eos_token_id
        start = [eos] if eos is not None else []  # training joins documents with it: a piece starts after one
        inputs, labels, owners = [], [], []
        for index, piece in enumerate(pieces):
            ids = np.array([*start, *self.tokenizer(piece, add_special_tokens=False)["input_ids"]], dtype=np.int64)
            for begin in range(0, len(ids) - 1, self.block_size):  # windows overlap by one token, as blocks do
                window = ids[begin : begin + self.block_size + 1]
                inputs.append(window[:-1])
                labels.append(window[1:])
                owners.append(index)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or 0)
        losses = summed_losses(model, ExampleSplit(inputs, labels, pad, {}))
        nll = np.bincount(np.array(owners, dtype=np.int64), weights=losses[:, 0], minlength=len(pieces))
        return nll, np.array([len(piece) for piece in pieces], dtype=np.float64)

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """None beyond the training curves: loss over training is the picture of a language model."""

    def token_profile(self, split: BlockSplit) -> dict[str, int]:
        """Tokens in the split's stream, blocks cut from it, and tokens of its tail that fill no block."""
        return {"tokens": split.total_tokens, "blocks": len(split), "dropped_tokens": split.dropped_tokens}

    def unknown_token_share(self, split: BlockSplit) -> float | None:
        unknown = self.tokenizer.unk_token_id
        if unknown is None:
            return None
        tokens = split.blocks[:, 1:]
        return float((tokens == unknown).sum()) / max(tokens.numel(), 1)

    def samples(self, model: CausalLM, held_out: Dataset, seed: int) -> list[dict[str, Any]]:
        """Seeded generations from a line break and from the starts of held-out lines (card, samples.jsonl)."""
        from forgeml.generate import GenerationOptions, generate

        lines = (line.strip() for text in column(held_out, "text")[:50] for line in text.splitlines())
        candidates = itertools.chain(["\n"], (line[:PROMPT_CHARACTERS] for line in lines if len(line) >= 8))
        # A tokenizer may drop some text entirely (a line break, say): only prompts that give tokens. Lazily:
        # a held-out text has thousands of lines and three are needed.
        prompts = list(itertools.islice((p for p in candidates if self.tokenizer(p)["input_ids"]), SAMPLE_COUNT))
        options = GenerationOptions(max_new_tokens=SAMPLE_TOKENS, temperature=0.8, top_k=40, seed=seed)
        samples = []
        for prompt in prompts:
            generation = generate(model.lm, self.tokenizer, prompt, options)
            samples.append({"prompt": prompt, "seed": seed, "temperature": 0.8, "top_k": 40, "text": generation.text})
        return samples

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"text_columns": self.text_columns},
            "block_size": self.block_size,
            "model": self.model_options,
        }

    def save(self, folder: Path, model: CausalLM) -> None:
        """The model and tokenizer as a Hugging Face folder (`from_pretrained` loads it), plus task.json."""
        save_causal_lm(folder, model, self.model_options)
        self.save_inputs(folder)

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any = None) -> LanguageModelingTask:
        return cls(dict(state["model"]), int(state["block_size"]), load_tokenizer(str(folder)))

    @classmethod
    def load(cls, folder: Path, state: dict[str, Any], target: Any = None) -> tuple[LanguageModelingTask, CausalLM]:
        task = cls.from_saved(folder, state)
        return task, load_saved_causal_lm(folder, task.model_options)


def build_causal_lm(options: dict[str, Any]) -> CausalLM:
    """The pre-trained causal LM `options["backbone"]` names, with fresh LoRA adapters when `options["lora"]` is set."""
    lm = _load_causal_lm(options["backbone"])
    if options.get("lora"):
        from forgeml.models.lora import add_lora

        lm = add_lora(lm, options["lora"], task_type="CAUSAL_LM")
    return CausalLM(lm)


def save_causal_lm(folder: Path, model: CausalLM, options: dict[str, Any]) -> None:
    """`save_pretrained` of the model; with LoRA, the adapter alone in folder/adapter and (unless
    model.lora.merge is false) the merged model, which then replaces the adapter model in `model`."""
    from forgeml.models.lora import is_lora, merged, save_adapter

    folder.mkdir(parents=True, exist_ok=True)
    with quiet_loading():  # no "Writing model shards" bar
        if is_lora(model.lm):
            save_adapter(model.lm, folder)
            if not options["lora"].get("merge", True):
                return
            model.lm = merged(model.lm)
        model.lm.save_pretrained(folder)


def load_saved_causal_lm(folder: Path, options: dict[str, Any]) -> CausalLM:
    """The model `save_causal_lm` wrote: the full (or merged) model, else the backbone with the saved adapter."""
    if (folder / "config.json").is_file():
        return CausalLM(_load_causal_lm(str(folder)))
    from forgeml.models.lora import ADAPTER_FOLDER, load_adapter

    return CausalLM(load_adapter(_load_causal_lm(options["backbone"]), folder / ADAPTER_FOLDER))


def _load_causal_lm(location: str) -> PreTrainedModel:
    try:
        with quiet_loading():
            return AutoModelForCausalLM.from_pretrained(resolve_backbone(location))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.backbone: cannot load a causal language model from {location!r}: {error}") from None
