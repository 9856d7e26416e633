"""What a text model makes of its inputs: the pooled vector its classification head sees, plus the
token facts the drift tests need (length, [UNK] tokens), from one pass through the model."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset

from forgeml.data.io import column
from forgeml.errors import ForgeError
from forgeml.pipeline import dataset_from_rows

if TYPE_CHECKING:
    from forgeml.api import Predictor


@dataclass
class TextPass:
    """One pass of a text model over rows, in the rows' order."""

    vectors: np.ndarray  # (rows, hidden): the pooled representation the head sees
    outputs: np.ndarray  # (rows, outputs): the head's raw outputs
    tokens: np.ndarray  # tokens per row as the model saw them (truncated), special tokens excluded
    unknown: np.ndarray  # [UNK] tokens per row
    words: np.ndarray  # whitespace-separated words per row, over all text columns, before truncation
    texts: list[str]  # each row's text columns as the model read them (prepared), joined by a space


def text_embeddings(predictor: Predictor, inputs: list[Any] | Dataset, batch_size: int = 64) -> np.ndarray:
    """The fine-tuned encoder's pooled vectors for raw inputs (texts, pairs or dicts of the text columns),
    normalised and PII-redacted as `Predictor.prepare_inputs` does before a prediction."""
    return text_pass(predictor, inputs, batch_size).vectors


@torch.inference_mode()
def text_pass(
    predictor: Predictor, inputs: list[Any] | Dataset, batch_size: int = 64, prepared: bool = False
) -> TextPass:
    """Vectors, outputs and token counts for raw inputs. `prepared`: the rows come from the run's own
    prepared splits, already normalised and redacted."""
    task = predictor.task
    columns = getattr(task, "text_columns", None)
    model = predictor.torch_model
    head = getattr(model, "head", None)
    if not columns or not isinstance(head, torch.nn.Module):
        raise ForgeError(f"{predictor.run.path}: embeddings are for text classification and regression models")
    dataset = inputs if isinstance(inputs, Dataset) else dataset_from_rows(list(inputs), columns)
    if not prepared:
        dataset = predictor.prepare_inputs(dataset)
    split = task.encode(dataset, "monitor", with_targets=False)

    captured: list[torch.Tensor] = []
    here = threading.get_ident()

    def capture(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if threading.get_ident() == here:  # a server may be answering with the same model in another thread
            captured.append(args[0].detach().float().cpu())

    # The head's input is the pooled vector (dropout is off in eval mode): a hook takes it whatever the pooling.
    hook = head.register_forward_pre_hook(capture)
    was_training = model.training
    model.eval()
    order = np.argsort(-split.lengths, kind="stable")  # length-sorted batches waste little on padding
    outputs: list[torch.Tensor] = []
    try:
        for start in range(0, len(order), batch_size):
            batch, _ = split.batch(order[start : start + batch_size].tolist())
            outputs.append(model(**batch).float().cpu())
    finally:
        hook.remove()
        model.train(was_training)
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    hidden = model.head.in_features if hasattr(model.head, "in_features") else 0
    vectors = torch.cat(captured).numpy()[restore] if captured else np.zeros((0, hidden), np.float32)
    logits = torch.cat(outputs).numpy()[restore] if outputs else np.zeros((0, 1), np.float32)

    ids = split.data.data.table.column("input_ids").combine_chunks()
    flat = pc.list_flatten(ids).to_numpy()
    parents = pc.list_parent_indices(ids).to_numpy()
    tokenizer = task.tokenizer
    unknown_id = tokenizer.unk_token_id
    special = [i for i in tokenizer.all_special_ids if i != unknown_id]
    rows = len(split)
    unknown = np.bincount(parents[flat == unknown_id], minlength=rows) if unknown_id is not None else np.zeros(rows)
    tokens = np.bincount(parents[~np.isin(flat, special)], minlength=rows)
    texts = [
        " ".join(str(text or "") for text in row) for row in zip(*(column(dataset, c) for c in columns), strict=True)
    ]
    words = np.fromiter((len(text.split()) for text in texts), np.int64, rows)
    return TextPass(vectors, logits, tokens.astype(np.int64), unknown.astype(np.int64), words, texts)
