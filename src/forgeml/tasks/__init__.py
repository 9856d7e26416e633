"""Tasks: everything that differs between text, text-pair, regression and tabular problems.

`build_task(config, input_columns)` makes a fresh task for a run; `load_task(folder)` rebuilds
a saved task and its trained model from a run's `model/` folder.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from forgeml.config import ForgeConfig
from forgeml.data.prepare import PreparedData, prepare
from forgeml.errors import ArtifactError
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.tasks.image import ImageClassificationTask
from forgeml.tasks.image_generation import ImageGenerationTask
from forgeml.tasks.instruction_tuning import InstructionTuningTask
from forgeml.tasks.language_modeling import LanguageModelingTask
from forgeml.tasks.masked_lm import MaskedLanguageModelingTask
from forgeml.tasks.tabular import TabularTask
from forgeml.tasks.targets import ClassLabels, NumericTarget, target_from_state
from forgeml.tasks.text import TextTask
from forgeml.tasks.token_classification import TokenClassificationTask
from forgeml.workspace import read_json

__all__ = ["EncodedSplit", "Task", "build_task", "load_task", "prepare_data"]


def prepare_data(config: ForgeConfig) -> PreparedData:
    """The run's splits: labelled tables for prediction tasks, documents for language models, prompt/response
    examples for instruction tuning."""
    if config.task in ("language-modeling", "masked-lm"):
        from forgeml.data.corpus import prepare_corpus

        return prepare_corpus(config)
    if config.task == "instruction-tuning":
        from forgeml.data.instructions import prepare_instructions

        return prepare_instructions(config)
    if config.task == "token-classification":
        from forgeml.data.tagged import prepare_tagged

        return prepare_tagged(config)
    return prepare(config)


def build_task(config: ForgeConfig, input_columns: list[str]) -> Task:
    if config.task == "language-modeling":
        model = config.model.model_dump(
            include={"backbone", "architecture", "style", "tokenizer", "vocab_size", "lora"}
        )
        return LanguageModelingTask(model, config.block_size)
    if config.task == "instruction-tuning":
        from forgeml.data.instructions import instruction_columns

        options = {
            "template": config.data.template,
            "loss_on": config.train.loss_on,
            "packing": config.data.packing,
            "columns": instruction_columns(config),
        }
        model = config.model.model_dump(include={"backbone", "lora"})
        return InstructionTuningTask(model, config.model.max_length, options)
    if config.task == "masked-lm":
        model = config.model.model_dump(include={"backbone", "architecture", "tokenizer", "vocab_size"})
        model |= {"mask_probability": config.data.mask_probability, "whole_word_mask": config.data.whole_word_mask}
        # Evaluation masks follow the split seed, so runs that differ in training seed score the same positions.
        return MaskedLanguageModelingTask(model, config.model.max_length, seed=config.data.split.seed)
    if config.task == "token-classification":
        model = config.model.model_dump(include={"backbone", "max_length", "dropout"})
        return TokenClassificationTask(model, normalize=config.data.clean.normalize)
    if config.ensemble:  # trained runs combined: their tasks come from their run directories
        from forgeml.tasks.ensemble import from_runs

        return from_runs(config.ensemble.members, config.ensemble.method)
    if config.task == "image-generation":
        model = config.model.model_dump(include={"kind", "width", "latent_size"})
        return ImageGenerationTask(model, config.evaluate.classifier, seed=config.train.seed)
    label = config.data.label
    target = ClassLabels(label) if config.is_classification else NumericTarget(label)
    if config.task == "image-classification":
        model = config.model.model_dump(include={"backbone", "width", "depths", "dropout"})
        augment = config.data.augment.model_dump() if config.data.augment else None
        return ImageClassificationTask(target, model, augment)
    if config.task.startswith("tabular"):
        model = config.model.model_dump(include={"hidden_sizes", "dropout", "categorical", "embedding_dim"})
        return TabularTask(config.task, input_columns, target, model)
    model = config.model.model_dump(include={"backbone", "max_length", "pooling", "dropout", "lora"})
    return TextTask(config.task, input_columns, target, model)


def load_task(folder: str | Path) -> tuple[Task, nn.Module]:
    """Rebuild the task and its trained model from a `model/` folder written by `Task.save`."""
    folder = Path(folder)
    state = read_json(folder / "task.json")
    return _task_class(folder, state).load(folder, state, _target(state))


def load_task_inputs(folder: str | Path) -> Task:
    """The task alone (tokenizer or tabular preprocessing, label map) from a folder written by
    `Task.save_inputs`, e.g. an `export/` folder beside its ONNX files."""
    folder = Path(folder)
    state = read_json(folder / "task.json")
    return _task_class(folder, state).from_saved(folder, state, _target(state))


def _target(state: dict):
    return target_from_state(state["target"]) if "target" in state else None


def _task_class(folder: Path, state: dict) -> type:
    by_name = (
        LanguageModelingTask,
        InstructionTuningTask,
        MaskedLanguageModelingTask,
        TokenClassificationTask,
        ImageGenerationTask,
    )
    generative = {task.name: task for task in by_name}
    if state.get("task") in generative:
        return generative[state["task"]]
    if state.get("task") == "ensemble":
        from forgeml.tasks.ensemble import EnsembleTask

        return EnsembleTask
    architecture = state.get("model", {}).get("architecture")
    if architecture == "text":
        return TextTask
    if architecture == "mlp":
        return TabularTask
    if architecture in ImageClassificationTask.architectures:  # resnet_small, or a pre-trained network
        return ImageClassificationTask
    raise ArtifactError(f"{folder / 'task.json'}: unknown model architecture {architecture!r}")
