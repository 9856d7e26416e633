"""token-classification (NER): a tag for every word of a sentence, from a pre-trained encoder (MiniLM by
default) with a linear layer on every token.

Sub-word alignment (as the BERT paper's CoNLL-2003 set-up and Hugging Face's token-classification examples):
the encoder's tokenizer cuts each word into pieces; the word's FIRST piece carries its tag, the other pieces
and the special tokens ([CLS], [SEP]) get the ignored label -100, so the loss and the metrics see one
prediction per word. Words whose pieces fall past `model.max_length` are truncated: they are counted (the
data profile, a warning), left out of the scores, and tagged O by `tag`.

Decoding is constrained to valid IOB2 (Viterbi over the words' tag log-probabilities where I-X may only follow
B-X or I-X), so every predicted entity is one the strict scorer can count; scores and spans follow the
strict rule (tasks/entities.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_model
from torch.nn import functional

from forgeml.data.tagged import LINE, TAGS, TOKENS, entity_types, normal_word, read_tagged
from forgeml.data.validate import require_columns
from forgeml.errors import ConfigError, DataError, ForgeError
from forgeml.models.hf import load_tokenizer, unknown_token_share
from forgeml.models.tagger import TokenTagger
from forgeml.tasks.base import EncoderFolderTask
from forgeml.tasks.entities import entity_metrics, entity_spans, joined_offsets, split_words, tag_entities

logger = logging.getLogger(__name__)

IGNORED = -100  # label of a piece that is not scored (PyTorch's cross-entropy ignore_index)
TOKENIZE_CHUNK = 2_000
PREDICT_CHUNK = 2_000  # sentences scored at once by `tag` (outputs are [rows, max_length, tags] floats)
SAMPLES = 8  # test sentences with their predicted entities in the card


class TaggedSplit:
    """Sentences as token ids with each word's first-piece position; padded per batch to the longest row.

    Targets are [rows, output_length]: the tag id at each word's first piece, IGNORED elsewhere."""

    def __init__(
        self,
        ids: list[list[int]],
        first_pieces: list[np.ndarray],
        labels: list[np.ndarray] | None,
        pad_id: int,
        output_length: int,
    ):
        self.ids = ids
        self.first_pieces = first_pieces  # per row, per word: the position of its first piece, -1 if cut off
        self.labels = labels
        self.pad_id = pad_id
        self.output_length = output_length
        self.lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def truncated_words(self) -> int:
        """Words with no piece inside model.max_length (never seen by the model)."""
        return int(sum((positions < 0).sum() for positions in self.first_pieces))

    @property
    def truncated_rows(self) -> int:
        return int(sum(bool((positions < 0).any()) for positions in self.first_pieces))

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows = list(rows)
        width = int(self.lengths[rows].max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        targets = None if self.labels is None else torch.full((len(rows), self.output_length), IGNORED)
        for i, row in enumerate(rows):
            size = int(self.lengths[row])
            input_ids[i, :size] = torch.as_tensor(self.ids[row])
            attention_mask[i, :size] = 1
            if targets is not None:
                targets[i, :size] = torch.from_numpy(self.labels[row])
        return {"input_ids": input_ids, "attention_mask": attention_mask}, targets


class TokenClassificationTask(EncoderFolderTask):
    """Tags for every word (IOB2), entity-level precision/recall/F1 (seqeval, strict), entity spans as answers."""

    name = "token-classification"
    primary_metric = "f1"
    target = None  # no row-level label: the label-based baselines, audits and exports do not apply
    # Not built for taggers yet (see Predictor.refuse): ONNX export and serving of per-word outputs, word
    # attributions, audits. Tagging itself goes through predict.
    refused_actions = ("explain", "audit", "export", "compress", "serve")
    refusal_hint = "tag sentences with forgeml predict RUN sentences.txt (Predictor.predict)"

    def __init__(self, model: dict[str, Any], tags: list[str] | None = None, normalize: bool = True):
        self.model_options = dict(model)  # backbone, max_length, dropout
        self.tags = list(tags or [])
        self.normalize = normalize  # words get the NFKC normalisation training applied (data.clean.normalize)
        self.tokenizer = load_tokenizer(self.model_options["backbone"])
        if not self.tokenizer.is_fast:
            raise ConfigError(
                f"model.backbone: {self.model_options['backbone']!r} has no fast (Rust) tokenizer; token "
                "classification needs one to map pieces back to words"
            )

    @property
    def text_columns(self) -> list[str]:
        return [TOKENS]

    @property
    def max_length(self) -> int:
        return int(self.model_options["max_length"])

    # --- training -------------------------------------------------------------------------------

    def fit(self, train: Dataset) -> None:
        """The tag set: O, then B- and I- of every entity type in the training split (both, even if a type's
        I- tag never occurs, so any entity can be predicted)."""
        types = entity_types(train[TAGS])
        self.tags = ["O", *(f"{prefix}-{name}" for name in types for prefix in ("B", "I"))]

    def build_model(self) -> TokenTagger:
        options = self.model_options
        model = TokenTagger.from_pretrained(options["backbone"], len(self.tags), options["dropout"])
        model.output_length = self.max_length
        return model

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> TaggedSplit:
        """Sentences -> token ids with each word's first-piece position (and its tag id there)."""
        require_columns(dataset, [TOKENS, *([TAGS] if with_targets else [])], source or "input", "column")
        lines = dataset[LINE] if LINE in dataset.column_names else None
        tags = dataset[TAGS] if with_targets else None
        split = self.encode_words(dataset[TOKENS], tags, source, lines)
        if split.truncated_words:
            logger.warning(
                "%s: %d word(s) in %d sentence(s) lie past model.max_length (%d pieces): they are not tagged (O) "
                "and not scored",
                source or "input",
                split.truncated_words,
                split.truncated_rows,
                self.max_length,
            )
        return split

    def encode_words(
        self,
        sentences: Sequence[Sequence[str]],
        tags: Sequence[Sequence[str]] | None = None,
        source: str = "",
        lines: Sequence[int] | None = None,
    ) -> TaggedSplit:
        """Word lists (and their tags) -> a TaggedSplit. Errors name `source` and the sentence's line."""
        ids: dict[str, int] = {tag: index for index, tag in enumerate(self.tags)}
        words = [[normal_word(w) for w in sentence] if self.normalize else list(sentence) for sentence in sentences]
        all_ids: list[list[int]] = []
        first_pieces: list[np.ndarray] = []
        labels: list[np.ndarray] | None = [] if tags is not None else None
        for start in range(0, len(words), TOKENIZE_CHUNK):
            chunk = words[start : start + TOKENIZE_CHUNK]
            encoded = self.tokenizer(
                chunk,
                is_split_into_words=True,
                truncation=True,
                max_length=self.max_length,
                return_token_type_ids=False,
            )
            for offset, sentence in enumerate(chunk):
                row = start + offset
                positions = _first_pieces(encoded.word_ids(offset), len(sentence))
                all_ids.append(encoded["input_ids"][offset])
                first_pieces.append(positions)
                if labels is not None:
                    labels.append(self._labels(tags[row], positions, len(all_ids[-1]), ids, source, lines, row))
        pad_id = self.tokenizer.pad_token_id or 0
        return TaggedSplit(all_ids, first_pieces, labels, pad_id, self.max_length)

    def _labels(
        self,
        tags: Sequence[str],
        positions: np.ndarray,
        size: int,
        ids: dict[str, int],
        source: str,
        lines: Sequence[int] | None,
        row: int,
    ) -> np.ndarray:
        if len(tags) != len(positions):
            where = f"line {lines[row]}" if lines else f"row {row + 1}"
            raise DataError(f"{source or 'input'}: {where}: {len(positions)} words but {len(tags)} tags")
        labels = np.full(size, IGNORED, dtype=np.int64)
        for word, (position, tag) in enumerate(zip(positions, tags, strict=True)):
            if tag not in ids:
                where = f"line {lines[row]}" if lines else f"row {row + 1}"
                raise DataError(
                    f"{source or 'input'}: {where}: word {word + 1}: tag {tag!r} is not one the model knows "
                    f"({', '.join(self.tags)})"
                )
            if position >= 0:
                labels[position] = ids[tag]
        return labels

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the words' first pieces (every other position is ignored)."""
        if not bool((targets != IGNORED).any()):  # nothing to learn from in this batch: a zero that keeps the graph
            return outputs.sum() * 0.0
        return functional.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORED
        )

    # --- answers and scores ---------------------------------------------------------------------

    def decode(self, logits: np.ndarray) -> tuple[list[str], np.ndarray]:
        """One sentence's words ([words, tags] logits) -> (tags, probability of each chosen tag): the likeliest
        tag sequence that is valid IOB2."""
        if len(logits) == 0:
            return [], np.zeros(0)
        log_probs = _log_softmax(logits)
        path = _viterbi(log_probs, self._allowed_transitions())
        return [self.tags[i] for i in path], np.exp(log_probs[np.arange(len(path)), path])

    def _allowed_transitions(self) -> np.ndarray:
        """[previous, next] True where IOB2 allows the pair; row -1 (the start) is the last row."""
        count = len(self.tags)
        allowed = np.ones((count + 1, count), dtype=bool)
        for j, tag in enumerate(self.tags):
            if tag.startswith("I-"):
                allowed[:, j] = [previous in (f"B-{tag[2:]}", tag) for previous in [*self.tags, "O"]]
        return allowed

    def word_tags(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[list[list[str]], list[list[str]]]:
        """(true, predicted) tags of every scored word, sentence by sentence."""
        true, predicted = [], []
        for row_outputs, row_targets in zip(outputs, targets, strict=True):
            scored = row_targets != IGNORED
            true.append([self.tags[i] for i in row_targets[scored]])
            predicted.append(self.decode(row_outputs[scored])[0])
        return true, predicted

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        """Entity-level precision/recall/F1 overall and per type (seqeval strict IOB2), word tag accuracy."""
        return entity_metrics(*self.word_tags(outputs, targets))

    def predictions(self, outputs: np.ndarray) -> dict[str, Any]:
        """Per row and piece, the probability of each tag (`tag` turns them into entities of words)."""
        return {"probabilities": np.exp(_log_softmax(outputs))}

    def evaluation_plots(self, outputs: np.ndarray, targets: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
        """The word-level tag confusion matrix (which types are mistaken for which, and boundary errors)."""
        from forgeml.evaluate import plots

        true, predicted = self.word_tags(outputs, targets)
        index = {tag: i for i, tag in enumerate(self.tags)}
        matrix = np.zeros((len(self.tags), len(self.tags)), dtype=np.int64)
        for t_row, p_row in zip(true, predicted, strict=True):
            for t, p in zip(t_row, p_row, strict=True):
                matrix[index[t], index[p]] += 1
        plots.confusion_matrix(matrix.tolist(), self.tags, folder / "confusion_matrix.png", "Tag confusion (words)")

    def tag(
        self, model: torch.nn.Module, sentences: Sequence[str | Sequence[str]], batch_size: int = 64
    ) -> list[list[dict[str, Any]]]:
        """Entities of each sentence: a string (split into CoNLL-style words; offsets into the string) or a list
        of words (offsets into the words joined by single spaces). Each entity is {entity, text, start, end,
        score, words: [first, last + 1]}."""
        texts, word_lists, offset_lists = [], [], []
        for index, sentence in enumerate(sentences):
            if isinstance(sentence, str):
                words, offsets = split_words(sentence)
                text = sentence
            elif isinstance(sentence, Sequence) and all(isinstance(word, str) for word in sentence):
                words = [word for word in sentence]
                if any(not word.strip() for word in words):
                    raise DataError(f"input {index}: a word is empty or only spaces; give words, not separators")
                text, offsets = joined_offsets(words)
            else:
                raise DataError(
                    f"input {index}: expected a sentence (string) or a list of words, got {type(sentence).__name__}"
                )
            texts.append(text)
            word_lists.append(words)
            offset_lists.append(offsets)
        from forgeml.evaluate.outputs import model_outputs  # it imports tasks/: loaded once everything is

        answers: list[list[dict[str, Any]]] = []
        for start in range(0, len(texts), PREDICT_CHUNK):
            stop = start + PREDICT_CHUNK
            split = self.encode_words(word_lists[start:stop])
            outputs, _ = model_outputs(model, split, batch_size)
            for row, text in enumerate(texts[start:stop]):
                positions = split.first_pieces[row]
                tags = ["O"] * len(positions)
                scores = np.zeros(len(positions))
                seen = positions >= 0  # words cut off by max_length stay O
                decoded, probabilities = self.decode(outputs[row, positions[seen]])
                for slot, tag, probability in zip(np.flatnonzero(seen), decoded, probabilities, strict=True):
                    tags[slot], scores[slot] = tag, probability
                answers.append(entity_spans(text, offset_lists[start + row], tags, scores))
        return answers

    def samples(self, model: torch.nn.Module, dataset: Dataset, seed: int) -> list[dict[str, Any]]:
        """A few held-out sentences with entities (seeded choice): the predicted entities beside the true ones."""
        with_entities = [row for row, tags in enumerate(dataset[TAGS]) if any(tag != "O" for tag in tags)]
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(with_entities, min(SAMPLES, len(with_entities)), replace=False).tolist())
        words = [dataset[row][TOKENS] for row in chosen]
        found = self.tag(model, words)
        samples = []
        for row, sentence, entities in zip(chosen, words, found, strict=True):
            true = tag_entities(dataset[row][TAGS])
            samples.append(
                {
                    "sentence": " ".join(sentence),
                    "entities": "; ".join(f"{e['text']} ({e['entity']}, {e['score']:.2f})" for e in entities) or "—",
                    "reference": "; ".join(f"{' '.join(sentence[a:b])} ({name})" for name, a, b in true),
                }
            )
        return samples

    # --- data facts -----------------------------------------------------------------------------

    def read_file(self, path: Path, config: Any) -> Dataset:
        """Tagged sentences from a JSONL or CoNLL file (`forgeml evaluate RUN --data FILE`)."""
        return read_tagged(Path(path), config.data.tokens, config.data.label, config.data.format)[0]

    def baselines(self, splits: dict[str, Dataset | None], seed: int = 0) -> dict[str, Any]:
        """The most-frequent-tag-per-word baseline on the test (else validation) split."""
        from forgeml.evaluate.tag_baseline import fit_tag_baselines

        return fit_tag_baselines(splits)

    def token_profile(self, split: TaggedSplit) -> dict[str, Any]:
        """Pieces per sentence (percentiles), sentences and words cut off by model.max_length."""
        from forgeml.data.profile import length_percentiles

        return {
            **length_percentiles(split.lengths),
            "truncated": split.truncated_rows,
            "truncated_words": split.truncated_words,
        }

    def unknown_token_share(self, split: TaggedSplit) -> float | None:
        """Share of the pieces (special tokens left out) the tokenizer could only call [UNK]."""
        if not len(split):
            return None
        return unknown_token_share(np.concatenate([np.asarray(row) for row in split.ids]), self.tokenizer)

    # --- saving ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"text_columns": self.text_columns},
            "tags": self.tags,
            "normalize": self.normalize,
            "model": {**self.model_options, "architecture": "token-tagger"},
        }

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any = None) -> TokenClassificationTask:
        options = dict(state["model"])
        options.pop("architecture", None)
        task = cls({**options, "backbone": str(folder / "tokenizer")}, state["tags"], state.get("normalize", True))
        task.model_options["backbone"] = options["backbone"]  # keep the name the user chose
        return task

    @classmethod
    def load(
        cls, folder: Path, state: dict[str, Any], target: Any = None
    ) -> tuple[TokenClassificationTask, TokenTagger]:
        task = cls.from_saved(folder, state)
        if not task.tags:
            raise ForgeError(f"{folder / 'task.json'}: no tags recorded")
        model = TokenTagger.from_config(folder / "encoder", len(task.tags), task.model_options["dropout"])
        model.output_length = task.max_length
        load_model(model, str(folder / "model.safetensors"))
        return task, model


def _first_pieces(word_ids: list[int | None], words: int) -> np.ndarray:
    """Per word, the position of its first piece; -1 for a word with no piece (cut off by max_length)."""
    positions = np.full(words, -1, dtype=np.int64)
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            positions[word] = position
        previous = word
    return positions


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _viterbi(log_probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The tag path with the highest summed log-probability using only allowed transitions (`allowed[-1]`:
    which tags may start)."""
    forbidden = np.where(allowed, 0.0, -np.inf)
    score = log_probs[0] + forbidden[-1]
    back = np.zeros(log_probs.shape, dtype=np.int64)
    for step in range(1, len(log_probs)):
        candidates = score[:, None] + forbidden[:-1]  # [previous, next]
        back[step] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_probs[step]
    path = np.zeros(len(log_probs), dtype=np.int64)
    path[-1] = int(score.argmax())
    for step in range(len(log_probs) - 1, 0, -1):
        path[step - 1] = back[step, path[step]]
    return path
