"""Text tasks: one text (classification, regression) or a pair of texts (NLI) into an encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from safetensors.torch import load_model

from forgeml.data.io import column, table_dataset
from forgeml.data.validate import require_columns
from forgeml.models.hf import TextModel, load_tokenizer, unknown_token_share
from forgeml.tasks.base import EncoderFolderTask, Target, TargetTask

TOKENIZE_CHUNK = 2_000


class TokenizedSplit:
    """Token ids in Arrow, padded per batch to the longest row (dynamic padding)."""

    def __init__(self, columns: dict[str, list[list[int]]], targets: np.ndarray | None, pad_id: int):
        self.data = table_dataset(
            pa.table({name: pa.array(ids, pa.list_(pa.int32())) for name, ids in columns.items()})
        )
        self.targets = None if targets is None else torch.as_tensor(targets)
        self.lengths = np.fromiter((len(ids) for ids in columns["input_ids"]), dtype=np.int64)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows = list(rows)
        columns = self.data[rows]
        width = int(self.lengths[rows].max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(columns["input_ids"]):
            input_ids[i, : len(ids)] = torch.as_tensor(ids)
            attention_mask[i, : len(ids)] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in columns:
            token_types = torch.zeros((len(rows), width), dtype=torch.long)
            for i, types in enumerate(columns["token_type_ids"]):
                token_types[i, : len(types)] = torch.as_tensor(types)
            inputs["token_type_ids"] = token_types
        return inputs, None if self.targets is None else self.targets[rows]


class TextTask(TargetTask, EncoderFolderTask):
    """text-classification, text-pair-classification and (text) regression."""

    def __init__(self, name: str, text_columns: list[str], target: Target, model: dict[str, Any]):
        self.name = name
        self.text_columns = list(text_columns)
        self.target = target
        self.model_options = dict(model)  # backbone, max_length, pooling, dropout
        self.tokenizer = load_tokenizer(self.model_options["backbone"])
        self.truncated = 0

    def fit(self, train: Dataset) -> None:
        self.target.fit(column(train, self.target.column))

    def build_model(self) -> TextModel:
        options = self.model_options
        model = TextModel.from_pretrained(
            options["backbone"], self.target.num_outputs, options["dropout"], options["pooling"]
        )
        if options.get("lora"):  # adapters on the encoder; the new head trains in full
            from forgeml.models.lora import add_lora

            model.encoder = add_lora(model.encoder, options["lora"])
        return model

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> TokenizedSplit:
        require_columns(dataset, self.text_columns, source or "input", "text column")
        max_length = self.model_options["max_length"]
        columns: dict[str, list] = {"input_ids": []}
        pair = len(self.text_columns) == 2
        if pair:
            columns["token_type_ids"] = []
        texts = [column(dataset, name) for name in self.text_columns]
        for start in range(0, len(dataset), TOKENIZE_CHUNK):
            chunk = [[t or "" for t in column[start : start + TOKENIZE_CHUNK]] for column in texts]
            encoded = self.tokenizer(*chunk, truncation=True, max_length=max_length)
            columns["input_ids"] += encoded["input_ids"]
            if pair and "token_type_ids" in encoded:
                columns["token_type_ids"] += encoded["token_type_ids"]
        if pair and not columns["token_type_ids"]:
            del columns["token_type_ids"]
        targets = self.target.encode(column(dataset, self.target.column), source) if with_targets else None
        split = TokenizedSplit(columns, targets, self.tokenizer.pad_token_id or 0)
        self.truncated = int((split.lengths >= max_length).sum())
        return split

    def unknown_token_share(self, split: TokenizedSplit) -> float | None:
        """Share of a split's tokens that are [UNK] (special tokens left out), counted on the ids encoded."""
        return unknown_token_share(
            pc.list_flatten(split.data.data.table.column("input_ids")).to_numpy(), self.tokenizer
        )

    def state(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "inputs": {"text_columns": self.text_columns},
            "target": self.target.state(),
            "model": {**self.model_options, "architecture": "text"},
        }

    def save(self, folder: Path, model: TextModel) -> None:
        """Weights (safetensors), encoder config, tokenizer and task.json; LoRA adapters in adapter/ as well,
        merged into the encoder first so model.safetensors is an ordinary model."""
        from forgeml.models.lora import is_lora, merged, save_adapter

        if is_lora(model.encoder):
            save_adapter(model.encoder, folder)
            model.encoder = merged(model.encoder)
        super().save(folder, model)

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Target) -> TextTask:
        """The task written by `save_inputs` (its tokenizer from `folder/tokenizer`)."""
        options = dict(state["model"])
        options.pop("architecture", None)
        task = cls(
            state["task"], state["inputs"]["text_columns"], target, {**options, "backbone": str(folder / "tokenizer")}
        )
        task.model_options["backbone"] = options["backbone"]  # keep the name the user chose
        return task

    @classmethod
    def load(cls, folder: Path, state: dict[str, Any], target: Target) -> tuple[TextTask, TextModel]:
        task = cls.from_saved(folder, state, target)
        options = task.model_options
        model = TextModel.from_config(folder / "encoder", target.num_outputs, options["dropout"], options["pooling"])
        load_model(model, str(folder / "model.safetensors"))
        return task, model
