"""The training loop: plain PyTorch, on one screen, with Accelerate hiding the device.

Batches are built from a seeded permutation per epoch (length-grouped to avoid computing padding),
so a checkpoint only needs (epoch, batch index) plus the RNG, optimizer and scheduler states to
continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_model
from torch import nn

from forgeml.config import LOWER_IS_BETTER, TrainConfig
from forgeml.errors import ConfigError
from forgeml.evaluate.metrics import scalar_metrics
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.train import distributed
from forgeml.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from forgeml.train.peak import matmul_peak_flops
from forgeml.train.progress import ProgressBar

BEST_WEIGHTS = "best.safetensors"
LOG_EVERY = 10  # optimizer steps between train-log lines


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    steps: int
    best_step: int | None
    best_metric: float | None
    watched_metric: str
    stopped_early: bool
    samples_per_second: float
    mfu: float
    seconds: float
    privacy: dict[str, Any] | None = None  # DP-SGD: the plan and the epsilon spent
    federated: dict[str, Any] | None = None  # federated training: clients, rounds, per-client scores, privacy
    ensemble: dict[str, Any] | None = None  # an ensemble of trained runs: method, members and their scores
    # (outputs, targets) on validation of the weights the model ends with, when this process evaluated
    # them (not after a resume): the final report reuses them instead of running validation again.
    validation_outputs: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


class RowSubset:
    """A fixed subset of a split's rows, fetched through the split itself (`train.eval_batches`)."""

    def __init__(self, split: EncodedSplit, rows: np.ndarray):
        self.split, self.rows = split, rows
        self.lengths = split.lengths[rows]

    @classmethod
    def seeded(cls, split: EncodedSplit, size: int, seed: int) -> EncodedSplit:
        """`size` rows drawn once with `seed` (in their original order), or the split itself if it is no larger."""
        if size >= len(split):
            return split
        return cls(split, np.sort(np.random.default_rng(seed).choice(len(split), size, replace=False)))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return self.split.batch(self.rows[np.asarray(rows, dtype=np.int64)].tolist())


def event_log(history: list[dict[str, Any]], log_path: Path | None) -> Callable[[dict[str, Any]], None]:
    """`record(event)`: appends to `history` and, as a JSON line, to `log_path`, which starts over from `history`
    (after a resume the log holds what the checkpoint knew)."""
    if log_path:
        log_path.write_text("".join(json.dumps(event) + "\n" for event in history), encoding="utf-8")

    def record(event: dict[str, Any]) -> None:
        history.append(event)
        if log_path:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(event) + "\n")

    return record


def validation_metrics(task: Task, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The task's scalar metrics and its loss on one scored split."""
    metrics = scalar_metrics(task.metrics(outputs, targets))
    metrics["loss"] = float(task.loss(torch.from_numpy(outputs), torch.from_numpy(targets)))
    return metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # torch.use_deterministic_algorithms also imports torch._inductor (1.5 s) just to set a flag for
    # torch.compile, which forgeml does not use: set the eager flag alone when torch offers it.
    set_deterministic = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_deterministic is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_deterministic(True, warn_only=True)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool) -> list[np.ndarray]:
    """Row indices per batch for one epoch; the same seed always gives the same batches.

    Length grouping (as Hugging Face's LengthGroupedSampler): shuffle, cut into mega-batches of
    50 batches, sort each by length so a batch holds similar lengths, then shuffle batch order.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    mega = batch_size * 50
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and normalisation weights (the usual transformer recipe)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    betas = (0.9 if config.adam_beta1 is None else config.adam_beta1, config.adam_beta2 or 0.999)
    try:
        # The fused kernel is ~10x faster than the default on CPU (10 ms against 137 ms a step for
        # MiniLM's 22M parameters): at short sequence lengths that is a third of the step.
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # a device or build without the fused kernel
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    warmup = int(config.warmup_ratio * total_steps)
    floor = config.min_lr_ratio or 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.scheduler == "cosine":
            decayed = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        else:
            decayed = max(0.0, 1.0 - progress)
        return floor + (1.0 - floor) * decayed  # down to lr * min_lr_ratio, as nanoGPT's min_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _precision(config: TrainConfig) -> str:
    """bf16 autocast on a CUDA device that supports it (weights and optimizer stay fp32), fp32 elsewhere.

    A CPU has no fast bf16 matmuls for training on most machines, and fp16 would need loss scaling; DP-SGD's
    per-example gradients (Opacus) stay in fp32 too."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not config.privacy:
        return "bf16"
    return "no"


def _compiled(model: nn.Module) -> nn.Module:
    """`torch.compile` of `model`, refused with a reason where it cannot work rather than failing mid-run."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise ConfigError("train.compile: torch.compile needs a C++ compiler on CPU and none is installed")
    # A different batch shape (an epoch's last, shorter batch) recompiles once with dynamic shapes.
    return torch.compile(model)


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """Use `threads` CPU threads inside the block, and give the caller's setting back after it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(
    task: Task,
    model: nn.Module,
    train_split: EncodedSplit,
    validation_split: EncodedSplit | None,
    config: TrainConfig,
    checkpoints: Path | None = None,
    log_path: Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
    on_evaluation: Callable[[int, dict[str, float]], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` in place; at the end it holds the best weights seen on validation.

    With `checkpoints`, a resumable checkpoint is written every `config.checkpoint_every` steps and
    `resume=True` continues from the latest one; `log_path` receives JSON lines of progress.
    `on_evaluation(step, metrics)` hears every validation (a tuner's pruner: an exception it raises stops
    the training and propagates). `penalty()` is added to every batch's loss (FedProx's proximal term).
    """
    with thread_count(config.threads):
        return _train(
            task,
            model,
            train_split,
            validation_split,
            config,
            checkpoints,
            log_path,
            resume,
            show_progress,
            on_evaluation,
            penalty,
        )


def _train(
    task: Task,
    model: nn.Module,
    train_split: EncodedSplit,
    validation_split: EncodedSplit | None,
    config: TrainConfig,
    checkpoints: Path | None,
    log_path: Path | None,
    resume: bool,
    show_progress: bool,
    on_evaluation: Callable[[int, dict[str, float]], None] | None,
    penalty: Callable[[], torch.Tensor] | None,
) -> TrainResult:
    seed_everything(config.seed)
    rank, processes = distributed.rank_and_size()
    lead = rank == 0  # the process that writes checkpoints and best weights (all of them train)
    if processes > 1 and config.privacy:
        raise ConfigError("train.privacy: DP-SGD runs in one process; remove --nproc (or train.privacy)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_precision(config))
    batches_per_epoch = math.ceil(len(train_split) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    plan = None
    if config.privacy:  # before the optimizer: the plan may freeze embedding tables
        from forgeml.train import privacy

        plan = privacy.plan_privacy(config.privacy, model, len(train_split), config.batch_size, total_steps)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if plan:
        model, optimizer = privacy.make_private(model, optimizer, plan, config.batch_size)
    adversary = None
    if config.adversarial:
        from forgeml.train.adversarial import make_adversary

        adversary = make_adversary(config.adversarial, raw_model, task.loss)
    mix = getattr(task, "training_batch", None)  # a task may reshape its training batches (image mixing)
    # Only the training step is compiled: evaluation runs the eager model (another shape and mode would
    # cost a second compilation for a few batches). The compiled wrapper shares the model's parameters.
    train_forward = _compiled(model) if config.compile else model
    watched_split = validation_split
    if validation_split is not None and config.eval_batches:
        watched_split = RowSubset.seeded(validation_split, config.eval_batches * config.eval_batch_size, config.seed)
    watched = (config.early_stopping.metric if config.early_stopping else None) or task.primary_metric
    lower_is_better = watched in LOWER_IS_BETTER
    peak = matmul_peak_flops(accelerator.device)

    state: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "history": [],
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "finished": False,
    }
    checkpoint = latest_checkpoint(checkpoints) if resume and checkpoints else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, raw_model, optimizer, scheduler)
    record = event_log(state["history"], log_path)
    window = {"samples": 0, "seconds": 0.0, "flops": 0.0, "loss": 0.0, "batches": 0}
    totals = {"samples": 0, "seconds": 0.0, "flops": 0.0}
    started = time.perf_counter()
    best_in_memory: dict[str, torch.Tensor] = {}
    best_outputs: dict[str, np.ndarray] = {}

    def evaluate() -> bool:
        """Validate, keep the best weights, return True when early stopping says stop."""
        # The unwrapped model: the same weights, without DDP's synchronisation (every process evaluates alike).
        outputs, targets = model_outputs(raw_model, watched_split, config.eval_batch_size, accelerator.device)
        metrics = validation_metrics(task, outputs, targets)
        if plan:
            metrics["epsilon"] = plan.spent_epsilon(state["step"])
        record({"event": "eval", "step": state["step"], "epoch": state["epoch"], **metrics})
        value = metrics.get(watched)
        if value is None:
            raise ConfigError(
                f"train.early_stopping.metric: {watched!r} is not a validation metric; choose from {sorted(metrics)}"
            )
        if on_evaluation is not None:
            on_evaluation(state["step"], metrics)
        best = state["best"]
        if best is None or (value < best if lower_is_better else value > best):
            state.update(best=value, best_step=state["step"], bad_evals=0)
            best_outputs.update(outputs=outputs, targets=targets)
            if state["step"] >= total_steps:
                pass  # the last evaluation: the weights in memory are the ones to keep, no copy needed
            elif checkpoints:
                if lead:
                    save_weights(raw_model, checkpoints / BEST_WEIGHTS)
            else:
                best_in_memory.update({k: v.detach().clone() for k, v in raw_model.state_dict().items()})
            return False
        state["bad_evals"] += 1
        return bool(config.early_stopping and state["bad_evals"] >= config.early_stopping.patience)

    def checkpoint_now() -> None:
        if checkpoints and accelerator.is_main_process:
            save_checkpoint(checkpoints, state["step"], raw_model, optimizer, scheduler, state, config.keep_checkpoints)

    stop = state["finished"] or state["step"] >= total_steps
    model.train()
    with ProgressBar("training", total_steps, show_progress, completed=state["step"]) as bar:
        while not stop and state["epoch"] < config.epochs:
            seed = config.seed + state["epoch"]
            if plan:
                batches = privacy.poisson_batches(len(train_split), plan.sample_rate, batches_per_epoch, seed)
            else:
                batches = epoch_batches(train_split.lengths, config.batch_size, seed, config.group_by_length)
                batches = distributed.shard(batches, rank, processes)  # this process's rows of each batch
            for index in range(state["batch"], len(batches)):
                tick = time.perf_counter()
                rows = batches[index]
                if len(rows) == 0:  # Poisson sampling can draw nobody (vanishingly rare at real batch sizes)
                    state["batch"] = index + 1
                    continue
                inputs, targets = train_split.batch(rows.tolist())
                inputs = {name: tensor.to(accelerator.device) for name, tensor in inputs.items()}
                targets = targets.to(accelerator.device)
                if adversary:  # PGD: the step trains on the batch's attack instead (FGM keeps the batch)
                    inputs = adversary.craft(inputs, targets)
                if mix is not None:  # e.g. mixup / CutMix: images mixed within the batch, targets in proportion
                    inputs, targets = mix(inputs, targets)
                loss = task.loss(train_forward(**inputs), targets)
                if config.l1:
                    loss = loss + config.l1 * sum(p.abs().sum() for p in raw_model.parameters() if p.ndim >= 2)
                if penalty is not None:
                    loss = loss + penalty()
                accelerator.backward(loss / config.grad_accum_steps)
                if adversary and adversary.second_pass:  # FGM: the batch again at its worst-case embeddings
                    with adversary.perturbed():
                        adversarial_loss = task.loss(model(**inputs), targets)
                    accelerator.backward(adversarial_loss / config.grad_accum_steps)
                boundary = (index + 1) % config.grad_accum_steps == 0 or index == len(batches) - 1
                if boundary:
                    if config.max_grad_norm and not plan:  # DP-SGD clips each example instead
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    state["batch"] = index + 1
                elapsed = time.perf_counter() - tick
                passes = adversary.passes if adversary else 1  # an attack step costs about a training step
                flops = raw_model.training_flops(rows, int(train_split.lengths[rows].max())) * passes
                for tally in (window, totals):
                    tally["samples"] += len(rows) * processes  # the whole job's throughput
                    tally["seconds"] += elapsed
                    tally["flops"] += flops
                window["loss"] += loss.item()
                window["batches"] += 1
                if not boundary:
                    continue
                speed = window["samples"] / max(window["seconds"], 1e-9)
                mfu = window["flops"] / max(window["seconds"], 1e-9) / peak
                mean_loss = window["loss"] / window["batches"]
                bar.advance(1, {"loss": f"{mean_loss:.4f}", "samples/s": f"{speed:.0f}", "mfu": f"{mfu:.1%}"})
                if state["step"] % LOG_EVERY == 0 or state["step"] == total_steps:
                    record(
                        {
                            "event": "train",
                            "step": state["step"],
                            "epoch": state["epoch"],
                            "loss": mean_loss,
                            "lr": scheduler.get_last_lr()[0],
                            "samples_per_s": speed,
                            "mfu": mfu,
                        }
                    )
                    window = dict.fromkeys(window, 0)
                if validation_split is not None and config.eval_every and state["step"] % config.eval_every == 0:
                    stop = evaluate()
                stop = stop or state["step"] >= total_steps
                if stop:
                    break
                if state["step"] % config.checkpoint_every == 0:
                    checkpoint_now()
            else:  # the epoch ran to its end
                state["epoch"], state["batch"] = state["epoch"] + 1, 0
                if validation_split is not None and not config.eval_every:
                    stop = evaluate()
                if not (stop or state["step"] >= total_steps or state["epoch"] >= config.epochs):
                    checkpoint_now()  # otherwise the finished checkpoint below follows at once
        evaluated_last = state["history"] and state["history"][-1]["event"] == "eval"
        if validation_split is not None and not state["finished"] and not evaluated_last:
            evaluate()
        if not state["finished"]:
            state["finished"] = True
            checkpoint_now()

    if plan:
        privacy.release(model)
    if adversary:
        adversary.remove()
    # The best weights were copied aside only when a later evaluation could still beat them.
    best_path = checkpoints / BEST_WEIGHTS if checkpoints else None
    restore = lead and state["best_step"] is not None and state["best_step"] < state["step"]
    if restore and best_path is not None and best_path.is_file():
        load_model(raw_model, str(best_path))
    elif restore and best_in_memory:
        raw_model.load_state_dict(best_in_memory)
    if totals["flops"] > totals["seconds"] * peak:  # over 100 %: the cached peak was measured on busy cores
        peak = matmul_peak_flops(accelerator.device, refresh=True)
    return TrainResult(
        history=state["history"],
        steps=state["step"],
        best_step=state["best_step"],
        best_metric=state["best"],
        watched_metric=watched,
        stopped_early=state["step"] < total_steps,
        samples_per_second=totals["samples"] / max(totals["seconds"], 1e-9),
        mfu=totals["flops"] / max(totals["seconds"], 1e-9) / peak,
        seconds=time.perf_counter() - started,
        privacy=plan.summary(state["step"]) if plan else None,
        # Outputs on a subset of validation are not the split's: the report then scores the whole split itself.
        validation_outputs=(
            (best_outputs["outputs"], best_outputs["targets"])
            if best_outputs and watched_split is validation_split
            else None
        ),
    )
