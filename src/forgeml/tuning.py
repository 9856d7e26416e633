"""Hyper-parameter search (`forgeml tune`): an Optuna study whose trials are ordinary runs.

The study lives in the workspace database (the SQLite file, or the PostgreSQL URL in $FORGEML_DB_URL), so
any number of worker processes, on this machine or others that reach the database, share it: each asks
Optuna for the next parameters, trains a normal run (in `runs/`, in the store, linked to its trial by
`lineage.json` and the trial's `run_id`), and reports its validation metric back. The training loop tells
the pruner every validation, so a trial that lags the others stops early (status `pruned`). A worker
that dies mid-trial stops sending its heartbeat; the next worker to start a trial marks that trial failed,
and the study goes on.

The objective is a validation metric: the test split is never read by the search. `forgeml tune show`
writes the study's card (history, parameter importance, parallel coordinates) and the best parameters as
a runnable config, whose test metrics come from running it (`forgeml run studies/NAME/best.yaml`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgeml.config import GENERATIVE_TASKS, LOWER_IS_BETTER, ForgeConfig, SearchRange, TuneConfig, load_config
from forgeml.errors import ConfigError, ForgeError
from forgeml.store import database_url
from forgeml.workspace import atomic_write_json, atomic_write_text, workspace_root

logger = logging.getLogger(__name__)

STUDIES = "studies"  # the workspace folder of study cards
BEST_CONFIG = "best.yaml"
# Study attributes: what `tune show` needs to rebuild the best config without the original file.
CONFIG_ATTRIBUTE = "forgeml_config"
METRIC_ATTRIBUTE = "forgeml_metric"


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress display says what happens
    return optuna


class Pruned(Exception):
    """Raised inside a trial's training when the pruner stops it; the run is stored with status `pruned`."""

    run_status = "pruned"


@dataclass
class TrialObserver:
    """Links one Optuna trial to the run that trains it, and feeds the pruner every validation."""

    trial: Any
    metric: str
    prunes: bool
    evaluations: int = 0

    def run_started(self, run_id: str, run_dir: Path) -> None:
        self.trial.set_user_attr("run_id", run_id)
        self.trial.set_user_attr("run_dir", str(run_dir))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ConfigError(f"tune.metric: {self.metric!r} is not a validation metric; choose from {sorted(metrics)}")
        value = float(metrics[self.metric])
        # Trials are compared evaluation by evaluation (epoch by epoch by default), not optimizer step by step:
        # a trial with twice the batch size takes half the steps to see the same data.
        self.evaluations += 1
        self.trial.report(value, self.evaluations)
        if self.prunes and self.trial.should_prune():
            raise Pruned(f"trial {self.trial.number}: {self.metric} {value:.4g} at step {step} lags the other trials")


def objective_metric(config: ForgeConfig) -> tuple[str, str]:
    """The validation metric the study optimises and its direction: `tune.metric`, else the task's primary
    metric (F1 for classification, RMSE for regression, loss for language models)."""
    settings = config.tune
    metric = settings.metric
    if metric is None:
        metric = "loss" if config.task in GENERATIVE_TASKS else "f1" if config.is_classification else "rmse"
    direction = settings.direction or ("minimize" if metric in LOWER_IS_BETTER else "maximize")
    return metric, direction


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> ForgeConfig:
    """The run a trial trains: the base config with the trial's values (validated: errors name the key)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in params.items()]
    try:
        return load_config(copy.deepcopy(base), overrides)
    except ConfigError as error:
        raise ConfigError(f"tune.space: the values {params} make an invalid config: {error}") from None


def _untuned(config: ForgeConfig) -> dict[str, Any]:
    """The tuned config as a plain dict without its tune section: what the best parameters are applied to."""
    raw = config.model_dump(mode="json")
    raw["tune"] = None
    return raw


def _trial_base(untuned: dict[str, Any]) -> dict[str, Any]:
    """The config every trial starts from: without audits, compression or cross-validation (a trial only
    trains and validates; the chosen config is audited when it is run)."""
    raw = copy.deepcopy(untuned)
    raw["audit"] = None
    raw["compress"] = None
    raw["evaluate"]["cross_validation"] = None
    raw["evaluate"]["baseline"] = False  # the same data every trial: the baselines would be the same too
    raw["tracking"] = {"mlflow": None, "experiment": None}
    return raw


def check_space(config: ForgeConfig) -> None:
    """Refuse a search space naming a key the config does not have, or a range whose ends make it invalid,
    before any trial runs."""
    base = _trial_base(_untuned(config))
    for key, search in config.tune.space.items():
        for value in _corners(search):
            try:
                load_config(copy.deepcopy(base), [f"{key}={json.dumps(value)}"])
            except ConfigError as error:
                raise ConfigError(f"tune.space.{key} = {value!r}: {error}") from None


def _corners(search: SearchRange) -> list[Any]:
    if search.type == "choice":
        return list(search.values)
    cast = int if search.type == "int" else float
    return [cast(search.low), cast(search.high)]


def suggest(trial: Any, space: dict[str, SearchRange]) -> dict[str, Any]:
    """The trial's value for every key of the space (choices that are not plain scalars travel as JSON)."""
    params = {}
    for key, search in space.items():
        if search.type == "float":
            params[key] = trial.suggest_float(key, search.low, search.high, log=search.log, step=search.step)
        elif search.type == "int":
            step = int(search.step or 1)
            params[key] = trial.suggest_int(key, int(search.low), int(search.high), log=search.log, step=step)
        elif _plain(search.values):
            params[key] = trial.suggest_categorical(key, search.values)
        else:  # e.g. hidden_sizes: [[64], [128, 64]]; Optuna stores scalars only
            params[key] = json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in search.values]))
    return params


def _config_values(raw: dict[str, Any], space: dict[str, SearchRange]) -> dict[str, Any]:
    """The config's own value of each searched key, as a trial parameter, where it lies in the space."""
    values = {}
    for key, search in space.items():
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        if search.type == "choice":
            if node in search.values:
                values[key] = node if _plain(search.values) else json.dumps(node)
        elif isinstance(node, int | float) and search.low <= node <= search.high:
            values[key] = int(node) if search.type == "int" else float(node)
    return values


def _decoded(params: dict[str, Any], space: dict[str, SearchRange]) -> dict[str, Any]:
    """A finished trial's parameters as config values (undoing the JSON of non-scalar choices)."""
    decoded = {}
    for key, value in params.items():
        search = space.get(key)
        encoded = search is not None and search.type == "choice" and not _plain(search.values)
        decoded[key] = json.loads(value) if encoded else value
    return decoded


def _plain(values: list[Any]) -> bool:
    """Whether Optuna can store these choices as they are (None, str, int, float, bool); others go as JSON."""
    return all(value is None or isinstance(value, str | int | float | bool) for value in values)


def _sampler(settings: TuneConfig, seed: int) -> Any:
    optuna = _optuna()
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(_grid(settings.space), seed=seed)
    if settings.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=settings.startup_trials)
    # constant_liar: a worker treats the others' running trials as bad, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials, constant_liar=True)


def _grid(space: dict[str, SearchRange]) -> dict[str, list[Any]]:
    grid = {}
    for key, search in space.items():
        if search.type == "choice":
            grid[key] = search.values if _plain(search.values) else [json.dumps(v) for v in search.values]
        else:
            step = search.step or 1
            count = math.floor((search.high - search.low) / step + 1e-9) + 1
            values = [search.low + index * step for index in range(count)]
            grid[key] = [int(v) for v in values] if search.type == "int" else values
    return grid


def _pruner(settings: TuneConfig) -> Any:
    optuna = _optuna()
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=settings.prune_after
        )
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.prune_after), reduction_factor=3)
    return optuna.pruners.NopPruner()


def storage(url: str, heartbeat_s: int | None = None) -> Any:
    """Optuna's storage on the workspace database (its own tables beside forgeml's)."""
    optuna = _optuna()
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
        from forgeml.store import connect

        with connect(url).connect():  # the file in WAL mode before Optuna's tables go in (readers never wait)
            pass
    elif url.startswith("postgresql://"):
        from forgeml.store import postgres_driver

        url = postgres_driver(url)
    heartbeat = {"heartbeat_interval": heartbeat_s, "grace_period": 2 * heartbeat_s} if heartbeat_s else {}
    from sqlalchemy.exc import IntegrityError, OperationalError

    def open_storage() -> Any:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's terms; we need them
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)

    for attempt in range(4):
        try:
            return open_storage()
        except (IntegrityError, OperationalError):
            # Two workers starting on a new database both create Optuna's tables and one loses the race;
            # once the other has finished, the tables are there and another try only reads them.
            time.sleep(0.5 * (attempt + 1))
    return open_storage()


def study_name(config: ForgeConfig) -> str:
    return config.tune.study or config.name


def run_study(
    source: str | Path | dict,
    overrides: list[str] | tuple[str, ...] = (),
    trials: int | None = None,
    workspace: str | Path | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run `trials` trials (default `tune.trials`) of the study the config's `tune:` section describes, joining
    it when another worker started it; then write the study card. Returns the study's summary."""
    from forgeml.pipeline import execute
    from forgeml.tasks import prepare_data
    from forgeml.train.progress import ProgressBar

    config = load_config(source, list(overrides))
    if config.tune is None:
        raise ConfigError("tune: the config has no tune section; add tune.space (the keys to search and their ranges)")
    if config.data.validation is None and config.data.split.validation <= 0:
        raise ConfigError("tune: the search needs a validation split (data.validation or data.split.validation > 0)")
    settings = config.tune
    check_space(config)
    metric, direction = objective_metric(config)
    root = workspace_root(workspace)
    root.mkdir(parents=True, exist_ok=True)
    name = study_name(config)
    optuna = _optuna()
    shared = storage(database_url(root), settings.heartbeat_s)
    existing = _existing_study(shared, name)
    if existing is not None and existing.user_attrs.get(METRIC_ATTRIBUTE) not in (None, metric):
        raise ConfigError(
            f"tune.study: study {name!r} optimises {existing.user_attrs[METRIC_ATTRIBUTE]}, this config {metric}; "
            "name another study (tune.study)"
        )
    try:  # the worker that creates the study samples with tune.seed: alone, it is reproducible
        study = optuna.create_study(
            storage=shared, study_name=name, direction=direction, sampler=_sampler(settings, settings.seed),
            pruner=_pruner(settings),
        )  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        # A worker joining a study (or resuming it) draws a seed of its own: two never replay one sequence.
        joined = len(existing.trials) if existing is not None else 0  # 0: another worker created it just now
        seed = settings.seed + 1 + joined + os.getpid()
        study = optuna.load_study(
            study_name=name, storage=shared, sampler=_sampler(settings, seed), pruner=_pruner(settings)
        )
    untuned = _untuned(config)
    base = _trial_base(untuned)
    if not study.trials and settings.start_from_config and settings.sampler != "grid":  # a grid has its own list
        starting = _config_values(untuned, settings.space)
        if starting:  # the config's own values first: the search starts from what the user has
            study.enqueue_trial(starting, skip_if_exists=True)
    study.set_user_attr(CONFIG_ATTRIBUTE, untuned)
    study.set_user_attr(METRIC_ATTRIBUTE, metric)
    study.set_user_attr("space", {key: value.model_dump() for key, value in settings.space.items()})
    count = trials or settings.trials
    # Every trial reads the same data (tune.space may not name data keys): prepare it once per worker.
    prepared = prepare_data(trial_config(base, {}))

    def objective(trial: Any) -> float:
        params = suggest(trial, settings.space)
        observer = TrialObserver(trial, metric, settings.pruner != "none")
        lineage = {"study": name, "trial": trial.number, "params": params, "objective": f"validation {metric}"}
        try:
            result = execute(
                trial_config(base, params), root, False, lineage=lineage, observer=observer, prepared=prepared
            )
        except Pruned as pruned:
            raise optuna.TrialPruned(str(pruned)) from None
        value = result.metrics.get("validation", {}).get(metric)
        if value is None:
            raise ConfigError(f"tune.metric: {metric!r} is not among the validation metrics of trial {trial.number}")
        return float(value)

    with ProgressBar(f"tuning {name}", count, show_progress) as bar:

        def advance(study: Any, trial: Any) -> None:
            try:
                best = f"{study.best_value:.4g}"
            except ValueError:  # no trial completed yet
                best = "-"
            bar.advance(1, {"trial": str(trial.number), "state": trial.state.name.lower(), f"best {metric}": best})

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=count, timeout=settings.timeout_s, callbacks=[advance])
    return write_study_card(name, root)


def _existing_study(shared: Any, name: str) -> Any | None:
    optuna = _optuna()
    try:
        return optuna.load_study(study_name=name, storage=shared)
    except KeyError:
        return None


def summarize(name: str, workspace: str | Path | None = None) -> dict[str, Any]:
    """The study's state: trials by state, the best trial and its run, every trial's parameters, value, time."""
    root = workspace_root(workspace)
    study = _existing_study(storage(database_url(root)), name)
    if study is None:
        raise ForgeError(f"no study named {name!r} in {root} (forgeml tune CONFIG starts one)")
    metric = study.user_attrs.get(METRIC_ATTRIBUTE, "value")
    space = {key: SearchRange.model_validate(value) for key, value in study.user_attrs.get("space", {}).items()}
    rows = []
    for trial in study.trials:
        seconds = None
        if trial.datetime_start and trial.datetime_complete:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "value": trial.value,
                "params": _decoded(trial.params, space),
                "seconds": seconds,
                "evaluations": max(trial.intermediate_values) if trial.intermediate_values else 0,
                "run_id": trial.user_attrs.get("run_id"),
                "run_dir": trial.user_attrs.get("run_dir"),
            }
        )
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    complete = [row for row in rows if row["state"] == "complete"]
    best = None
    if complete:
        best_trial = study.best_trial
        best = next(row for row in rows if row["number"] == best_trial.number)
    return {
        "study": name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "objective": f"validation {metric} (the test split is never read by the search)",
        "trials": len(rows),
        "states": states,
        "trial_seconds": round(sum(row["seconds"] or 0.0 for row in rows), 2),
        "best": best,
        "rows": rows,
        "config": study.user_attrs.get(CONFIG_ATTRIBUTE),
        "_study": study,
    }


def best_config(summary: dict[str, Any]) -> str:
    """The best trial's config as YAML a user can run: the base config with the best parameters."""
    if summary["best"] is None:
        raise ForgeError(f"study {summary['study']!r} has no completed trial yet")
    config = trial_config(summary["config"], summary["best"]["params"])
    from forgeml.config import dump_config

    header = (
        f"# The best configuration of study {summary['study']}: trial {summary['best']['number']}, validation "
        f"{summary['metric']} {summary['best']['value']:.6g}.\n# Run it for its test metrics and audits: "
        f"forgeml run {BEST_CONFIG}\n"
    )
    return header + dump_config(config)


def write_study_card(name: str, workspace: str | Path | None = None) -> dict[str, Any]:
    """`studies/NAME/`: summary.json, best.yaml, plots and card.md / card.html. Returns the summary."""
    from forgeml.report.card import Facts, Figure, Paragraph, Section, Table, render_html, render_markdown

    root = workspace_root(workspace)
    summary = summarize(name, root)
    study = summary.pop("_study")
    folder = root / STUDIES / name
    folder.mkdir(parents=True, exist_ok=True)
    figures = _study_plots(study, summary, folder)
    sections = [
        Section(
            "Study",
            [
                Facts(
                    [
                        ("Objective", f"{summary['direction']} {summary['objective']}"),
                        ("Trials", ", ".join(f"{count} {state}" for state, count in sorted(summary["states"].items()))),
                        ("Time in trials", f"{summary['trial_seconds']:.0f} s"),
                    ]
                )
            ],
        )
    ]
    best = summary["best"]
    if best is not None:
        atomic_write_text(folder / BEST_CONFIG, best_config(summary))
        facts = [("Trial", str(best["number"])), (f"Validation {summary['metric']}", f"{best['value']:.6g}")]
        facts += [(key, _shown(value)) for key, value in best["params"].items()]
        facts.append(("Run", str(best["run_dir"])))
        sections.append(
            Section(
                "Best trial",
                [
                    Facts(facts),
                    Paragraph(
                        f"Its configuration is {BEST_CONFIG} beside this card: `forgeml run {BEST_CONFIG}` trains it "
                        "again with its audits and reports its test metrics."
                    ),
                ],
            )
        )
    sections.append(Section("Plots", [Figure(path, caption) for path, caption in figures]))
    keys = list(study.user_attrs.get("space", {}))
    rows = [
        [
            str(row["number"]),
            row["state"],
            "" if row["value"] is None else f"{row['value']:.5g}",
            *[_shown(row["params"].get(key)) for key in keys],
            "" if row["seconds"] is None else f"{row['seconds']:.1f}",
            row["run_id"] or "",
        ]
        for row in summary["rows"]
    ]
    header = ["trial", "state", summary["metric"], *keys, "seconds", "run"]
    sections.append(Section("Trials", [Table(header, rows)]))
    title = f"Study card: {name}"
    atomic_write_text(folder / "card.md", render_markdown(title, sections, folder))
    atomic_write_text(folder / "card.html", render_html(title, sections))
    atomic_write_json(folder / "summary.json", {key: value for key, value in summary.items() if key != "config"})
    summary["folder"] = str(folder)
    return summary


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _study_plots(study: Any, summary: dict[str, Any], folder: Path) -> list[tuple[Path, str]]:
    """Optimisation history, parameter importance and parallel coordinates, where there is enough to draw."""
    from forgeml.evaluate.plots import plt, save_figure

    complete = [row for row in summary["rows"] if row["state"] == "complete"]
    figures = []
    if not summary["rows"]:
        return figures
    figure, axis = plt.subplots(figsize=(7, 3.6))
    minimize = summary["direction"] == "minimize"
    numbers = [row["number"] for row in complete]
    values = [row["value"] for row in complete]
    axis.scatter(numbers, values, s=18, color="#2b7bba", label="complete")
    best_so_far, running = [], None
    for value in values:
        running = value if running is None else (min(running, value) if minimize else max(running, value))
        best_so_far.append(running)
    if numbers:
        axis.step(numbers, best_so_far, where="post", color="#c0392b", label="best so far")
    pruned = [row["number"] for row in summary["rows"] if row["state"] == "pruned"]
    if pruned and values:
        axis.scatter(
            pruned,
            [min(values) if not minimize else max(values)] * len(pruned),
            marker="x",
            s=18,
            color="#8a8a8a",
            label="pruned",
        )
    axis.set_xlabel("trial")
    axis.set_ylabel(f"validation {summary['metric']}")
    axis.legend(fontsize=8)
    axis.set_title("Optimisation history")
    figures.append(
        (save_figure(figure, folder / "history.png"), "Validation metric of each trial and the best so far.")
    )
    if len(complete) >= 3 and study.user_attrs.get("space"):
        optuna = _optuna()
        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as error:  # e.g. every trial had the same values
            logger.info("parameter importance not computed: %s", error)
            importances = {}
        if importances:
            figure, axis = plt.subplots(figsize=(6, max(2.2, 0.6 + 0.4 * len(importances))))
            names = list(importances)[::-1]
            axis.barh(names, [importances[name] for name in names], color="#2b7bba")
            axis.set_xlabel("importance (fANOVA)")
            axis.set_title("Parameter importance")
            caption = "How much of the metric's variation each parameter explains (fANOVA over completed trials)."
            figures.append((save_figure(figure, folder / "importance.png"), caption))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
        caption = "Parallel coordinates: each line a completed trial, coloured by its metric."
        figures.append((save_figure(axes.figure, folder / "parallel.png"), caption))
    return figures
