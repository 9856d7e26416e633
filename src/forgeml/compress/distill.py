"""Knowledge distillation: a shallower copy of the model learns from the model's own softened answers.

The student keeps the teacher's embeddings and head and `layers` of its transformer layers, evenly
spaced (first and last included), so it starts close to the teacher. It is then trained by the usual
loop on the training split with the loss of Hinton et al. (2015):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(student, label)

The teacher's logits are computed once, before training, and travel with the labels in each batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from forgeml.config import DistillConfig, TrainConfig
from forgeml.errors import ConfigError
from forgeml.evaluate.outputs import model_outputs
from forgeml.models.hf import TextModel
from forgeml.tasks.base import EncodedSplit, Task


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` layer indices out of `total`, spread evenly with the first and the last included."""
    if not 1 <= keep <= total:
        raise ConfigError(f"compress.distill.layers: must be between 1 and the teacher's {total} layers, got {keep}")
    return sorted({round(float(i)) for i in np.linspace(0, total - 1, keep)})


def student_from_teacher(teacher: TextModel, layers: int) -> TextModel:
    """A copy of `teacher` with only `layers` of its transformer layers (evenly spaced)."""
    encoder_layers = getattr(getattr(teacher.encoder, "encoder", None), "layer", None)
    if not isinstance(encoder_layers, nn.ModuleList):
        raise ConfigError("compress.distill: the backbone's layers are not at encoder.layer (BERT-like models only)")
    kept = evenly_spaced(len(encoder_layers), layers)
    student = copy.deepcopy(teacher)
    student.encoder.encoder.layer = nn.ModuleList(copy.deepcopy(encoder_layers[i]) for i in kept)
    student.encoder.config.num_hidden_layers = len(kept)
    for index, layer in enumerate(student.encoder.encoder.layer):  # attention layers know their position
        if hasattr(getattr(layer, "attention", None), "self") and hasattr(layer.attention.self, "layer_idx"):
            layer.attention.self.layer_idx = index
    return student


class WithTeacher:
    """An encoded split whose targets carry the teacher's logits beside the label: [label, logit_1, ...]."""

    def __init__(self, split: EncodedSplit, teacher_logits: np.ndarray):
        self.split = split
        self.lengths = split.lengths
        self.logits = torch.as_tensor(teacher_logits, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        inputs, labels = self.split.batch(rows)
        return inputs, torch.cat([labels.float().unsqueeze(1), self.logits[list(rows)]], dim=1)


class DistillationTask:
    """The run's task with the distillation loss; everything else (metrics, answers) is the task's own."""

    def __init__(self, task: Task, temperature: float, alpha: float):
        self.task, self.temperature, self.alpha = task, temperature, alpha

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:  # validation batches carry labels only
            return self.task.loss(outputs, targets)
        labels, teacher = targets[:, 0].long(), targets[:, 1:]
        t = self.temperature
        soft = functional.kl_div(
            functional.log_softmax(outputs / t, dim=1),
            functional.log_softmax(teacher / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * t * t * soft + (1 - self.alpha) * self.task.loss(outputs, labels)


def teach(
    task: Task,
    teacher: nn.Module,
    student: nn.Module,
    training: tuple[EncodedSplit, EncodedSplit | None, TrainConfig],
    epochs: int,
    lr: float,
    temperature: float = 2.0,
    alpha: float = 0.5,
    teacher_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train `student` in place on `teacher`'s softened logits and the labels (distillation, or the
    recovery fine-tune after pruning); returns the steps and seconds it took."""
    from forgeml.train.loop import train

    if not hasattr(task.target, "classes"):
        raise ConfigError("compress: learning from softened class probabilities needs a classifier")
    train_split, validation_split, base = training
    if teacher_logits is None:
        teacher_logits, _ = model_outputs(teacher, train_split, base.eval_batch_size)
    config = base.model_copy(
        update={
            "epochs": epochs,
            "lr": lr,
            "max_steps": None,
            "privacy": None,
            "adversarial": None,
            "early_stopping": None,
        }
    )
    result = train(
        DistillationTask(task, temperature, alpha),
        student,
        WithTeacher(train_split, teacher_logits),
        validation_split,
        config,
    )
    student.eval()
    return {"steps": result.steps, "seconds": result.seconds}


def distill(
    task: Task,
    teacher: TextModel,
    training: tuple[EncodedSplit, EncodedSplit | None, TrainConfig],
    options: DistillConfig,
    teacher_logits: np.ndarray | None = None,
) -> tuple[TextModel, dict[str, Any]]:
    """Train a `options.layers`-layer student of `teacher`; return it and what training reported."""
    student = student_from_teacher(teacher, options.layers)
    trained = teach(
        task,
        teacher,
        student,
        training,
        options.epochs,
        options.lr,
        options.temperature,
        options.alpha,
        teacher_logits,
    )
    kept = evenly_spaced(teacher.encoder.config.num_hidden_layers, options.layers)
    return student, {"teacher_layers_kept": kept, **trained}
