"""masked-lm: pre-train a BERT-style encoder from scratch, or continue pre-training a pre-trained one, on
unlabelled text, so it can then serve as the `model.backbone` of a text task.

Each document (a row of the `text` column) becomes one example, "[CLS] tokens [SEP]"; a document longer
than `max_length` tokens is cut into consecutive chunks of at most `max_length` tokens, [CLS] and [SEP]
included (the tokenizer's own overflow handling). Rows are padded per batch to the longest one.

Masking is BERT's (Devlin et al. 2019): each token but the tokenizer's special tokens ([CLS], [SEP],
padding, and [UNK], as transformers' collator does) is chosen with `mask_probability` (15 %); a chosen
token becomes [MASK] 80 % of the time, a random token 10 %, and stays as it is 10 %; the loss is the
cross-entropy of the original token at chosen positions only.
With `whole_word_mask`, whole whitespace-separated words are chosen (with the same probability, so
the same share of tokens is chosen on average) and all their pieces are masked together.

Where the randomness comes from (chosen so that runs are reproducible and comparable):
- Training masks are dynamic (RoBERTa): `MaskedLM.forward` draws a new mask for every batch while the
  model is in training mode, from torch's global CPU generator. `train.loop` seeds that generator and
  saves/restores its state in checkpoints, so a resumed run draws exactly the masks the uninterrupted
  run would have.
- Evaluation masks are fixed: `encode` draws one mask per row from a generator seeded with the task's
  `seed` and stores it with the split; in eval mode the model uses it. Every evaluation of a split then
  scores the same positions, so validation perplexity is comparable across evaluations (and across
  runs with the same seed and data). That generator is private: encoding never moves the global
  one, so the model's initial weights do not depend on the data.
Every split carries both (the task cannot tell which split is the training one); the model's mode picks.

The model is a stock Hugging Face masked LM, saved with `save_pretrained` beside its tokenizer:
`AutoModelForMaskedLM.from_pretrained(run/model)` loads it whole, `AutoModel.from_pretrained` its encoder,
and `model.backbone: <run>/model` fine-tunes it for a text task.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

from forgeml.config import NEW_ENCODER as NEW_BERT
from forgeml.data.io import column
from forgeml.data.validate import require_columns
from forgeml.errors import ConfigError, DataError, ForgeError
from forgeml.models.bert import DEFAULT_BERT_ARCHITECTURE, bert_from_architecture, validate_bert_architecture
from forgeml.models.hf import load_tokenizer, quiet_loading, resolve_backbone
from forgeml.models.tokenizers import check_encoder_tokenizer, encoder_tokenizer
from forgeml.tasks.base import HuggingFaceFolderTask

DEFAULT_VOCAB_SIZE = 4096
# The `model` options this task takes; None (or absent) takes the default. `tokenizer` None means
# "backbone" for a pre-trained backbone and "wordpiece" for a new one; `vocab_size` None means
# DEFAULT_VOCAB_SIZE for wordpiece and bpe (a char vocabulary is the text's characters).
MODEL_DEFAULTS: dict[str, Any] = {
    "backbone": "minilm",
    "architecture": None,
    "tokenizer": None,
    "vocab_size": None,
    "mask_probability": 0.15,
    "whole_word_mask": False,
}
MASK_SHARE = 0.8  # of the chosen tokens: replaced by [MASK]
RANDOM_SHARE = 0.1  # replaced by a random token (the remaining 10 % stay as they are)
IGNORE_INDEX = -100  # label of a position that is not predicted (PyTorch's and transformers' convention)
TOKENIZE_CHUNK = 2_000
WORD = re.compile(r"\S+")
# Model types whose masked-LM forward is exactly `head(base_model(...).last_hidden_state)`: for them the
# head (a vocabulary-wide matmul, about half of MiniLM's forward FLOPs at length 128) runs only at the
# masked positions. Other model types run their whole forward.
MASKED_LM_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head"}


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    probability: float,
    mask_token_id: int,
    vocabulary_size: int,
    generator: torch.Generator | None = None,
    word_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of CPU `input_ids` (any shape): (masked input ids, labels with IGNORE_INDEX where not chosen).

    Tokens where `maskable` is False (special tokens, padding) are never chosen. Without `word_ids`, each
    maskable token is chosen with `probability` on its own, drawing exactly as transformers'
    `DataCollatorForLanguageModeling.torch_mask_tokens` does (same draws in the same order, so the same
    generator state gives the same mask). With `word_ids` (same shape; words numbered from 0 along the
    last dimension, -1 for tokens never masked), each word is chosen with `probability` and all its
    tokens with it; the 80/10/10 replacement is then decided per token, as in Google's BERT code.

    We do not call the collator itself: in transformers 5 its whole-word masking finds words by offsets
    that touch, which joins a whole sentence into one "word" for tokenizers that keep spaces (char,
    byte-level BPE), and it turns the 80/10/10 replacement off. `generator` None draws from torch's
    global generator.
    """
    shape = input_ids.shape
    if word_ids is None:
        chances = torch.full(shape, probability).masked_fill_(~maskable, 0.0)
        chosen = torch.bernoulli(chances, generator=generator).bool()
    else:
        words = max(int(word_ids.max()) + 1 if word_ids.numel() else 0, 1)
        drawn = torch.bernoulli(torch.full((*shape[:-1], words), probability), generator=generator).bool()
        chosen = drawn.gather(-1, word_ids.clamp(min=0)) & (word_ids >= 0) & maskable
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    replaced = torch.bernoulli(torch.full(shape, MASK_SHARE), generator=generator).bool() & chosen
    # A share of what is left after [MASK], so that RANDOM_SHARE of all chosen tokens get a random one.
    random_chance = RANDOM_SHARE / (1 - MASK_SHARE)
    randomised = torch.bernoulli(torch.full(shape, random_chance), generator=generator).bool() & chosen & ~replaced
    random_tokens = torch.randint(vocabulary_size, shape, dtype=torch.long, generator=generator)
    masked = input_ids.clone()
    masked[replaced] = mask_token_id
    masked[randomised] = random_tokens[randomised]
    return masked, labels


def word_spans(text: str) -> np.ndarray:
    """[words, 2] character spans of the whitespace-separated words of `text`."""
    return np.array([match.span() for match in WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)


def word_ids(spans: np.ndarray, offsets: np.ndarray, maskable: np.ndarray) -> np.ndarray:
    """Per token (`offsets`: [tokens, 2] character spans in the text), the word (`spans`, from `word_spans`)
    it belongs to, numbered 0, 1, ... in order within the row; -1 where `maskable` is False.

    Words are found in the text, not from the tokenizer, so they mean the same for every tokenizer: a
    WordPiece "##ing", a byte-level "Ġworld" (its span includes the space before it) and a character all
    join the word their first non-space character is in. A token of whitespace alone (a char tokenizer's
    space, a byte-level "Ġ") is a word of its own.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    word = np.searchsorted(spans[:, 1], starts, side="right")  # the first word that ends after the token starts
    inside = word < len(spans)
    inside[inside] = spans[word[inside], 0] < ends[inside]  # ... and starts before the token ends
    numbers = np.where(inside, word, len(spans) + np.arange(len(offsets)))
    _, first, which = np.unique(numbers[maskable], return_index=True, return_inverse=True)
    result = np.full(len(offsets), -1, dtype=np.int64)
    result[maskable] = np.argsort(np.argsort(first))[which]  # words numbered in the order they come
    return result


def masked_lm_options(model: dict[str, Any], max_length: int) -> dict[str, Any]:
    """`model` with defaults filled in, or a ConfigError naming the first bad key."""
    given = {key: value for key, value in model.items() if not (key == "lora" and value is None)}
    unknown = sorted(set(given) - set(MODEL_DEFAULTS))
    if unknown:
        hint = " (LoRA is not available for masked-lm yet)" if "lora" in unknown else ""
        raise ConfigError(
            f"model has key(s) {', '.join(unknown)} that task 'masked-lm' does not use{hint}; "
            f"its keys: {', '.join(MODEL_DEFAULTS)}, max_length"
        )
    options = {**MODEL_DEFAULTS, **{key: value for key, value in given.items() if value is not None}}
    backbone = options["backbone"]
    if not isinstance(backbone, str) or not backbone:
        raise ConfigError(f"model.backbone must be 'bert' (a new encoder) or a pre-trained one, got {backbone!r}")
    if backbone == NEW_BERT:
        options["architecture"] = validate_bert_architecture(
            options["architecture"] or DEFAULT_BERT_ARCHITECTURE, max_length
        )
        options["tokenizer"] = options["tokenizer"] or "wordpiece"
        if options["tokenizer"] == "backbone":
            raise ConfigError("model.tokenizer: a new encoder has no backbone tokenizer; use wordpiece, bpe or char")
        if options["tokenizer"] in ("wordpiece", "bpe") and options["vocab_size"] is None:
            options["vocab_size"] = DEFAULT_VOCAB_SIZE
        check_encoder_tokenizer(options["tokenizer"], options["vocab_size"])
    else:
        if options["architecture"] is not None:
            raise ConfigError("model.architecture: sizes apply to backbone 'bert'; a pre-trained model has its own")
        if options["tokenizer"] not in (None, "backbone"):
            raise ConfigError(
                f"model.tokenizer: a pre-trained encoder keeps its own tokenizer (its embeddings are indexed by "
                f"it); use 'backbone', got {options['tokenizer']!r}"
            )
        if options["vocab_size"] is not None:
            raise ConfigError("model.vocab_size applies to a tokenizer trained here (backbone 'bert'); remove it")
        options["tokenizer"] = "backbone"
    probability = options["mask_probability"]
    if isinstance(probability, bool) or not isinstance(probability, int | float) or not 0 < probability < 1:
        raise ConfigError(f"model.mask_probability must be a number between 0 and 1 (e.g. 0.15), got {probability!r}")
    options["mask_probability"] = float(probability)
    if not isinstance(options["whole_word_mask"], bool):
        raise ConfigError(f"model.whole_word_mask must be true or false, got {options['whole_word_mask']!r}")
    return options


class MaskedLM(nn.Module):
    """A Hugging Face masked LM as the loop sees it: rows in, per-row [summed masked-token loss, masked tokens] out.

    In training mode it masks each batch anew (torch's global CPU generator); in eval mode it uses the
    split's fixed evaluation masks (`eval_input_ids`, `eval_labels`).
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        special_ids: Sequence[int],
        mask_token_id: int,
        mask_probability: float,
        vocabulary_size: int,
    ):
        super().__init__()
        self.lm = lm
        # Masks are drawn on the CPU whatever the device: the CPU generator is the one checkpoints save.
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.mask_token_id = mask_token_id
        self.mask_probability = mask_probability
        self.vocabulary_size = vocabulary_size
        self._head_name = MASKED_LM_HEADS.get(lm.config.model_type)
        self._layers, self._width = lm.config.num_hidden_layers, lm.config.hidden_size
        self._body_weights, self._head_weights = _weight_counts(lm)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        eval_input_ids: torch.Tensor,
        eval_labels: torch.Tensor,
        word_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.training:
            masked, labels = self.draw_masks(input_ids, attention_mask, word_ids)
        else:
            masked, labels = eval_input_ids, eval_labels
        return self.masked_token_losses(masked, attention_mask, labels)

    def draw_masks(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A new mask for a batch, from torch's global CPU generator: (masked input ids, labels)."""
        ids = input_ids.cpu()
        maskable = attention_mask.cpu().bool() & ~torch.isin(ids, self.special_ids)
        words = None if word_ids is None else word_ids.cpu()
        masked, labels = mask_tokens(
            ids, maskable, self.mask_probability, self.mask_token_id, self.vocabulary_size, None, words
        )
        return masked.to(input_ids.device), labels.to(input_ids.device)

    def masked_token_losses(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Per row: [summed cross-entropy of the original tokens at the masked positions, masked positions]."""
        chosen = labels != IGNORE_INDEX
        if self._head_name is None:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[chosen]
        else:
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = getattr(self.lm, self._head_name)(hidden[chosen])
        losses = functional.cross_entropy(logits.float(), labels[chosen], reduction="none")
        rows = chosen.nonzero(as_tuple=True)[0]
        summed = torch.zeros(len(labels), dtype=losses.dtype, device=losses.device).index_add(0, rows, losses)
        return torch.stack([summed, chosen.sum(dim=1).to(losses.dtype)], dim=1)

    def training_flops(self, rows: Sequence[int], length: int) -> float:
        """FLOPs of a forward + backward pass over `len(rows)` rows padded to `length` tokens (nanoGPT's
        estimate, as CausalLM: 6 per weight per token plus 12 * layers * width * length per token for
        attention). The vocabulary head counts at the masked share of tokens only when it runs there alone."""
        head_share = self.mask_probability if self._head_name else 1.0
        per_token = (
            6 * self._body_weights + 12 * self._layers * self._width * length + 6 * self._head_weights * head_share
        )
        return float(len(rows) * length * per_token)


class MaskedSplit:
    """Token rows ([CLS] ... [SEP]) held flat, with each row's fixed evaluation mask; padded per batch.

    `batch` gives the model the unmasked ids (training masks them anew), the fixed masked ids and labels
    (evaluation uses them), the attention mask, and with whole-word masking each token's word number.
    Targets are the number of positions each row's evaluation mask predicts.
    """

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        eval_ids: np.ndarray,
        eval_labels: np.ndarray,
        word_ids: np.ndarray | None,
        pad_id: int,
        with_targets: bool = True,
        documents: np.ndarray | None = None,
    ):
        self.ids, self.offsets, self.eval_ids, self.eval_labels = ids, offsets, eval_ids, eval_labels
        self.word_ids = word_ids
        self.pad_id = pad_id
        self.with_targets = with_targets
        self.lengths = np.diff(offsets).astype(np.int64)
        # The document each row was cut from (several rows for a document longer than max_length).
        self.documents = np.arange(len(self.lengths)) if documents is None else documents

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        columns = np.arange(int(lengths.max()))
        present = columns[None, :] < lengths[:, None]
        positions = np.where(present, self.offsets[rows][:, None] + columns[None, :], 0)

        def padded(flat: np.ndarray, fill: int) -> torch.Tensor:
            return torch.from_numpy(np.where(present, flat[positions], fill).astype(np.int64))

        inputs = {
            "input_ids": padded(self.ids, self.pad_id),
            "attention_mask": torch.from_numpy(present.astype(np.int64)),
            "eval_input_ids": padded(self.eval_ids, self.pad_id),
            "eval_labels": padded(self.eval_labels, IGNORE_INDEX),
        }
        if self.word_ids is not None:
            inputs["word_ids"] = padded(self.word_ids, -1)
        targets = (inputs["eval_labels"] != IGNORE_INDEX).sum(dim=1) if self.with_targets else None
        return inputs, targets


class MaskedLanguageModelingTask(HuggingFaceFolderTask):
    """Masked language modeling on unlabelled text (the `text` column of every split)."""

    name = "masked-lm"
    primary_metric = "loss"
    target = None  # nothing is predicted per row: no label-based baselines or audits

    def __init__(
        self,
        model: dict[str, Any],
        max_length: int,
        seed: int = 42,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ConfigError(f"model.max_length must be an integer >= 3 ([CLS], a token, [SEP]), got {max_length!r}")
        self.max_length = max_length
        self.model_options = masked_lm_options(model, max_length)
        self.seed = seed
        self.tokenizer = tokenizer
        if tokenizer is None and self.model_options["tokenizer"] == "backbone":
            self.tokenizer = load_tokenizer(self.model_options["backbone"])
        if self.tokenizer is not None:
            _check_tokenizer(self.tokenizer, self.model_options["backbone"])

    @property
    def text_columns(self) -> list[str]:
        return ["text"]

    @property
    def whole_word_mask(self) -> bool:
        return self.model_options["whole_word_mask"]

    def read_file(self, path: Path, config: Any) -> Dataset:
        """Documents from a text file, folder or table column (`forgeml evaluate RUN --data FILE`)."""
        from forgeml.data.corpus import COLUMN, read_documents

        return Dataset.from_dict({COLUMN: read_documents(path, config.data.text, config.data.format)})

    def fit(self, train: Dataset) -> None:
        """Train the WordPiece, BPE or char tokenizer on the training split (a backbone's is kept as it is)."""
        kind = self.model_options["tokenizer"]
        if kind == "backbone":
            return
        require_columns(train, self.text_columns, "train", "text column")
        texts = [text for text in column(train, "text") if text]
        self.tokenizer = encoder_tokenizer(kind, texts, self.model_options["vocab_size"])
        # The encoder's position table is the limit for whoever fine-tunes it later.
        self.tokenizer.model_max_length = self.model_options["architecture"]["context"]

    def build_model(self) -> MaskedLM:
        """A new BERT sized by `model.architecture` and the trained tokenizer, or the pre-trained backbone
        with its masked-LM head (a checkpoint saved without one, like MiniLM's, gets a new head)."""
        options = self.model_options
        if self.tokenizer is None:
            raise ForgeError("fit the task on the training split first: a new encoder's vocabulary is its tokenizer's")
        if options["backbone"] == NEW_BERT:
            lm = bert_from_architecture(
                options["architecture"], len(self.tokenizer), self.max_length, self.tokenizer.pad_token_id
            )
        else:
            lm = _load_masked_lm(options["backbone"])
            self._check_backbone_fits(lm)
        return self.wrap(lm)

    def wrap(self, lm: PreTrainedModel) -> MaskedLM:
        """`lm` as the loop sees it, masking with this task's tokenizer and settings."""
        tokenizer = self.tokenizer
        return MaskedLM(
            lm,
            tokenizer.all_special_ids,
            tokenizer.mask_token_id,
            self.model_options["mask_probability"],
            len(tokenizer),
        )

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> MaskedSplit:
        """Documents -> rows of at most `max_length` tokens, each with its fixed evaluation mask."""
        require_columns(dataset, self.text_columns, source or "input", "text column")
        texts = [text or "" for text in column(dataset, "text")]
        pieces: dict[str, list[np.ndarray]] = {"ids": [], "lengths": [], "documents": [], "words": []}
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            encoded = self.tokenizer(
                texts[start : start + TOKENIZE_CHUNK],
                truncation=True,
                max_length=self.max_length,
                return_overflowing_tokens=True,  # a long document goes on in further rows, not cut off
                return_offsets_mapping=self.whole_word_mask,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            rows = encoded["input_ids"]
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
            maskable = self._maskable(ids)
            # Whole arrays, not a NumPy call per row: encoding a 67k-sentence corpus is then tokenizer time.
            ends = np.cumsum(lengths)
            maskable_before = np.concatenate([[0], np.cumsum(maskable)])
            kept = maskable_before[ends] > maskable_before[ends - lengths]  # rows with something to predict
            documents = start + np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
            pieces["ids"].append(ids[np.repeat(kept, lengths)])
            pieces["lengths"].append(lengths[kept])
            pieces["documents"].append(documents[kept])
            if self.whole_word_mask:
                spans: dict[int, np.ndarray] = {}  # once per document, however many rows it is cut into
                for row in np.flatnonzero(kept):
                    document = int(documents[row])
                    if document not in spans:
                        spans[document] = word_spans(texts[document])
                    offsets = np.asarray(encoded["offset_mapping"][row], dtype=np.int64).reshape(-1, 2)
                    tokens = maskable[ends[row] - lengths[row] : ends[row]]
                    pieces["words"].append(word_ids(spans[document], offsets, tokens))
        lengths = np.concatenate(pieces["lengths"]) if pieces["lengths"] else np.zeros(0, dtype=np.int64)
        if not lengths.size:  # every document empty: nothing to predict
            raise DataError(f"{source or 'input'}: column 'text' has no text to mask (every row is empty)")
        words = np.concatenate(pieces["words"]) if self.whole_word_mask else None
        ids, documents = np.concatenate(pieces["ids"]), np.concatenate(pieces["documents"])
        return self._split(ids, lengths, words, documents, with_targets)

    def _maskable(self, ids: np.ndarray) -> np.ndarray:
        """Tokens that may be masked: all but the tokenizer's special tokens ([CLS], [SEP], [PAD], [UNK], ...)."""
        return ~np.isin(ids, np.asarray(self.tokenizer.all_special_ids, dtype=np.int64))

    def _split(
        self, ids: np.ndarray, lengths: np.ndarray, words: np.ndarray | None, documents: np.ndarray, with_targets: bool
    ) -> MaskedSplit:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        global_words = None
        if words is not None:  # words numbered across the whole split, so one draw per word covers every row
            per_row = np.maximum.reduceat(words, offsets[:-1]) + 1
            first = np.concatenate([[0], np.cumsum(per_row)[:-1]])
            global_words = np.where(words >= 0, words + np.repeat(first, lengths), -1)
        generator = torch.Generator().manual_seed(self.seed)
        masked, labels = mask_tokens(
            torch.from_numpy(ids),
            torch.from_numpy(self._maskable(ids)),
            self.model_options["mask_probability"],
            self.tokenizer.mask_token_id,
            len(self.tokenizer),
            generator,
            None if global_words is None else torch.from_numpy(global_words),
        )
        pad_id = self.tokenizer.pad_token_id
        return MaskedSplit(ids, offsets, masked.numpy(), labels.numpy(), words, pad_id, with_targets, documents)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Mean cross-entropy over every masked token in the batch."""
        return outputs[:, 0].sum() / outputs[:, 1].sum().clamp(min=1)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray | None) -> dict[str, Any]:
        """Mean masked-token loss, its perplexity (exp of the loss) and the number of masked tokens scored."""
        tokens = float(outputs[:, 1].sum())
        loss = float(outputs[:, 0].sum()) / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        raise ForgeError(
            "a masked language model answers nothing on its own: use its model/ folder (or run directory) as "
            "model.backbone of a text task"
        )

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """None beyond the training curves: loss over training is the picture of a masked LM."""

    def token_profile(self, split: MaskedSplit) -> dict[str, int]:
        """Documents, the rows (chunks) cut from them, documents longer than max_length (cut into several
        rows), text tokens ([CLS], [SEP] and padding left out) and tokens the evaluation mask predicts."""
        per_document = np.bincount(split.documents)
        special = np.asarray([i for i in self.tokenizer.all_special_ids if i != self.tokenizer.unk_token_id])
        return {
            "documents": int((per_document > 0).sum()),
            "chunks": len(split),
            "chunked_documents": int((per_document > 1).sum()),
            "tokens": int((~np.isin(split.ids, special)).sum()),
            "masked_tokens": int((split.eval_labels != IGNORE_INDEX).sum()),
        }

    def unknown_token_share(self, split: MaskedSplit) -> float | None:
        """Share of the text tokens that are [UNK]; None for a tokenizer without one."""
        unknown = self.tokenizer.unk_token_id
        if unknown is None:
            return None
        special = np.asarray([i for i in self.tokenizer.all_special_ids if i != unknown])
        text = split.ids[~np.isin(split.ids, special)]
        return float((text == unknown).sum()) / text.size if text.size else None

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"text_columns": self.text_columns},
            "max_length": self.max_length,
            "seed": self.seed,
            "model": self.model_options,
        }

    def save(self, folder: Path, model: MaskedLM) -> None:
        """The masked LM and tokenizer as a Hugging Face folder (`from_pretrained` loads it), plus task.json."""
        folder.mkdir(parents=True, exist_ok=True)
        with quiet_loading():  # no "Writing model shards" bar
            model.lm.save_pretrained(folder)
        self.save_inputs(folder)

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any = None) -> MaskedLanguageModelingTask:
        options = dict(state["model"])
        return cls(options, int(state["max_length"]), int(state.get("seed", 42)), load_tokenizer(str(folder)))

    @classmethod
    def load(
        cls, folder: Path, state: dict[str, Any], target: Any = None
    ) -> tuple[MaskedLanguageModelingTask, MaskedLM]:
        task = cls.from_saved(folder, state)
        return task, task.wrap(_load_masked_lm(str(folder)))

    def _check_backbone_fits(self, lm: PreTrainedModel) -> None:
        rows = lm.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > rows:
            raise ConfigError(
                f"model.backbone: its tokenizer has {len(self.tokenizer)} tokens but the model only {rows} embeddings"
            )
        # A tokenizer without a recorded limit says 1e30; RoBERTa's position table has 2 rows it never uses.
        limits = [getattr(lm.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        limit = min((value for value in limits if isinstance(value, int) and value < 1_000_000), default=None)
        if limit is not None and self.max_length > limit:
            raise ConfigError(
                f"model.max_length ({self.max_length}) is longer than model.backbone "
                f"{self.model_options['backbone']!r} takes ({limit} tokens)"
            )


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, backbone: str) -> None:
    for name in ("mask_token", "pad_token"):
        if getattr(tokenizer, f"{name}_id") is None:
            raise ConfigError(
                f"model.backbone: {backbone!r}'s tokenizer has no {name}; masked-LM needs an encoder whose "
                "tokenizer has [MASK] and [PAD] (BERT, RoBERTa, MiniLM, ...)"
            )


def _weight_counts(lm: PreTrainedModel) -> tuple[int, int]:
    """(encoder weights that are matmuls, vocabulary-head weights). Embedding tables are lookups, not matmuls,
    and count nowhere, except the token embedding where the head reuses it (tied) as its output matrix."""
    encoder = lm.base_model
    encoder_ids = {id(parameter) for parameter in encoder.parameters()}
    tables = {id(module.weight) for module in encoder.modules() if isinstance(module, nn.Embedding)}
    body = sum(parameter.numel() for parameter in encoder.parameters() if id(parameter) not in tables)
    head = sum(parameter.numel() for parameter in lm.parameters() if id(parameter) not in encoder_ids)
    output = lm.get_output_embeddings()
    if output is not None and id(output.weight) in encoder_ids:
        head += output.weight.numel()
    return body, head


def _load_masked_lm(location: str) -> PreTrainedModel:
    try:
        with quiet_loading():  # a checkpoint saved without its masked-LM head (MiniLM) gets a new one
            return AutoModelForMaskedLM.from_pretrained(resolve_backbone(location))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.backbone: cannot load a masked language model from {location!r}: {error}") from None
