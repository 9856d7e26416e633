"""Federated training simulated with Flower; the result is an ordinary model in an ordinary run.

Flower does the federated part: its strategies (FedAvg, FedProx) sample the clients of each round, configure
them and average their weights; its differential-privacy wrapper, clipping mod and RDP accountant give
client-level privacy. Each client is a Flower `ClientApp` whose local training is the same loop as any run
(train/loop.py) on that client's rows. The clients run one after another in this process: a small `Grid`
hands each of the strategy's messages straight to the ClientApp. Flower's own simulation engine would run
them in Ray workers instead, which on a laptop or CI machine costs more (start-up, one process per worker)
than it gives, and would make a run depend on the order in which workers answer.

Round by round the server validates the global weights on the validation split (kept best, as the loop keeps
its best step) and checkpoints, so a killed federation resumes at its last finished round and ends where an
uninterrupted one would: a client's local training is seeded by (seed, round, client), and the clients of a
round are sampled with Python's `random` (Flower's sampler) seeded by (seed, round).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx, Strategy
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_model
from torch import nn

from forgeml.config import LOWER_IS_BETTER, FederatedConfig, TrainConfig
from forgeml.errors import ArtifactError
from forgeml.evaluate.outputs import model_outputs
from forgeml.federated.partition import Partition
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.train.checkpoint import save_weights
from forgeml.train.loop import BEST_WEIGHTS, RowSubset, TrainResult, event_log, train, validation_metrics
from forgeml.train.progress import ProgressBar
from forgeml.workspace import atomic_write_json

STATE = "federated.json"  # round reached, history, best round, its weights file (in the checkpoints folder)
SERVER_NODE = 0  # the node id messages come from; clients are nodes 1..N
WEIGHT_KEY = "num-examples"  # FedAvg weighs each client by its rows...
UNIFORM_KEY = "uniform-weight"  # ...or, under client-level DP (whose accounting needs it), equally


class LocalGrid(Grid):
    """Flower's Grid for clients living in this process: each message is handed to the ClientApp directly."""

    def __init__(self, client_app: ClientApp, clients: int):
        self.client_app, self.clients = client_app, clients
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.clients + 1))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers in send_and_receive; there is no link to push to")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers in send_and_receive; there is no link to pull from")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a SuperLink would assign
            node = message.metadata.dst_node_id
            context = Context(
                run_id=TaskIdentity.run_id,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": self.clients},
                state=RecordDict(),
                run_config={},
            )
            replies.append(self.client_app(message, context))
        return replies


def train_federated(
    task: Task,
    model: nn.Module,
    encoded: dict[str, EncodedSplit],
    partition: Partition,
    federated: FederatedConfig,
    train_config: TrainConfig,
    checkpoints: Path | None = None,
    log_path: Path | None = None,
    resume: bool = False,
    show_progress: bool = False,
    on_evaluation: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Federated training of `model` in place over `partition`'s clients; it ends holding the best round's weights.

    `encoded` holds the encoded splits the partition indexes; the server validates on all of "validation".
    """
    seed = train_config.seed if federated.seed is None else federated.seed
    clients = len(partition.names)
    shards = {
        split: [RowSubset(encoded[split], rows) for rows in per_client] for split, per_client in partition.rows.items()
    }
    shared = _shared_names(model)
    validation = encoded.get("validation")
    watched = (train_config.early_stopping.metric if train_config.early_stopping else None) or task.primary_metric
    lower_is_better = watched in LOWER_IS_BETTER
    sampled = max(1, int(clients * federated.fraction))
    strategy, accountant = _strategy(federated, clients, sampled)
    speed: dict[str, Any] = {"samples": 0, "seconds": 0.0, "mfu": []}  # the clients' local training
    app = _client_app(task, model, shards, shared, federated, train_config, seed, speed)
    grid = LocalGrid(app, clients)

    state: dict[str, Any] = {
        "round": 0,
        "history": [],
        "best": None,
        "best_round": None,
        "bad_rounds": 0,
        "stopped": False,
    }
    if resume and checkpoints is not None and (checkpoints / STATE).is_file():
        state = _load_round(checkpoints, model)
        if accountant is not None and state["round"]:  # every finished round released one noisy average
            accountant.compose(_privacy_event(federated, sampled, clients), count=state["round"])
    record = event_log(state["history"], log_path)
    started = time.perf_counter()
    best_in_memory: dict[str, torch.Tensor] = {}
    arrays = ArrayRecord(torch_state_dict=_weights(model, shared))
    stop = bool(state.get("stopped"))  # early stopping had ended the federation before it was killed
    with (
        _flower_session(),
        ProgressBar("federated rounds", federated.rounds, show_progress, completed=state["round"]) as bar,
    ):
        for server_round in range(state["round"] + 1, federated.rounds + 1):
            if stop:
                break
            random.seed(seed * 1_000_003 + server_round)  # Flower samples the round's clients with `random`
            replies = list(grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid)))
            _raise_client_errors(replies, partition.names)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            arrays = aggregated if aggregated is not None else arrays
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            record(
                {
                    "event": "train",
                    "step": server_round,
                    "round": server_round,
                    "loss": float(np.nanmean([_metric(reply, "train_loss") for reply in replies])),
                    "clients": {
                        partition.names[reply.metadata.src_node_id - 1]: _metric(reply, "train_loss")
                        for reply in replies
                    },
                }
            )
            evaluated = list(
                grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
            )
            _raise_client_errors(evaluated, partition.names)
            client_scores = {  # clients with validation rows (and, for ROC-AUC, both classes among them)
                partition.names[reply.metadata.src_node_id - 1]: _metric(reply, watched)
                for reply in evaluated
                if _metric(reply, WEIGHT_KEY) > 0 and math.isfinite(_metric(reply, watched))
            }
            metrics = _validate(task, model, validation, train_config.eval_batch_size) if validation is not None else {}
            if accountant is not None:
                metrics["epsilon"] = accountant.get_privacy_spent().epsilon
            record({"event": "eval", "step": server_round, "round": server_round, **metrics, "clients": client_scores})
            if on_evaluation is not None and metrics:
                on_evaluation(server_round, metrics)
            stop = state["stopped"] = _keep_best(
                state, metrics.get(watched), server_round, lower_is_better, train_config
            )
            if state["best_round"] == server_round and server_round < federated.rounds:  # a later round may lose
                if checkpoints is not None:
                    save_weights(model, checkpoints / BEST_WEIGHTS)
                else:
                    best_in_memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state["round"] = server_round
            if checkpoints is not None:
                _save_round(checkpoints, state, model)
            bar.advance(1, {watched: f"{metrics.get(watched, float('nan')):.4f}"})

    if state["best_round"] is not None and state["best_round"] < state["round"]:
        best_path = checkpoints / BEST_WEIGHTS if checkpoints is not None else None
        if best_path is not None and best_path.is_file():
            load_model(model, str(best_path))
        elif best_in_memory:
            model.load_state_dict(best_in_memory)
    summary = _summary(federated, partition, clients, sampled, state, accountant)
    summary["clients_scored"] = _client_scores(task, model, shards, train_config.eval_batch_size, partition.names)
    return TrainResult(
        history=state["history"],
        steps=state["round"],
        best_step=state["best_round"],
        best_metric=state["best"],
        watched_metric=watched,
        stopped_early=state["round"] < federated.rounds,
        samples_per_second=speed["samples"] / max(speed["seconds"], 1e-9),
        mfu=float(np.mean(speed["mfu"])) if speed["mfu"] else 0.0,
        seconds=time.perf_counter() - started,
        federated=summary,
    )


def _client_app(
    task: Task,
    model: nn.Module,
    shards: dict[str, list[RowSubset]],
    shared: list[str],
    federated: FederatedConfig,
    train_config: TrainConfig,
    seed: int,
    speed: dict[str, Any],
) -> ClientApp:
    """One ClientApp for every client (they take turns with the one model): train locally, or evaluate.
    `shared`: the names of the weights a client sends back."""
    app = ClientApp()

    @app.train(mods=[fixedclipping_mod] if federated.privacy else [])
    def fit(message: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        settings = message.content["config"]
        server_round = int(settings["server-round"])
        global_weights = message.content["arrays"].to_torch_state_dict()
        model.load_state_dict(global_weights, strict=False)
        mu = float(settings.get("proximal-mu", 0.0))
        penalty = _proximal_term(model, global_weights, mu) if mu > 0 else None
        local = train_config.model_copy(
            update={
                "epochs": federated.local_epochs,
                "max_steps": None,
                "early_stopping": None,
                "eval_every": None,
                "compile": False,
                "seed": seed + 7_919 * server_round + client,  # every round and client draws its own batches
            }
        )
        rows = shards["train"][client]
        result = train(task, model, rows, None, local, penalty=penalty)
        losses = [event["loss"] for event in result.history if event["event"] == "train"]
        speed["samples"] += len(rows) * federated.local_epochs
        speed["seconds"] += result.seconds
        speed["mfu"].append(result.mfu)
        content = RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict=_weights(model, shared)),
                "metrics": MetricRecord(
                    {"train_loss": losses[-1] if losses else math.nan, WEIGHT_KEY: len(rows), UNIFORM_KEY: 1}
                ),
            }
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        model.load_state_dict(message.content["arrays"].to_torch_state_dict(), strict=False)
        rows = shards.get("validation", [None] * (client + 1))[client]
        scores: dict[str, float] = {WEIGHT_KEY: 0, UNIFORM_KEY: 1}
        if rows is not None and len(rows):
            scores.update(_validate(task, model, rows, train_config.eval_batch_size))
            scores[WEIGHT_KEY] = len(rows)
        return Message(RecordDict({"metrics": MetricRecord(scores)}), reply_to=message)

    return app


def _strategy(federated: FederatedConfig, clients: int, sampled: int) -> tuple[Strategy, RdpAccountant | None]:
    """Flower's FedAvg or FedProx, wrapped for client-level DP when asked (with an accountant for epsilon)."""
    weighted_by = UNIFORM_KEY if federated.privacy else WEIGHT_KEY
    options = {
        "fraction_train": federated.fraction,
        "fraction_evaluate": 1.0,
        "min_train_nodes": sampled,
        "min_evaluate_nodes": clients,
        "min_available_nodes": clients,
        "weighted_by_key": weighted_by,
        "evaluate_metrics_aggr_fn": _mean_over_scored_clients,
    }
    if federated.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=federated.proximal_mu, **options)
    else:
        strategy = FedAvg(**options)
    if federated.privacy is None:
        return strategy, None
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=federated.privacy.delta,
            population_size=clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            # Flower's accountant does not (yet) credit the randomness of client sampling: a safe upper bound.
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    wrapped = DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=federated.privacy.noise_multiplier,
        clipping_norm=federated.privacy.clipping_norm,
        num_sampled_clients=sampled,
        accountant=accountant,
    )
    return wrapped, accountant


def _privacy_event(federated: FederatedConfig, sampled: int, clients: int) -> GaussianPrivacyEvent:
    assert federated.privacy is not None
    return GaussianPrivacyEvent(
        noise_multiplier=federated.privacy.noise_multiplier, sample_size=sampled, population_size=clients
    )


def _mean_over_scored_clients(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The clients' validation metrics averaged weighted by their rows, each over the clients that measured it (a
    client without validation rows measured nothing; one whose rows are all one class has no ROC-AUC)."""
    metrics = [next(iter(record.metric_records.values())) for record in records]
    scored = [m for m in metrics if m.get(WEIGHT_KEY, 0) > 0]
    names = {name for m in scored for name in m if name not in (WEIGHT_KEY, UNIFORM_KEY)}
    means = {}
    for name in sorted(names):
        pairs = [(float(m[name]), m[WEIGHT_KEY]) for m in scored if name in m and math.isfinite(float(m[name]))]
        if pairs:
            means[name] = sum(value * weight for value, weight in pairs) / sum(weight for _, weight in pairs)
    return MetricRecord(means)


def _proximal_term(model: nn.Module, global_weights: dict[str, torch.Tensor], mu: float) -> Callable[[], torch.Tensor]:
    """FedProx (Li et al. 2020): mu/2 * ||w - w_global||^2 over the trained weights, added to every batch's loss."""
    anchors = [(p, global_weights[name].to(p.device)) for name, p in model.named_parameters() if p.requires_grad]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - anchor) ** 2).sum() for p, anchor in anchors)

    return term


def _shared_names(model: nn.Module) -> list[str]:
    """What clients send and the server averages: trained parameters and floating-point buffers (running
    statistics); frozen weights are the same everywhere and integer buffers cannot be averaged."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, b in model.named_buffers() if b.is_floating_point()}
    return [name for name in model.state_dict() if name in trained or name in buffers]


def _weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {name: state[name].detach().cpu().contiguous() for name in names}


def _validate(task: Task, model: nn.Module, split: EncodedSplit, batch_size: int) -> dict[str, float]:
    return validation_metrics(task, *model_outputs(model, split, batch_size))


def _client_scores(
    task: Task, model: nn.Module, shards: dict[str, list[RowSubset]], batch_size: int, names: list[str]
) -> list[dict[str, Any]]:
    """The final model on each client's own held-out rows (test, else validation): the spread across clients."""
    split = "test" if "test" in shards else "validation" if "validation" in shards else None
    scores = []
    for index, name in enumerate(names):
        entry: dict[str, Any] = {"client": name, "train_rows": len(shards["train"][index])}
        if split is not None and len(shards[split][index]):
            entry.update(split=split, rows=len(shards[split][index]))
            entry.update(_validate(task, model, shards[split][index], batch_size))
        scores.append(entry)
    return scores


def _keep_best(
    state: dict[str, Any], value: float | None, server_round: int, lower_is_better: bool, train_config: TrainConfig
) -> bool:
    """Update the best round; True when early stopping (patience counted in rounds) says stop."""
    if value is None:
        return False
    best = state["best"]
    if best is None or (value < best if lower_is_better else value > best):
        state.update(best=value, best_round=server_round, bad_rounds=0)
        return False
    state["bad_rounds"] += 1
    stopping = train_config.early_stopping
    return bool(stopping and stopping.patience and state["bad_rounds"] >= stopping.patience)


def _summary(
    federated: FederatedConfig,
    partition: Partition,
    clients: int,
    sampled: int,
    state: dict[str, Any],
    accountant: RdpAccountant | None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "clients": clients,
        "split": f"by column {federated.by_column}" if federated.by_column else f"Dirichlet alpha {federated.alpha:g}",
        "strategy": federated.strategy,
        "rounds": state["round"],
        "best_round": state["best_round"],
        "clients_per_round": sampled,
        "local_epochs": federated.local_epochs,
        "client_train_rows": dict(zip(partition.names, partition.sizes("train"), strict=True)),
        "engine": "Flower strategies and ClientApp, clients run in turn in one process",
    }
    if federated.strategy == "fedprox":
        summary["proximal_mu"] = federated.proximal_mu
    if accountant is not None and federated.privacy is not None:
        spent = accountant.get_privacy_spent()
        summary["privacy"] = {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "noise_multiplier": federated.privacy.noise_multiplier,
            "clipping_norm": federated.privacy.clipping_norm,
            "releases": spent.num_releases,
            "accounting": "RDP (Flower's accountant), client level, no credit for client sampling",
        }
    return summary


def _metric(reply: Message, name: str) -> float:
    value = next(iter(reply.content.metric_records.values())).get(name)
    return float(value) if value is not None else math.nan


def _raise_client_errors(replies: list[Message], names: list[str]) -> None:
    """A client that failed in a simulation is a bug or bad data, not a network hiccup: stop and say which."""
    for reply in replies:
        if reply.has_error():
            client = names[reply.metadata.src_node_id - 1]
            raise RuntimeError(f"federated client {client} failed: {reply.error.reason}")


@contextmanager
def _flower_session():
    """Flower's messages carry the sending task's identity, which its own runtimes set per process; this process
    acts as the server. Flower's per-round INFO logging is quieted (our progress bar reports the rounds)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    flower_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flower_logger.setLevel(level)


def _save_round(folder: Path, state: dict[str, Any], model: nn.Module) -> None:
    """The round's global weights in a file of their own, then the state naming it (replaced atomically), then
    the previous round's weights removed: a process killed at any point leaves one consistent round."""
    weights = f"federated-round-{state['round']:05d}.safetensors"
    save_weights(model, folder / weights)
    atomic_write_json(folder / STATE, {**state, "weights": weights})
    for old in folder.glob("federated-round-*.safetensors"):
        if old.name != weights:
            old.unlink(missing_ok=True)


def _load_round(folder: Path, model: nn.Module) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        load_model(model, str(folder / state.pop("weights")))
    except (OSError, KeyError, json.JSONDecodeError, RuntimeError) as error:
        raise ArtifactError(f"{folder}: federated checkpoint is unreadable ({error})") from None
    return state
