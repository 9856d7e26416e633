"""Federated training (`federated:` in a config): Flower's strategies over clients made from the data.

Flower is an optional extra (forgeml[federated]); this package imports it only when a federated run starts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from forgeml.config import ForgeConfig
from forgeml.data.prepare import PreparedData
from forgeml.errors import ConfigError, DataError
from forgeml.federated.partition import Partition, by_column, dirichlet
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.train.loop import TrainResult

SPLITS = ("train", "validation", "test")


def require_flower() -> None:
    """Refuse before any work when Flower is missing, saying how to get it."""
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(
            "federated: Flower is not installed; pip install 'forgeml[federated]' (it pins older FastAPI and "
            "Starlette releases, so `make setup-federated` keeps it in an environment of its own)"
        )


def client_partition(config: ForgeConfig, data: PreparedData) -> Partition:
    """Which rows of each split every client holds, from the config's `federated` section."""
    federated = config.federated
    assert federated is not None
    present = {name: data.splits[name] for name in SPLITS if data.splits.get(name) is not None}
    if federated.by_column:
        column = federated.by_column
        missing = [name for name, split in present.items() if column not in split.column_names]
        if missing:
            raise DataError(
                f"federated.by_column: no column {column!r} in the {missing[0]} data; "
                f"columns: {', '.join(present[missing[0]].column_names)}"
            )
        return by_column({name: split[column] for name, split in present.items()}, column)
    label = config.data.label
    seed = config.train.seed if federated.seed is None else federated.seed
    labels = {name: split[label] for name, split in present.items()}
    assert federated.clients is not None  # the config fills it for a Dirichlet split
    return dirichlet(labels, federated.clients, federated.alpha, seed, federated.min_client_rows)


def train_federated(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    data: PreparedData,
    encoded: dict[str, EncodedSplit],
    checkpoints: Path | None = None,
    log_path: Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
    on_evaluation: Callable[[int, dict[str, float]], Any] | None = None,
) -> TrainResult:
    """Train `model` in place by federated rounds over clients made from `data`; see federated.simulation."""
    require_flower()
    from forgeml.federated import simulation

    assert config.federated is not None
    partition = client_partition(config, data)
    return simulation.train_federated(
        task,
        model,
        encoded,
        partition,
        config.federated,
        config.train,
        checkpoints=checkpoints,
        log_path=log_path,
        resume=resume,
        show_progress=show_progress,
        on_evaluation=on_evaluation,
    )
