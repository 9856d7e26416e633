"""One run, start to finish: data -> train -> evaluate -> plots -> model card -> manifest -> store.

`api.run` is the public entry; this module holds the steps so each stays short and testable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from forgeml import __version__
from forgeml.config import ForgeConfig, dump_config, load_config
from forgeml.data.io import table_dataset
from forgeml.data.prepare import PreparedData
from forgeml.data.profile import length_percentiles, vocabulary_warning
from forgeml.errors import ConfigError, DataError
from forgeml.evaluate import plots
from forgeml.evaluate.baseline import fit_baselines
from forgeml.evaluate.cross_validation import cross_validate
from forgeml.evaluate.metrics import scalar_metrics
from forgeml.evaluate.outputs import model_outputs
from forgeml.report.card import write_card
from forgeml.store import Store, database_url
from forgeml.tasks import Task, build_task, prepare_data
from forgeml.train import distributed
from forgeml.train.loop import TrainResult, seed_everything, train
from forgeml.workspace import (
    LINEAGE,
    SAMPLES,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    clear_running,
    mark_running,
    read_json,
)

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What `forgeml.run` returns: where the run is and its headline metrics."""

    run_dir: Path
    run_id: str
    metrics: dict[str, Any]

    def __repr__(self) -> str:
        return f"RunResult(run_dir={str(self.run_dir)!r}, test={scalar_metrics(self.metrics.get('test', {}))})"


class RunObserver(Protocol):
    """Who watches a run from outside (the tuner): told its id, then every validation during training."""

    def run_started(self, run_id: str, run_dir: Path) -> None: ...

    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import sklearn
    import transformers

    return {
        "forgeml": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "scikit-learn": sklearn.__version__,
    }


def execute(
    config: ForgeConfig,
    workspace: Path,
    show_progress: bool,
    resume_dir: Path | None = None,
    encrypt: bool = False,
    same_splits_as: dict[str, str] | None = None,
    lineage: dict[str, Any] | None = None,
    observer: RunObserver | None = None,
    prepared: PreparedData | None = None,
) -> RunResult:
    """Run (or resume) the whole pipeline, recording status in the store whatever happens.

    With `encrypt`, the finished run is encrypted in place ($FORGEML_KEY); its plaintext exists only while it runs.
    `same_splits_as` maps split names to the SHA-256 they must have (a retrain is judged on its parent's
    test split, or not at all); `lineage` (where the run comes from) is saved as lineage.json. An `observer`
    hears the run start and every validation during training (a tuner: it may stop the run). `prepared` is
    the config's data already prepared (a tuner's trials share one preparation: their data keys are equal).
    """
    rank, processes = distributed.rank_and_size()
    if processes > 1:  # launched by torchrun: rank 0 leads, the others train beside it
        distributed.join()
        if rank != 0:
            run_path = Path(distributed.from_lead(None))  # the run directory rank 0 made (or resumes)
            return _train_beside_lead(config, run_path, resume_dir is not None)
    if config.tracking.mlflow and importlib.util.find_spec("mlflow") is None:  # say so before training, not after
        raise ConfigError("tracking.mlflow: MLflow is not installed; pip install 'forgeml[mlflow]'")
    if config.federated:
        from forgeml.federated import require_flower

        require_flower()
        if processes > 1:
            raise ConfigError("federated: the clients are simulated in one process; remove --nproc")
    workspace.mkdir(parents=True, exist_ok=True)
    store = Store(database_url(workspace))
    config_text = dump_config(config)
    if resume_dir is None:
        run = RunDir.create(workspace, config.name)
        mark_running(run.path)  # before the store says "running": `forgeml runs` must find it alive
        atomic_write_text(run.config, config_text)
        store.start_run(
            id=run.id,
            name=config.name,
            task=config.task,
            path=str(run.path),
            config_hash=hashlib.sha256(config_text.encode()).hexdigest(),
            versions=library_versions(),
        )
    else:
        run = RunDir.open(resume_dir)
        mark_running(run.path)
        store.update_run(run.id, status="running", error=None)
    if processes > 1:
        distributed.from_lead(str(run.path))
    durations: dict[str, float] = {}
    if observer is not None:
        observer.run_started(run.id, run.path)
    try:
        clock = time.perf_counter()
        data = prepared if prepared is not None else prepare_data(config)
        if resume_dir is not None:
            _check_same_data(run, data)
        if same_splits_as:
            _check_expected_splits(data, same_splits_as)
        if lineage is not None or data.feedback is not None:
            facts = {**(lineage or {}), "splits_sha256": data.hashes}
            if data.feedback is not None:
                facts["feedback"] = data.feedback
            atomic_write_json(run.path / LINEAGE, facts)
        durations["data_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        seed_everything(config.train.seed)
        task = build_task(config, data.input_columns)
        task.fit(data.train)
        encoded = {name: task.encode(split, name) for name, split in data.splits.items() if split is not None}
        _write_profile(run, data, encoded, config, task)
        durations["encode_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        if hasattr(task, "progress_folder"):  # a task that saves pictures at every validation (a GAN's samples)
            task.progress_folder = run.plots
        model = task.build_model()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before LoRA is merged
        training = {
            "checkpoints": run.checkpoints,
            "log_path": run.train_log,
            "resume": resume_dir is not None,
            "show_progress": show_progress,
            "on_evaluation": observer.evaluated if observer is not None else None,
        }
        if config.federated:
            from forgeml.federated import train_federated

            result = train_federated(config, task, model, data, encoded, **training)
        elif config.ensemble:  # trained runs: only a stacker is fitted (on the members' validation outputs)
            from forgeml.tasks.ensemble import fit_ensemble

            summary, validation_outputs = fit_ensemble(task, model, encoded)
            result = TrainResult(
                [], 0, None, None, task.primary_metric, False, 0.0, 0.0, summary["seconds"], ensemble=summary
            )
            result.validation_outputs = validation_outputs
        else:
            result = train(task, model, encoded["train"], encoded.get("validation"), config.train, **training)
        task.save(run.model, model)
        durations["train_s"] = time.perf_counter() - clock

        baselines = None
        own_baselines = getattr(task, "baselines", None)  # a task with yardsticks of its own (word tagging)
        if config.evaluate.baseline and (own_baselines or getattr(task, "target", None) is not None):
            clock = time.perf_counter()
            if own_baselines:
                baselines = own_baselines(data.splits, config.data.split.seed)
            else:
                baselines = fit_baselines(task, data.splits, config.data.split.seed)
            durations["baseline_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        metrics: dict[str, Any] = {"task": config.task, "primary_metric": task.primary_metric}
        for name in ("validation", "test", "feedback"):  # feedback: held-out served corrections
            if name in encoded:
                metrics[name] = evaluate_split(
                    task,
                    model,
                    encoded[name],
                    config.evaluate.batch_size,
                    run.plots,
                    plot=name == "test" or (name == "validation" and "test" not in encoded),
                    outputs=result.validation_outputs if name == "validation" else None,
                )
        if baselines is not None:
            metrics["baselines"] = baselines
        metrics["training"] = _training_summary(result)
        metrics["model"] = {"parameters": sum(p.numel() for p in model.parameters()), "trainable_parameters": trainable}
        generation = config.evaluate.generation
        if generation and generation.enabled and hasattr(task, "evaluate_generations"):  # answers scored
            name = "test" if "test" in metrics else "validation"
            scores = task.evaluate_generations(
                model, data.splits[name], generation.model_dump(), config.train.seed, run.path
            )
            metrics[name].update(scores)
        unit = "round" if config.federated else "step"
        if result.history:  # an ensemble was not trained here: its members' runs have their curves
            plots.training_curves(result.history, result.watched_metric, run.plots / "curves.png", unit)
        if hasattr(task, "report_plots"):  # generated images: samples, reconstructions, curves over training
            name = next(name for name in ("test", "validation", "train") if name in encoded)
            task.report_plots(model, encoded[name], result.history, run.plots)
        if result.federated:
            plots.federated_clients(
                result.history, result.federated, result.watched_metric, run.plots / "federated.png"
            )
        if hasattr(task, "samples"):  # generative tasks: seeded generations for the card
            held_out = next(data.splits[n] for n in ("test", "validation", "train") if data.splits[n] is not None)
            samples = task.samples(model, held_out, config.train.seed)
            atomic_write_text(run.path / SAMPLES, "".join(json.dumps(sample) + "\n" for sample in samples))
        if config.evaluate.cross_validation:
            metrics["cross_validation"] = cross_validate(config, data, show_progress)
        durations["evaluate_s"] = time.perf_counter() - clock

        if config.audit:
            from forgeml.trust.audit import run_audits  # captum and fairlearn load only when asked for

            clock = time.perf_counter()
            metrics["audit"] = run_audits(config, task, model, data.splits, encoded, run.trust, run.model)
            durations["audit_s"] = time.perf_counter() - clock
        if config.compress:
            from forgeml.compress import compress_model
            from forgeml.export import parity_sample

            clock = time.perf_counter()
            name = next(name for name in ("test", "validation", "train") if encoded.get(name) is not None)
            parity_rows = task.encode(parity_sample(data.splits[name]), name, with_targets=False)
            training = (encoded["train"], encoded.get("validation"), config.train)  # for distillation
            folders = (run.path / "compress", run.path / "export")
            compress_model(task, model, encoded[name], parity_rows, *folders, config.compress, training)
            durations["compress_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        atomic_write_json(run.metrics, metrics)
        write_card(run.path)
        run.write_manifest()
        durations["report_s"] = time.perf_counter() - clock
        store.update_run(
            run.id,
            status="finished",
            metrics={k: scalar_metrics(v) for k, v in metrics.items() if isinstance(v, dict)},
            split_hashes=data.hashes,
            durations=durations,
        )
        if config.tracking.mlflow:  # nothing is sent anywhere unless asked
            from forgeml.tracking import log_run

            uri, experiment = config.tracking.mlflow, config.tracking.experiment or config.name
            try:  # an encrypted run sends its numbers, not its files
                logged = log_run(run.path, uri, experiment, artifacts=not encrypt)
                logger.info("tracking.mlflow: logged as MLflow run %s", logged)
            except Exception as error:  # the run is complete here: a tracking failure must not lose it
                logger.warning("tracking.mlflow: could not log the run to %s: %s", _without_password(uri), error)
        clear_running(run.path)  # before encrypting: the marker is not part of the run
        if encrypt:
            from forgeml.encryption import encrypt_run

            encrypt_run(run.path)
        return RunResult(run.path, run.id, metrics)
    except BaseException as error:
        # An observer may stop a run on purpose (a pruned trial): the error says what the status is.
        status = getattr(error, "run_status", "failed")
        store.update_run(run.id, status=status, error=f"{type(error).__name__}: {error}", durations=durations)
        raise
    finally:
        clear_running(run.path)
        distributed.leave()


def _without_password(uri: str) -> str:
    """`uri` as it may be logged: a password in it replaced by ***."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _train_beside_lead(config: ForgeConfig, run_path: Path, resuming: bool) -> RunResult:
    """A process of rank > 0: the same data, task and model as rank 0, training its share of every batch
    (and resuming from rank 0's checkpoints); it writes nothing. Returns no metrics: rank 0 reports them."""
    data = prepare_data(config)
    seed_everything(config.train.seed)
    task = build_task(config, data.input_columns)
    task.fit(data.train)
    encoded = {name: task.encode(data.splits[name], name) for name in ("train", "validation") if data.splits[name]}
    model = task.build_model()
    checkpoints = RunDir(run_path).checkpoints
    train(task, model, encoded["train"], encoded.get("validation"), config.train, checkpoints, resume=resuming)
    distributed.leave()
    return RunResult(run_path, run_path.name, {})


def evaluate_split(
    task: Task,
    model: torch.nn.Module,
    split: Any,
    batch_size: int,
    plot_dir: Path | None,
    plot: bool = True,
    outputs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on an encoded split, plus its plots (confusion, calibration or scatter).

    `outputs` are the model's (outputs, targets) on this split when already computed (the training
    loop's last validation of the final weights).
    """
    outputs, targets = outputs if outputs is not None else model_outputs(model, split, batch_size)
    metrics = task.metrics(outputs, targets)
    if plot and plot_dir is not None:
        task.evaluation_plots(outputs, targets, metrics, plot_dir)
        if hasattr(task, "prediction_examples"):  # images: a grid of answers, confidently wrong ones first
            task.prediction_examples(split, outputs, targets, plot_dir)
    return metrics


def _training_summary(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "best_step": result.best_step,
        "best_metric": result.best_metric,
        "watched_metric": result.watched_metric,
        "stopped_early": result.stopped_early,
        "samples_per_second": result.samples_per_second,
        "mfu": result.mfu,
        "seconds": result.seconds,
        **({"privacy": result.privacy} if result.privacy else {}),
        **({"federated": result.federated} if result.federated else {}),
        **({"ensemble": result.ensemble} if result.ensemble else {}),
    }


def _write_profile(run: RunDir, data: PreparedData, encoded: dict[str, Any], config: ForgeConfig, task: Task) -> None:
    profile = dict(data.profile)
    token_profile = getattr(task, "token_profile", None)
    if token_profile is not None:  # packed blocks: totals, not lengths per row
        profile["tokens"] = {name: token_profile(split) for name, split in encoded.items()}
    elif data.text_columns:
        profile["tokens"] = {
            name: {
                **length_percentiles(split.lengths),
                "truncated": int((split.lengths >= config.model.max_length).sum()),
            }
            for name, split in encoded.items()
        }
        plots.lengths({name: split.lengths.tolist() for name, split in encoded.items()}, run.plots / "lengths.png")
    unknown_share = getattr(task, "unknown_token_share", None)
    if data.text_columns and unknown_share is not None:
        # Vocabulary coverage: a backbone whose tokenizer lacks the text's script trains "fine" on [UNK]s.
        profile["unknown_token_share"] = {name: unknown_share(split) for name, split in encoded.items()}
        warning = vocabulary_warning(profile["unknown_token_share"], config.model.backbone)
        if warning:
            logger.warning(warning)
            profile["warnings"] = [*profile.get("warnings", []), warning]
    if config.is_classification:
        plots.class_balance(
            {n: s["class_counts"] for n, s in profile["splits"].items()}, run.plots / "class_balance.png"
        )
    atomic_write_json(run.profile, profile)


def _check_same_data(run: RunDir, data: PreparedData) -> None:
    recorded = read_json(run.profile).get("sha256", {}) if run.profile.is_file() else {}
    for name, digest in data.hashes.items():
        if recorded.get(name) not in (None, digest):
            raise DataError(
                f"cannot resume {run.path}: the {name} split differs from the one the run started with "
                "(data files changed); start a new run instead"
            )


def _check_expected_splits(data: PreparedData, expected: dict[str, str]) -> None:
    for name, digest in sorted(expected.items(), key=lambda item: item[0] != "test"):  # the test split first
        found = data.hashes.get(name)
        if found != digest:
            raise DataError(
                f"the {name} split is not the one this run must be judged on (SHA-256 {str(found)[:12]} instead of "
                f"{digest[:12]}): its data files or split settings changed, so a comparison would not be paired; "
                "restore the files (or train a new model from its own config)"
            )


def rerun_config(run: RunDir) -> ForgeConfig:
    """The resolved config a run was started with."""
    return load_config(run.config)


def dataset_from_rows(rows: list[Any], columns: list[str]) -> Dataset:
    """Plain Python inputs -> a Dataset with the task's input columns.

    Accepts strings (one text column), tuples/lists (one value per column) or dicts.
    """
    table: dict[str, list] = {name: [] for name in columns}
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"input {index}: missing {', '.join(missing)}; each input needs {', '.join(columns)}")
            values = [row[c] for c in columns]
        elif isinstance(row, str):
            values = [row]
        else:
            values = list(row)
        if len(values) != len(columns):
            raise DataError(f"input {index}: expected {len(columns)} values ({', '.join(columns)}), got {len(values)}")
        for name, value in zip(columns, values, strict=True):
            table[name].append(value)
    arrays = {}
    for name, values in table.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kinds = sorted({type(value).__name__ for value in values if value is not None})
            raise DataError(
                f"inputs: column {name!r} mixes {', '.join(kinds)} values; send one kind per column"
            ) from None
    return table_dataset(pa.table(arrays) if arrays else pa.table({}))
