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
) -> tuple[np.ndarray, np.ndarray | None]:
    """(outputs, targets) in the split's row order. Rows are batched by length to avoid padding."""
    was_training = model.training
    model.eval()
    order = np.argsort(-split.lengths, kind="stable")
    outputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    with ProgressBar(description, len(split), enabled=show_progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size].tolist()
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
