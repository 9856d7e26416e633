"""Resumable checkpoints in safetensors + JSON (no pickle): model, optimizer, scheduler, RNG, position.

A checkpoint is written into a hidden temporary folder and renamed into place, so a process killed
mid-write leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from forgeml.errors import ArtifactError

PREFIX = "step-"


def save_checkpoint(
    folder: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    staging = folder / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_model(model, str(staging / "model.safetensors"))
    tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(staging / "optimizer.safetensors"))
    state = {
        "trainer": trainer_state,
        "optimizer": optimizer_json,
        "scheduler": scheduler.state_dict(),
    }
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    candidates = sorted(folder.glob(f"{PREFIX}*")) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore everything in place; return the trainer state (position, history, best metric)."""
    try:
        state = json.loads((path / "state.json").read_text())
        load_model(model, str(path / "model.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, RuntimeError) as error:
        raise ArtifactError(f"{path}: checkpoint is unreadable ({error})") from None
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    return state["trainer"]


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights only, atomically (used for the best model so far)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_model(model, str(staging))
    os.replace(staging, path)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, param_state in state_dict["state"].items():
        scalars[str(param_id)] = {}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.contiguous()
            else:
                scalars[str(param_id)][name] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in saved["scalars"].items()}
    for key, tensor in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = tensor
    return {"state": state, "param_groups": saved["param_groups"]}
