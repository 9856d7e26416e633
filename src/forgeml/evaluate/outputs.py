"""Run a model over an encoded split in length-sorted batches and collect its raw outputs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from forgeml.tasks.base import EncodedSplit
from forgeml.train.progress import ProgressBar


@torch.inference_mode()
def model_outputs(
    model: nn.Module,
    split: EncodedSplit,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
    description: str = "predicting",
    max_padding: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(outputs, targets) in the split's row order. Rows are batched by length to avoid padding.

    `max_padding` (e.g. 0.25) also closes a batch before padding would exceed that share of its tokens:
    for a few rows of scattered lengths (a server's micro-batch), several short calls cost less than one
    call padded to the longest row.
    """
    was_training = model.training
    model.eval()
    order = np.argsort(-split.lengths, kind="stable")
    outputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    with ProgressBar(description, len(split), enabled=show_progress) as bar:
        for rows in _batches(order, split.lengths, batch_size, max_padding):
            inputs, batch_targets = split.batch(rows)
            inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
            outputs.append(model(**inputs).float().cpu().numpy())
            if batch_targets is not None:
                targets.append(batch_targets.numpy())
            bar.advance(len(rows))
    model.train(was_training)
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    stacked = np.concatenate(outputs)[restore]
    return stacked, (np.concatenate(targets)[restore] if targets else None)


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_padding: float | None) -> list[list[int]]:
    """Consecutive runs of `order` (longest first) of at most `batch_size` rows, and with `max_padding`, of
    at most that share of padding tokens (each row is padded to the batch's first, longest row)."""
    if max_padding is None:
        return [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for row in order.tolist():
        longest = lengths[current[0]] if current else lengths[row]
        padded = longest * (len(current) + 1)
        if current and (len(current) == batch_size or padded - (tokens + lengths[row]) > max_padding * padded):
            batches.append(current)
            current, tokens = [], 0
        current.append(row)
        tokens += int(lengths[row])
    if current:
        batches.append(current)
    return batches
