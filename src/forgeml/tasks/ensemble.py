"""Ensembles: finished runs of one task and label set fused into one model (`forgeml ensemble RUN...`).

The members were trained and judged on the same data (their `data:` sections must be equal, so their
splits are the same rows); the ensemble is scored on those splits like any run. Nothing is trained by
gradient: `mean` and `vote` have nothing to fit, and `stack` fits a logistic (or, for a number, ridge)
regression on the members' outputs on the validation split, which none of them trained on. The
ensemble's `model/` holds a copy of every member's model (so the run stands alone) and `task.json`.

Members whose inputs are encoded alike (the same tokenizer, text columns and length; the same tabular
preprocessing) share one encoding of each request: three seeds of one recipe tokenize a batch once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn

from forgeml.errors import ConfigError
from forgeml.evaluate.outputs import model_outputs
from forgeml.models.ensemble import EnsembleModel
from forgeml.tasks.base import EncodedSplit, TargetTask
from forgeml.workspace import atomic_write_json

ENSEMBLE = "ensemble"  # task.json's "task" for an ensemble's model folder
STACKER = "stacker.safetensors"


class EnsembleSplit:
    """One split encoded for every input group: a batch holds each group's inputs under its prefix."""

    def __init__(self, splits: Sequence[EncodedSplit]):
        self.splits = list(splits)
        self.lengths = np.max(np.stack([split.lengths for split in self.splits]), axis=0)
        self.targets = getattr(self.splits[0], "targets", None)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        inputs: dict[str, torch.Tensor] = {}
        targets = None
        for group, split in enumerate(self.splits):
            own, group_targets = split.batch(rows)
            inputs |= {f"g{group}.{name}": tensor for name, tensor in own.items()}
            targets = group_targets if group == 0 else targets
        return inputs, targets


class EnsembleTask(TargetTask):
    """The members' task (its name, target and input columns) answered by all of them together."""

    explainable = False  # attributions are per model: explain a member run instead

    def __init__(self, members: Sequence[Any], models: Sequence[nn.Module], method: str, sources: list[dict[str, Any]]):
        first = members[0]
        self.members, self.models = list(members), list(models)
        self.method, self.sources = method, sources
        self.name = first.name
        self.target = first.target
        self.groups = input_groups(self.members)
        self.stacker: nn.Linear | None = None
        for attribute in ("text_columns", "features"):  # what the predictor and the audits read the inputs by
            if hasattr(first, attribute):
                setattr(self, attribute, getattr(first, attribute))

    @property
    def classification(self) -> bool:
        return hasattr(self.target, "classes")

    def fit(self, train: Dataset) -> None:
        """Nothing: the members were fitted on this training split already."""

    def build_model(self) -> EnsembleModel:
        return EnsembleModel(self.models, self.groups, self.method, self.classification, self.stacker)

    def encode(self, dataset: Dataset, source: str = "", with_targets: bool = True) -> EnsembleSplit:
        """Each input group encodes the rows once (its first member's encoding); targets come with the first."""
        leaders = {group: self.members[index] for index, group in reversed(list(enumerate(self.groups)))}
        return EnsembleSplit(
            [leaders[group].encode(dataset, source, with_targets and group == 0) for group in sorted(leaders)]
        )

    def state(self) -> dict[str, Any]:
        return {
            "task": ENSEMBLE,
            "of": self.name,
            "method": self.method,
            "members": [{"folder": f"members/{index}", **source} for index, source in enumerate(self.sources)],
            "target": self.target.state(),
        }

    def save_inputs(self, folder: Path) -> None:
        for index, member in enumerate(self.members):
            member.save_inputs(folder / "members" / str(index))
        atomic_write_json(folder / "task.json", self.state())

    def save(self, folder: Path, model: EnsembleModel) -> None:
        """Every member's model in members/<i>/ (as its own run saved it), the stacker, then task.json."""
        for index, (member, member_model) in enumerate(zip(self.members, model.members, strict=True)):
            member.save(folder / "members" / str(index), member_model)
        if model.stacker is not None:
            save_file(
                {name: value.contiguous() for name, value in model.stacker.state_dict().items()}, folder / STACKER
            )
        atomic_write_json(folder / "task.json", self.state())

    @classmethod
    def load(cls, folder: Path, state: dict[str, Any], target: Any) -> tuple[EnsembleTask, EnsembleModel]:
        from forgeml.tasks import load_task

        loaded = [load_task(folder / member["folder"]) for member in state["members"]]
        sources = [{k: v for k, v in member.items() if k != "folder"} for member in state["members"]]
        task = cls([t for t, _ in loaded], [m.eval() for _, m in loaded], state["method"], sources)
        if (folder / STACKER).is_file():
            weights = load_file(folder / STACKER)
            task.stacker = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            task.stacker.load_state_dict(weights)
        return task, task.build_model()

    @classmethod
    def from_saved(cls, folder: Path, state: dict[str, Any], target: Any) -> EnsembleTask:
        from forgeml.tasks import load_task_inputs

        members = [load_task_inputs(folder / member["folder"]) for member in state["members"]]
        sources = [{k: v for k, v in member.items() if k != "folder"} for member in state["members"]]
        return cls(members, [], state["method"], sources)


def input_groups(members: Sequence[Any]) -> list[int]:
    """A group index per member: members whose inputs are encoded identically share one group."""
    keys: dict[str, int] = {}
    groups = []
    for index, member in enumerate(members):
        key = _encoding_key(member) or f"member {index}"
        groups.append(keys.setdefault(key, len(keys)))
    return groups


def _encoding_key(task: Any) -> str | None:
    """What determines a member's encoding of a row, as a hash; None when it cannot be told (never shared)."""
    tokenizer = getattr(task, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # text: the whole tokenizer (normaliser, vocabulary, templates), columns, length
        described = [type(task).__name__, task.text_columns, task.model_options.get("max_length"), backend.to_str()]
    elif hasattr(task, "preprocessor"):  # tables: the fitted scaling and vocabularies
        described = [type(task).__name__, task.features, task.preprocessor.state()]
    else:
        return None
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def from_runs(runs: Sequence[str | Path], method: str) -> EnsembleTask:
    """The ensemble of finished runs (each loaded, its artefacts checked), refused unless they answer the same
    question on the same data: one task, one label set, the same inputs, equal `data:` sections."""
    from forgeml.api import Predictor

    if len(runs) < 2:
        raise ConfigError(f"ensemble.members: {len(runs)} run(s); an ensemble needs at least 2")
    predictors = [Predictor(run) for run in runs]
    first = predictors[0]
    for index, predictor in enumerate(predictors):
        where = f"ensemble.members[{index}] ({predictor.run.path})"
        if getattr(predictor.task, "target", None) is None or predictor.generates:
            raise ConfigError(f"{where}: a {predictor.task.name} run does not predict labels or numbers")
        if isinstance(predictor.task, EnsembleTask):
            raise ConfigError(f"{where}: is an ensemble itself; name its members instead")
        if predictor.task.name != first.task.name:
            raise ConfigError(f"{where}: task {predictor.task.name!r}; the first member's is {first.task.name!r}")
        if predictor.task.target.state() != first.task.target.state():
            raise ConfigError(f"{where}: predicts {_labels(predictor)}; the first member predicts {_labels(first)}")
        if list(predictor.input_columns) != list(first.input_columns):
            raise ConfigError(f"{where}: reads {predictor.input_columns}; the first member reads {first.input_columns}")
        differing = _first_difference(first.config.data.model_dump(), predictor.config.data.model_dump(), "data")
        if differing:
            raise ConfigError(
                f"{where}: {differing} differs from the first member's; members must be trained and judged on "
                "the same data and splits"
            )
    if method == "vote" and not hasattr(first.task.target, "classes"):
        raise ConfigError("ensemble.method: vote needs classes; for a number use mean or stack")
    sources = [{"run": str(p.run.path), "id": p.run.id} for p in predictors]
    return EnsembleTask([p.task for p in predictors], [p.torch_model for p in predictors], method, sources)


def fit_ensemble(task: EnsembleTask, model: EnsembleModel, encoded: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Fit the stacker (method stack) on the members' validation outputs and score every member on the held-out
    splits. Returns the summary for metrics.json (method, groups, each member's metrics) and the ensemble's
    validation (outputs, targets), or None without a validation split."""
    started = time.perf_counter()
    outputs = {
        name: _member_outputs(model, encoded[name]) for name in ("validation", "test") if encoded.get(name) is not None
    }
    if task.method == "stack":
        if "validation" not in outputs:
            raise ConfigError(
                "ensemble.method: stack fits on the members' validation outputs; the data has no validation split"
            )
        model.stacker = task.stacker = _fit_stacker(*outputs["validation"], task.classification)
    members = []
    for index, source in enumerate(task.sources):
        scores = {name: task.metrics(member[index], targets) for name, (member, targets) in outputs.items()}
        members.append({**source, **{name: _scalars(score) for name, score in scores.items()}})
    validation = None
    if "validation" in outputs:
        member_outputs, targets = outputs["validation"]
        with torch.no_grad():
            validation = (model.fuse(torch.from_numpy(member_outputs)).numpy(), targets)
    summary = {
        "method": task.method,
        "members": members,
        "input_groups": len(set(task.groups)),
        "seconds": time.perf_counter() - started,
    }
    if task.stacker is not None:
        summary["stacker"] = {"inputs": task.stacker.in_features, "outputs": task.stacker.out_features}
    return summary, validation


class _MemberOutputs(nn.Module):
    """Every member's outputs side by side (batch x members*outputs), for `model_outputs` to batch."""

    def __init__(self, ensemble: EnsembleModel):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_outputs(**inputs).permute(1, 0, 2).flatten(1)


def _member_outputs(model: EnsembleModel, split: EncodedSplit) -> tuple[np.ndarray, np.ndarray]:
    """(members x rows x outputs, targets) of one split, each member run once per batch."""
    flat, targets = model_outputs(_MemberOutputs(model), split)
    return flat.reshape(len(flat), len(model.members), -1).transpose(1, 0, 2), targets


def _fit_stacker(member_outputs: np.ndarray, targets: np.ndarray, classification: bool) -> nn.Linear:
    """A linear model on the members' log-probabilities (or values), L2-regularised (scikit-learn's defaults)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    features = member_outputs.transpose(1, 0, 2).reshape(member_outputs.shape[1], -1)
    if classification:
        classes = member_outputs.shape[2]
        fitted = LogisticRegression(max_iter=2000).fit(features, targets)
        weight, bias = fitted.coef_, fitted.intercept_
        if len(fitted.classes_) != classes:
            raise ConfigError(
                f"ensemble.method: stack: the validation split has {len(fitted.classes_)} of the {classes} classes; "
                "the stacker cannot learn the others (use mean or vote)"
            )
        if classes == 2:  # scikit-learn gives one score for the second class; logits [0, score] mean the same
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    else:
        fitted = Ridge().fit(features, targets.reshape(len(targets), -1))
        weight, bias = np.atleast_2d(fitted.coef_), np.atleast_1d(fitted.intercept_)
    stacker = nn.Linear(features.shape[1], weight.shape[0])
    with torch.no_grad():
        stacker.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        stacker.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return stacker


def _first_difference(first: Any, other: Any, path: str) -> str | None:
    """The key path of the first value that differs between two config dicts, e.g. 'data.split.seed'."""
    if isinstance(first, dict) and isinstance(other, dict):
        for key in sorted(set(first) | set(other), key=str):
            found = _first_difference(first.get(key), other.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if first == other else path


def _labels(predictor: Any) -> str:
    classes = getattr(predictor.task.target, "classes", None)
    return f"classes {classes}" if classes is not None else "a number"


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if isinstance(value, int | float)}
