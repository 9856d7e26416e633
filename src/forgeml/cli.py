"""The `forgeml` command. It parses arguments and calls `forgeml.api`; nothing else happens here.

User errors (bad config, bad data, tampered artefacts) print one paragraph and exit with code 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from forgeml.errors import ConfigError, ForgeError

app = typer.Typer(
    help="Fine-tune, evaluate and document models from one YAML file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(help="List recorded runs, or `runs show ID` for one.", invoke_without_command=True)
config_app = typer.Typer(help="Config helpers.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for `forgeml serve`: create, list, revoke.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
feedback_app = typer.Typer(help="User corrections collected by `forgeml serve`.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
models_app = typer.Typer(
    help="The model registry: named models, versions, aliases (NAME@ALIAS), the promotion gate and log.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

# Piped output is not cut to 80 columns: tables and paths stay whole for scripts and logs.
console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}

Database = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="SQLAlchemy URL of the store, e.g. postgresql://... for several servers "
        "(default: $FORGEML_DB_URL or forgeml.db in the workspace)",
    ),
]

Workspace = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="folder holding runs/ and forgeml.db (default: $FORGEML_WORKSPACE or the current folder)",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and library logs")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show library logs and warnings")] = False,
) -> None:
    STATE["debug"] = debug
    if not (debug or verbose):
        _silence_libraries()


@app.command()
def init(
    task: Annotated[
        str,
        typer.Argument(
            help="text-classification | text-pair-classification | regression | "
            "tabular-classification | tabular-regression"
        ),
    ],
) -> None:
    """Print an annotated starter config: `forgeml init text-classification > my.yaml`."""
    from forgeml.starter import starter_config

    sys.stdout.write(starter_config(task))


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides, e.g. train.lr=3e-5")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue this interrupted run directory")] = None,
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="encrypt the finished run with $FORGEML_KEY (default: $FORGEML_ENCRYPT)")
    ] = False,
    nproc: Annotated[
        int, typer.Option(help="train with this many processes on this machine (DDP through torchrun)")
    ] = 1,
    workspace: Workspace = None,
    quiet: Quiet = False,
) -> None:
    """Data -> train -> evaluate -> model card. Prints the validation and test metrics."""
    from forgeml.config import load_config
    from forgeml.train import distributed
    from forgeml.train.progress import progress_enabled

    if resume is not None and (config is not None or overrides):
        raise ForgeError("--resume takes the config saved in the run directory; give no config or overrides")
    if resume is None and config is None:
        raise ForgeError("give a config file (forgeml run my.yaml), or --resume RUN_DIR")
    # Check the config before importing torch and friends: a typo is reported in a blink.
    resolved = load_config(config, overrides or []) if config is not None else None
    if nproc != 1 and distributed.rank_and_size()[1] == 1:  # this process launches the others, then waits
        if resolved is not None and resolved.train.privacy:
            raise ForgeError("--nproc: train.privacy (DP-SGD) trains in one process")
        arguments = ["run", *([str(config), *(overrides or [])] if config is not None else ["--resume", str(resume)])]
        arguments += [*(["--workspace", str(workspace)] if workspace else []), *(["--quiet"] if quiet else [])]
        arguments += ["--encrypt"] if encrypt else []
        raise typer.Exit(distributed.launch(arguments, nproc))

    from forgeml import api

    show = progress_enabled(quiet)
    encrypted = True if encrypt else None  # None: $FORGEML_ENCRYPT decides
    if resolved is None:
        result = api.resume(resume, workspace, quiet=not show, encrypt=encrypted)
    else:
        result = api.run(resolved, workspace=workspace, quiet=not show, encrypt=encrypted)
    if not distributed.is_lead():
        return  # rank 0 reports
    _report_run(result)


@app.command()
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="finished runs of one task, label set and data (2 or more)")],
    method: Annotated[
        str, typer.Option(help="mean: average the probabilities; vote: majority label; stack: fitted on validation")
    ] = "mean",
    name: Annotated[
        str | None, typer.Option(help="the new run's name (default: the first member's + -ensemble)")
    ] = None,
    workspace: Workspace = None,
    quiet: Quiet = False,
) -> None:
    """Combine finished runs into one model: a new run, evaluated beside its members, that serves like any."""
    from forgeml import api
    from forgeml.train.progress import progress_enabled

    result = api.ensemble(list(runs), method, name, workspace, quiet=not progress_enabled(quiet))
    members = result.metrics["training"]["ensemble"]["members"]
    metric = result.metrics["primary_metric"]
    split = "test" if "test" in result.metrics else "validation"
    for member in members:
        score = member.get(split, {}).get(metric)
        console.print(f"member {member['run']}: {split} {metric} {score:.4f}" if score is not None else member["run"])
    _report_run(result)


def _report_run(result: Any) -> None:
    """A finished run's metrics, where its directory and card are, and the commands that use it."""
    _print_metrics(result.metrics)
    console.print(f"run directory: {result.run_dir}")
    # Where to look next, and the commands that use the run (paths quoted for copy-paste).
    import shlex

    run_arg = shlex.quote(str(result.run_dir))
    card = Path(result.run_dir) / "card.html"
    if card.is_file():
        console.print(f"model card: {card}", soft_wrap=True, markup=False)
    elif card.with_name(card.name + ".enc").is_file():
        message = f"model card: {card}.enc (encrypted; read it after: forgeml decrypt {run_arg})"
        console.print(message, soft_wrap=True, markup=False)
    console.print("next:")
    task = result.metrics.get("task")
    if task == "language-modeling":
        next_commands = [f"forgeml generate {run_arg} PROMPT --max-new-tokens 200 --seed 1"]
    elif task == "instruction-tuning":
        next_commands = [f"forgeml generate {run_arg} PROMPT --temperature 0"]
    elif task == "masked-lm":  # an encoder to fine-tune, not a model that answers
        next_commands = [f"forgeml run CONFIG.yaml model.backbone={run_arg}"]
    else:
        next_commands = [f"forgeml serve {run_arg}", f"forgeml predict {run_arg} FILE -o out.csv"]
    for command in next_commands:
        console.print(f"  {command}", soft_wrap=True, markup=False)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    data: Annotated[Path, typer.Option("--data", "-d", help="labelled file with the training columns")],
    batch_size: int = 64,
) -> None:
    """Re-evaluate a saved run on another labelled file."""
    from forgeml import api

    metrics = api.evaluate(run_dir, data, batch_size)
    _print_metrics({str(data): metrics})


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    data: Annotated[
        Path,
        typer.Argument(
            help="csv / tsv / jsonl / parquet file with the input columns; token-classification: a text file with "
            "one sentence a line, or JSON lines with a tokens list"
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="where to write (.csv, .tsv or .jsonl); default: JSON lines on stdout"),
    ] = None,
    batch_size: int = 64,
    quiet: Quiet = False,
) -> None:
    """Predict every row of a file: its rows plus prediction (and class probabilities), or for a
    token-classification run each sentence with its entities (entity, text, start, end, score)."""
    from forgeml import api
    from forgeml.train.progress import progress_enabled

    if output is None:  # the answers themselves, one JSON object a line, for a pipe or a look
        for row in api.predict_file(run_dir, data, batch_size, show_progress=False):
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    written = api.predict(run_dir, data, output, batch_size, show_progress=progress_enabled(quiet))
    console.print(f"predictions written to {written}")


@app.command()
def generate(
    run_dir: Annotated[
        Path, typer.Argument(help="a language-modeling, instruction-tuning or image-generation run directory")
    ],
    prompt: Annotated[
        str | None,
        typer.Argument(help="the text to continue (a user turn for an instruction-tuned model); not for images"),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="most tokens to add")] = 100,
    temperature: Annotated[float, typer.Option(help="0 picks the likeliest token (greedy)")] = 1.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="sample among the k likeliest tokens")] = None,
    top_p: Annotated[float, typer.Option("--top-p", help="sample among the likeliest tokens holding this mass")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="1 is off")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="end before this text (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="the same seed gives the same text")] = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", min=1, help="continuations to write (images: 64)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="image-generation: the PNG grid to write")
    ] = None,
    truncate: Annotated[str, typer.Option(help="a prompt longer than the context: refuse or left (cut)")] = "refuse",
) -> None:
    """Continue PROMPT with a trained language model, streaming the text as it is generated; or, from an
    image-generation run, write --num-samples new images as one PNG grid (-o grid.png; --seed repeats them)."""
    from forgeml import api
    from forgeml.generate import GenerationOptions

    model = api.load(run_dir)
    if model.generates_images:
        if output is None:
            raise ConfigError("--output: an image-generation run writes a PNG grid; give -o grid.png")
        if prompt is not None:
            raise ConfigError("PROMPT: an image-generation run takes no prompt; remove it")
        count = num_samples or 64
        written = model.write_samples(output, count, seed or 0)
        console.print(f"{count} images written to {written}")
        return
    if prompt is None:
        raise ConfigError("PROMPT: a language model needs the text to continue")
    if output is not None:
        raise ConfigError("--output: is for image-generation runs; a language model's text goes to the terminal")
    num_samples = num_samples or 1

    options = GenerationOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop or ()),
        seed=seed,
        truncate=truncate,
    )
    for index in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {index + 1} ---", flush=True)
        sample_options = options if options.seed is None else replace(options, seed=options.seed + index)
        print(prompt, end="", flush=True)
        for piece in model.stream(prompt, sample_options):
            print(piece, end="", flush=True)  # plain print: rich would hold pieces back to wrap lines
        print(flush=True)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="audit on this file instead (the label column is optional)"),
    ] = None,
    sensitive: Annotated[
        list[str] | None, typer.Option("--sensitive", "-s", help="sensitive column (repeat for several)")
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", "-b", help="another run of the same task: robustness before/after"),
    ] = None,
) -> None:
    """(Re)run the trust audits: fairness, identity swaps, membership inference, robustness, explanations.

    Results in trust/ and the card; audits skipped for want of labels are listed there.
    """
    from forgeml import api

    headline = api.audit(run_dir, data, sensitive, baseline=baseline)
    console.print_json(json.dumps(headline, default=str))
    console.print(f"audit written to {Path(run_dir) / 'trust'} and the model card")


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    texts: Annotated[
        list[str],
        typer.Argument(help="texts to explain (for pairs give 'premise ||| hypothesis'); image files for an image run"),
    ],
    html: Annotated[Path | None, typer.Option("--html", help="also write the highlighted words to this file")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="image runs: the saliency PNG (default saliency.png)")
    ] = None,
    steps: int = 20,
) -> None:
    """Which words (or pixels) pushed the prediction: integrated-gradients attributions, coloured in the terminal
    for text, a saliency PNG for images."""
    from forgeml import api
    from forgeml.trust.explain import explanation_html, explanation_terminal
    from forgeml.trust.image_explain import ImageExplanation, plot_saliency
    from forgeml.workspace import atomic_write_text

    inputs = [tuple(part.strip() for part in text.split("|||")) if "|||" in text else text for text in texts]
    explanations = api.explain(run_dir, inputs, steps)
    if explanations and isinstance(explanations[0], ImageExplanation):
        for explanation in explanations:
            console.print(f"{explanation.source}: {explanation.label} ({explanation.probability:.1%})")
        written = plot_saliency(explanations, output or Path("saliency.png"))
        console.print(f"wrote {written}")
        return
    if output is not None:
        raise ForgeError("explain: --output writes the saliency PNG of an image run; for text use --html")
    for explanation in explanations:
        console.print(explanation_terminal(explanation))
    if html is not None:
        atomic_write_text(html, explanation_html(explanations))
        console.print(f"wrote {html}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """(Re)write card.md and card.html for a run."""
    from forgeml import api

    for path in api.report(run_dir):
        console.print(f"wrote {path}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    formats: Annotated[
        list[str] | None, typer.Option("--format", "-f", help="onnx (fp32 + int8) or torchscript; repeat for both")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="rows for the parity check (default: test split)")
    ] = None,
) -> None:
    """Export the model (ONNX with dynamic axes, int8 too; TorchScript) and check it against PyTorch."""
    from forgeml import api
    from forgeml.export import int8_finding

    report = api.export(run_dir, formats or ["onnx"], data)
    table = Table("export", "file", "MB", "max |diff|", "label agreement", "passed")
    for name, check in report["checks"].items():
        agreement = check.get("label_agreement")
        table.add_row(
            name,
            check["file"],
            f"{check['bytes'] / 1e6:.1f}",
            f"{check['max_abs_diff']:.2e}",
            "—" if agreement is None else f"{agreement:.2%}",
            "yes" if check["passed"] else "NO",
        )
    console.print(table)
    console.print(f"parity on {report['rows']} rows written to {Path(run_dir) / 'export' / 'parity.json'}")
    finding = int8_finding(report)
    if finding:
        console.print(f"[yellow]note:[/yellow] {finding}", highlight=False)


@app.command()
def compress(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """int8 and ONNX Runtime variants side by side: quality, size, latency, throughput; picks one to serve."""
    from forgeml import api
    from forgeml.workspace import resolve_run_path

    report = api.compress(run_dir)
    if report.get("kind") == "language-model":
        from forgeml.compress.language_model import comparison_table

        header, rows = comparison_table(report)
        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        written = resolve_run_path(run_dir) / "compress"
        console.print(f"written to {written}; selected for serving: {report['selected']}")
        return
    metric = report["metric"]
    table = Table("variant", "MB", metric, "drop", "p50 ms (batch 1)", "rows/s (batch 32)", "speed-up 1 / 32")
    for result in report["variants"]:
        name = result["name"] + (" (selected)" if result["name"] == report["selected"] else "")
        name += "" if result.get("parity_passed", True) else " (int8 parity failed)"
        table.add_row(
            name,
            f"{result['bytes'] / 1e6:.1f}",
            f"{result['metrics'][metric]:.4f}",
            f"{result['drop']:+.4f}",
            f"{result['latency_ms']['p50']:.2f}",
            f"{result['throughput_rows_per_s']:.0f}",
            f"{result['speedup_batch1']:.2f}x / {result['speedup_batch32']:.2f}x",
        )
    console.print(table)
    console.print(
        f"written to {resolve_run_path(run_dir) / 'compress'}; frontier in compress/frontier.png and the card"
    )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _database(workspace: Path | None, db: str | None = None) -> str:
    """The SQLAlchemy URL of the workspace's store (runs, API keys, predictions, feedback)."""
    from forgeml.store import database_url
    from forgeml.workspace import workspace_root

    return db or database_url(workspace_root(workspace))


def _key_store(workspace: Path | None, db: str | None = None):
    from forgeml.serve.keys import KeyStore

    return KeyStore(_database(workspace, db))


@app.command()
def serve(
    run: Annotated[str, typer.Argument(help="a run directory, or a run's name (its newest finished run) or id")],
    host: Annotated[str | None, typer.Option(help="address to bind (default: the run's serve.host, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: serve.port, 8000)")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="no API keys (only on 127.0.0.1)")] = False,
    engine: Annotated[
        str | None, typer.Option(help="auto (the variant compress selected), onnx (int8), onnx_fp32 or pytorch")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="records scored together (serve.max_batch)")] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="how long a batch waits to fill (serve.max_wait_ms)")
    ] = None,
    rate_limit: Annotated[
        float | None, typer.Option(help="requests per minute per API key, 429 beyond (serve.rate_limit)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="batches scored at once (serve.workers; default one per core for ONNX)")
    ] = None,
    canary: Annotated[
        str | None, typer.Option(help="NAME@ALIAS:PCT answers PCT % of callers (sticky per API key or route header)")
    ] = None,
    shadow: Annotated[
        str | None, typer.Option(help="NAME@ALIAS[:PCT] also scores (PCT % of) requests off the answer path")
    ] = None,
    drift_every: Annotated[
        float | None,
        typer.Option(help="check drift of the newest served inputs every this many seconds, for /metrics"),
    ] = None,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """Serve a run's model over HTTP: a demo page at /, /v1/predict, /v1/explain, /v1/feedback, /v1/models,
    /healthz, /readyz, /metrics, /docs; a language model answers OpenAI's /v1/completions and
    /v1/chat/completions instead of /v1/predict. Settings come from the run's `serve:` section; options
    override it."""
    from forgeml.config import ServeConfig, with_changes
    from forgeml.registry import Registry, parse_reference
    from forgeml.serve.common import run_server
    from forgeml.serve.runtime import load_runtime
    from forgeml.store import Store

    options = {"host": host, "port": port, "engine": engine, "max_batch": max_batch, "max_wait_ms": max_wait_ms}
    options |= {"rate_limit": rate_limit, "workers": workers, "drift_every_s": drift_every}
    with_changes(ServeConfig(), "serve", **options)  # bad options fail before the model loads
    if no_auth and host is not None:
        _refuse_open_without_keys(host)  # before the model loads, when the option says where
    splits = {"canary": _routed(canary, "--canary", required_share=True), "shadow": _routed(shadow, "--shadow")}
    keys = None if no_auth else _key_store(workspace, db)
    follower = None
    if not Path(run).is_dir() and parse_reference(run):  # NAME@ALIAS: follow the alias as it moves
        from forgeml.serve.deployments import RegistryFollower

        follower = RegistryFollower(Registry(_database(workspace, db)), engine, workers)
        runtime = follower.load_any(run)[0]
    else:
        if canary or shadow:
            raise ForgeError("--canary and --shadow need the model registry: serve NAME@ALIAS (forgeml models)")
        run_dir = Path(run) if Path(run).is_dir() else Store(_database(workspace, db)).locate(run)
        runtime = load_runtime(run_dir, engine, workers)  # None: the run's serve.engine and serve.workers
    settings = with_changes(runtime.predictor.config.serve, "serve", **options)
    if no_auth:
        _refuse_open_without_keys(settings.host)  # the run's serve.host may name another address
    address = f"{settings.host}:{settings.port}"
    if keys is None:
        errors.print(f"authentication is OFF: anyone who can reach {address} may call the API")
    elif not keys.list():
        errors.print("no API keys yet: create one with `forgeml keys create --scope predict`")
    reference = run if follower is not None else None  # NAME@ALIAS: followed as the alias moves
    if getattr(runtime, "generates", False):
        if canary or shadow:
            raise ForgeError("--canary and --shadow serve predictive models; this is a language model")
        from forgeml.serve.generation_app import create_generation_app
        from forgeml.serve.generations import GenerationStore

        errors.print(
            f"serving {runtime.name} {runtime.version} with {runtime.engine} on http://{address}/v1 (OpenAI "
            f"completions and chat; up to {settings.max_batch} sequences decoding together)"
        )
        store = GenerationStore(_database(workspace, db))
        app = create_generation_app(runtime, keys, settings, store, follower, reference)
        if follower is not None:
            errors.print(f"following {run}: switches when the alias moves (checked every {settings.reload_poll_s:g} s)")
        run_server(app, settings.host, settings.port, graceful_s=settings.drain_s + 5)
        return
    from forgeml.serve.app import create_app
    from forgeml.serve.records import RecordStore

    errors.print(
        f"serving {runtime.name} {runtime.version} with {runtime.engine} on http://{address} "
        f"(batches of up to {settings.max_batch}, waiting at most {settings.max_wait_ms:g} ms, "
        f"{runtime.workers} at once)"
    )
    records = RecordStore(_database(workspace, db))  # predictions and feedback
    app = create_app(runtime, keys, settings, records, follower, reference, splits["canary"], splits["shadow"])
    for role, (followed, share) in ((r, v) for r, v in splits.items() if v is not None):
        errors.print(f"{role}: {followed} on {share:g} % of {'callers' if role == 'canary' else 'requests'}")
    if follower is not None:
        errors.print(f"following {run}: switches when the alias moves (checked every {settings.reload_poll_s:g} s)")
    run_server(app, settings.host, settings.port)


def _routed(option: str | None, name: str, required_share: bool = False) -> tuple[str, float] | None:
    """("sst2@challenger", 10.0) from "sst2@challenger:10"; a shadow without a share scores every request."""
    if option is None:
        return None
    from forgeml.registry import parse_reference

    reference, _, share = option.rpartition(":") if ":" in option else (option, "", "")
    try:
        percent = float(share) if share else (None if required_share else 100.0)
    except ValueError:
        percent = -1.0
    if parse_reference(reference) is None or percent is None or not 0 < percent <= 100:
        example = "sst2@challenger:10" if required_share else "sst2@candidate or sst2@candidate:25"
        raise ConfigError(
            f"{name}: {option!r} is not NAME@ALIAS{':PCT' if required_share else '[:PCT]'} with PCT in (0, 100], "
            f"e.g. {example}"
        )
    return reference, percent


def _refuse_open_without_keys(host: str) -> None:
    if host not in LOOPBACK:
        raise ForgeError(f"serve: --no-auth is allowed only on 127.0.0.1, not on {host}; create a key instead")


@keys_app.command("create")
def keys_create(
    scope: Annotated[list[str], typer.Option("--scope", "-s", help="predict, feedback or admin; repeat for several")],
    name: Annotated[str, typer.Option(help="what the key is for")] = "",
    expires_days: Annotated[float | None, typer.Option("--expires-days", help="valid for this many days")] = None,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """Make an API key; it is printed once and stored only salted and hashed."""
    key = _key_store(workspace, db).create(scope, name, expires_days)
    sys.stdout.write(key + "\n")
    errors.print("this key is shown once; keep it in a secret store", highlight=False)


@keys_app.command("list")
def keys_list(workspace: Workspace = None, db: Database = None) -> None:
    """Keys with their scopes and dates (never the secrets)."""
    table = Table("id", "name", "scopes", "created", "expires", "revoked")
    for key in _key_store(workspace, db).list():
        dates = [
            key[k].strftime("%Y-%m-%d %H:%M") if key[k] else "" for k in ("created_at", "expires_at", "revoked_at")
        ]
        table.add_row(key["id"], key["name"], ", ".join(key["scopes"]), *dates)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (from `forgeml keys list`)")],
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """Revoke a key at once: later requests with it get 401."""
    _key_store(workspace, db).revoke(key_id)
    console.print(f"revoked {key_id}")


@feedback_app.command("export")
def feedback_export(
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write (CSV, or JSON lines for generations)")],
    kind: Annotated[
        str,
        typer.Option(
            help="prediction: corrected labels as CSV; generation: rated and corrected generations as JSON lines "
            "(prompt/response or messages, plus chosen/rejected pairs)"
        ),
    ] = "prediction",
    model: Annotated[str | None, typer.Option(help="only this model's feedback")] = None,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """Write what users sent back as the next run's training data: corrected labels (CSV), or for language
    models the corrected and up-rated answers (JSON lines for instruction-tuning, with preference pairs)."""
    from forgeml.workspace import atomic_write_text

    if kind == "generation":
        from forgeml.serve.generations import GenerationStore

        text = GenerationStore(_database(workspace, db)).export_jsonl(model=model)
        count, what = text.count("\n"), "example"
    elif kind == "prediction":
        from forgeml.serve.records import RecordStore

        text = RecordStore(_database(workspace, db)).export_csv(model=model)
        count, what = text.count("\n") - 1, "correction"
    else:
        raise ConfigError(f"--kind: {kind!r} is not a kind of feedback; choose prediction or generation")
    atomic_write_text(output, text)
    console.print(f"wrote {count} {what}{'s' if count != 1 else ''} to {output}")


@app.command()
def encrypt(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Encrypt every file of a run with the key in $FORGEML_KEY (AES-256-GCM); no plaintext file is left."""
    from forgeml.encryption import encrypt_run

    done = encrypt_run(run_dir)
    console.print(f"encrypted {len(done)} files in {run_dir}" if done else f"{run_dir} is already encrypted")


@app.command()
def decrypt(run_dir: Annotated[Path, typer.Argument(help="an encrypted run directory")]) -> None:
    """Decrypt a run encrypted by `forgeml encrypt` (needs the same $FORGEML_KEY)."""
    from forgeml.encryption import decrypt_run

    done = decrypt_run(run_dir)
    console.print(f"decrypted {len(done)} files in {run_dir}" if done else f"{run_dir} is not encrypted")


@app.command()
def keygen() -> None:
    """Print a new random key for FORGEML_KEY (shown once: keep it in a secret store)."""
    from forgeml.encryption import generate_key

    sys.stdout.write(generate_key() + "\n")
    errors.print(
        "keep this key in a secret store (a password manager, vault or CI secret) and pass it as FORGEML_KEY; "
        "runs encrypted with it cannot be read without it",
        highlight=False,
    )


@runs_app.callback()
def runs_list(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option("--name", help="only runs with this name")] = None,
    limit: int = 30,
    workspace: Workspace = None,
) -> None:
    """Table of runs: id, name, task, status, key metrics, when."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = workspace
        return
    from forgeml.store import Store

    records = Store(_database(workspace)).runs(name, limit)
    table = Table("id", "name", "task", "status", "test metrics", "started", "seconds")
    for record in records:
        test = record["metrics"].get("test") or record["metrics"].get("validation") or {}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in list(test.items())[:4])
        seconds = f"{record['seconds']:.0f}" if record["seconds"] else ""
        colour = {"failed": "red", "interrupted": "yellow"}.get(record["status"])
        status = f"[{colour}]{record['status']}[/{colour}]" if colour else record["status"]
        table.add_row(
            record["id"],
            record["name"],
            record["task"],
            status,
            shown,
            record["started_at"].strftime("%Y-%m-%d %H:%M"),
            seconds,
        )
    console.print(table if records else "no runs recorded in this workspace yet")


@runs_app.command("show")
def runs_show(ctx: typer.Context, run_id: Annotated[str, typer.Argument(help="run id or a unique prefix")]) -> None:
    """Everything recorded about one run, as JSON."""
    from forgeml.store import Store

    record = Store(_database(ctx.obj)).run(run_id)
    console.print_json(json.dumps(record, default=str))


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="model name, e.g. sst2")],
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    alias: Annotated[
        str | None, typer.Option(help="also point NAME@ALIAS at it (through the gate if protected)")
    ] = None,
    description: Annotated[str, typer.Option(help="what this version is")] = "",
    force: Annotated[bool, typer.Option("--force", help="move a protected alias without the gate (logged)")] = False,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """Register a run as the next version of NAME (lineage: data files and hashes, config, parent, corrections)."""
    from forgeml.registry import Registry

    registry = Registry(_database(workspace, db))
    version = registry.register(name, run_dir, description=description)
    console.print(f"registered {name}@{version['version']} -> {version['run_path']}", soft_wrap=True, markup=False)
    if alias:
        _promote(name, str(run_dir), alias, force, "", workspace)


@models_app.command("list")
def models_list(workspace: Workspace = None, db: Database = None) -> None:
    """Registered models: versions, aliases and the latest version's test metrics."""
    from forgeml.registry import Registry

    registry = Registry(_database(workspace, db))
    table = Table("name", "versions", "aliases", "latest", "latest test metrics")
    for name in registry.names():
        versions = registry.versions(name)
        aliases = ", ".join(f"{a}={v}" for a, v in registry.aliases(name).items())
        test = versions[-1]["metrics"].get("test") or {}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in list(test.items())[:3])
        table.add_row(name, str(len(versions)), aliases, str(versions[-1]["version"]), shown)
    console.print(table if registry.names() else "no registered models yet (forgeml models register NAME RUN_DIR)")


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="model name")],
    as_json: Annotated[bool, typer.Option("--json", help="everything recorded, as JSON")] = False,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """One model: its versions (run, metrics, parent, corrections used), aliases and promotion log."""
    from forgeml.registry import Registry

    shown = Registry(_database(workspace, db)).show(name)
    if as_json:
        sys.stdout.write(json.dumps(shown, default=str, indent=2) + "\n")
        return
    aliases = shown["aliases"]
    table = Table("version", "aliases", "run", "test metrics", "parent", "corrections", "registered")
    for version in shown["versions"]:
        lineage = version["lineage"]
        parent = lineage.get("parent") or {}
        feedback = lineage.get("feedback") or {}
        test = version["metrics"].get("test") or {}
        table.add_row(
            str(version["version"]),
            ", ".join(a for a, v in aliases.items() if v == version["version"]),
            version["run_id"],
            ", ".join(f"{k}={v:.4f}" for k, v in list(test.items())[:3]),
            f"{parent['name']}@{parent['version']}" if parent else "",
            str(feedback.get("trained", "")),
            version["created_at"].strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)
    log = Table("when", "alias", "version", "from", "by", "forced", "gate", "why", title="promotion log")
    for entry in shown["log"]:
        gate = entry["gate"] or {}
        verdict = "" if not gate else ("passed" if gate.get("passed") else "refused")
        if gate:
            verdict += f" (p={gate['test']['p_value']:.3g}, {gate['metric']} {gate['gain']:+.4f})"
        log.add_row(
            entry["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
            entry["alias"],
            str(entry["version"]),
            str(entry["previous_version"] or ""),
            entry["actor"],
            "yes" if entry["forced"] else "",
            verdict,
            entry["reason"],
        )
    console.print(log)


GateOption = Annotated[float | None, typer.Option(help="override the candidate's gate setting")]


def _gate_settings(candidate: str, workspace: Path | None, **changes: Any):
    """The candidate's `gate:` section with the command's options applied (None: the section's own)."""
    if all(value is None for value in changes.values()):
        return None
    from forgeml.config import with_changes
    from forgeml.improve.promote import gate_settings
    from forgeml.workspace import resolve_run_path

    return with_changes(gate_settings(resolve_run_path(candidate, workspace)), "gate", **changes)


@models_app.command("compare")
def models_compare(
    champion: Annotated[str, typer.Argument(help="the model now serving, e.g. sst2@champion")],
    candidate: Annotated[str, typer.Argument(help="the candidate: a run directory or NAME@VERSION")],
    alpha: GateOption = None,
    min_gain: GateOption = None,
    workspace: Workspace = None,
) -> None:
    """Score both on the fixed test split: McNemar's exact test (classification), or a paired bootstrap of
    RMSE (regression) or of bits per character (language models), plus the fairness/robustness/latency
    limits. The report goes to the candidate's card."""
    from forgeml.improve.promote import GATE_PLOT, compare

    gate = _gate_settings(candidate, workspace, alpha=alpha, min_gain=min_gain)
    report = compare(champion, candidate, workspace, gate)
    _print_gate(report)
    console.print(f"report: {Path(report['candidate']['run']) / GATE_PLOT} and the candidate's card", markup=False)
    if not report["passed"]:
        raise typer.Exit(1)


def _print_gate(report: dict[str, Any]) -> None:
    metric, values, test = report["metric"], report["values"], report["test"]
    title = f"on {report['split']['rows']} test rows"
    if "pieces" in test:  # a language model: scored on the test text, cut into pieces (or per example)
        title = f"on the test split, {test['pieces']} pieces of text"
    table = Table("", report["champion"]["label"], report["candidate"]["label"], title=title)
    table.add_row(metric, f"{values['champion']:.4f}", f"{values['candidate']:.4f}")
    if "feedback_holdout" in report:
        held = report["feedback_holdout"]
        table.add_row(
            f"{metric} on {held['split']['rows']} held-out corrections",
            f"{held['values']['champion']:.4f}",
            f"{held['values']['candidate']:.4f}",
        )
    console.print(table)
    console.print(f"{test['name']}: p = {test['p_value']:.4g}; {metric} gain {report['gain']:+.4f}")
    if "only_candidate_right" in test:
        console.print(
            f"rows only the candidate gets right: {test['only_candidate_right']}; "
            f"only the champion: {test['only_champion_right']}"
        )
    for check in report["checks"]:
        mark = {True: "pass", False: "FAIL", None: "n/a"}[check["passed"]]
        console.print(f"  {mark:4}  {check['check']}: {check['detail']}", markup=False)
    console.print("gate: " + ("PASSED" if report["passed"] else "REFUSED"))


def _promote(name: str, candidate: str, alias: str, force: bool, reason: str, workspace: Path | None, **gate) -> None:
    from forgeml.improve.promote import promote

    settings = _gate_settings(candidate, workspace, **gate) if gate else None
    entry = promote(name, candidate, alias, force=force, reason=reason, workspace=workspace, gate=settings)
    if entry["report"] is not None:
        _print_gate(entry["report"])
    forced = " (forced past the gate)" if entry["forced"] else ""
    moved = f"from version {entry['previous_version']} " if entry["previous_version"] else ""
    console.print(f"{name}@{alias} -> version {entry['version']} {moved}{forced}".rstrip())


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="model name")],
    candidate: Annotated[str, typer.Argument(help="a run directory (registered if new) or NAME@VERSION")],
    alias: Annotated[str, typer.Option(help="the alias to move")] = "champion",
    force: Annotated[
        bool, typer.Option("--force", help="move a protected alias even if the gate refuses (logged)")
    ] = False,
    reason: Annotated[str, typer.Option(help="why, for the promotion log")] = "",
    alpha: GateOption = None,
    min_gain: GateOption = None,
    workspace: Workspace = None,
) -> None:
    """Point NAME@ALIAS at the candidate. A protected alias (champion) moves only through the gate
    against its current version; servers started on NAME@ALIAS switch to it."""
    _promote(name, candidate, alias, force, reason, workspace, alpha=alpha, min_gain=min_gain)


def _since(text: str | None):
    """A time from "24h", "7d", "30m" (ago) or an ISO date/time; None stays None."""
    if text is None:
        return None
    from forgeml.monitor.served import since_time

    return since_time(text)


@app.command()
def tune(
    config: Annotated[str, typer.Argument(help="config YAML with a tune: section, or `show` to report on a study")],
    rest: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides; after `show`: the study name")
    ] = None,
    trials: Annotated[int | None, typer.Option(help="trials this worker runs (default: tune.trials)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="show: print the summary as JSON")] = False,
    workspace: Workspace = None,
    quiet: Quiet = False,
) -> None:
    """Search hyper-parameters with Optuna: each trial is a normal run, the study lives in the workspace
    database, so more workers (here or on machines sharing a PostgreSQL store) join with the same command.
    `forgeml tune show NAME` prints the best trial and writes the study card and best.yaml."""
    from forgeml.tuning import BEST_CONFIG, run_study, write_study_card

    if config == "show":
        if not rest or len(rest) != 1:
            raise ForgeError("forgeml tune show NAME: give one study name")
        summary = write_study_card(rest[0], workspace)
    else:
        from forgeml.config import load_config
        from forgeml.train.progress import progress_enabled

        load_config(config, rest or [])  # a typo is reported before Optuna and torch load
        if as_json:
            raise ForgeError("--json is for `forgeml tune show NAME`")
        summary = run_study(config, rest or [], trials, workspace, show_progress=progress_enabled(quiet))
    if as_json:
        console.print_json(data={key: value for key, value in summary.items() if key != "config"})
        return
    states = ", ".join(f"{count} {state}" for state, count in sorted(summary["states"].items()))
    console.print(f"study {summary['study']}: {summary['trials']} trials ({states}); {summary['objective']}")
    best = summary["best"]
    if best is not None:
        params = ", ".join(f"{key}={json.dumps(value)}" for key, value in best["params"].items())
        console.print(f"best: trial {best['number']}, {summary['metric']} {best['value']:.5g}: {params}", markup=False)
        console.print(f"best run: {best['run_dir']}", soft_wrap=True, markup=False)
        best_file = Path(summary["folder"]) / BEST_CONFIG
        console.print(f"best config: {best_file} (forgeml run it for test metrics)", soft_wrap=True, markup=False)
    console.print(f"study card: {Path(summary['folder']) / 'card.html'}", soft_wrap=True, markup=False)


@app.command()
def retrain(
    name: Annotated[str, typer.Argument(help="a registered model")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides, e.g. train.seed=7")] = None,
    feedback: Annotated[bool, typer.Option("--feedback/--no-feedback", help="merge the served corrections")] = True,
    alias: Annotated[str, typer.Option(help="the version to start from")] = "champion",
    since: Annotated[str | None, typer.Option(help="only corrections since: 24h, 7d or 2026-12-01")] = None,
    weight: Annotated[float, typer.Option(help="how many times each correction counts in training")] = 1.0,
    holdout: Annotated[float, typer.Option(help="share of corrections kept out of training to evaluate on")] = 0.0,
    workspace: Workspace = None,
    quiet: Quiet = False,
) -> None:
    """A new run from NAME@ALIAS's config and data plus its users' corrections, on the same test split;
    then `forgeml models compare` and `forgeml models promote`."""
    import shlex

    from forgeml.improve.retrain import retrain as retrain_model
    from forgeml.train.progress import progress_enabled

    if not feedback:
        raise ForgeError(
            f"retrain without corrections is a plain run: forgeml run on {name}@{alias}'s config.yaml (--feedback)"
        )
    result = retrain_model(
        name, alias, _since(since), weight, holdout, overrides or [], workspace, quiet=not progress_enabled(quiet)
    )
    _print_metrics(result.metrics)
    console.print(f"run directory: {result.run_dir}", soft_wrap=True, markup=False)
    run_arg = shlex.quote(str(result.run_dir))
    console.print("next:")
    console.print(f"  forgeml models compare {name}@{alias} {run_arg}", soft_wrap=True, markup=False)
    console.print(f"  forgeml models promote {name} {run_arg} --alias {alias}", soft_wrap=True, markup=False)


@app.command()
def monitor(
    model: Annotated[str, typer.Argument(help="a registered model (its champion), NAME@ALIAS, a run name or folder")],
    since: Annotated[str | None, typer.Option(help="only requests served since: 24h, 7d or 2026-12-01")] = None,
    window: Annotated[int, typer.Option(help="rows per window (the newest window decides)")] = 500,
    alpha: Annotated[float, typer.Option(help="false-alarm rate per window (Holm over every test)")] = 0.05,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="report folder (default: RUN/monitor/TIME)")
    ] = None,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """Drift of served inputs against the model's training data: KS / chi-squared per feature with PSI
    (tabular), a domain classifier on the model's own embeddings plus length and unknown-token rates (text),
    and the predicted labels; a JSON report and plots. Exit code 1 when the newest window drifted."""
    from forgeml.monitor import monitor_run, tests_by_name
    from forgeml.registry import Registry, parse_reference
    from forgeml.store import Store

    url = _database(workspace, db)
    registry = Registry(url)
    reference = model if parse_reference(model) else (f"{model}@champion" if model in registry.names() else None)
    if Path(model).is_dir():
        run_dir, name = Path(model), None
    elif reference is not None:
        version = registry.resolve(reference)
        run_dir, name = Path(version["run_path"]), version["name"]
    else:
        run_dir, name = Store(url).locate(model), None
    report = monitor_run(run_dir, url, model=name, since=_since(since), window=window, output_dir=output, alpha=alpha)
    latest = report["windows"][-1]
    console.print(
        f"{report['rows']:,} served rows of {report['model']} in {len(report['windows'])} window(s) of {window}; "
        f"{report['windows_drifted']} drifted",
        markup=False,
    )
    tests = tests_by_name(latest)
    for name_ in latest["ranking"][:8]:  # the most drifted first
        test = tests[name_]
        psi = f", PSI {test['psi']:.3f}" if test.get("psi") is not None else ""
        mark = "DRIFT" if test["drift"] else "ok"
        console.print(f"  {mark:5}  {name_}: p = {test['p_adjusted']:.3g} (Holm){psi}", markup=False, emoji=False)
    console.print(f"report: {report['files'][0] if report['files'] else output}", markup=False)
    if report["drift"]:
        raise typer.Exit(1)


@app.command()
def backup(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="the archive to write (.tar.zst)")] = None,
    list_archive: Annotated[
        Path | None, typer.Option("--list", help="show what an archive holds (its manifest) instead")
    ] = None,
    workspace: Workspace = None,
    db: Database = None,
) -> None:
    """One archive of the workspace: every run, the corrections files, and a consistent snapshot of the store
    (SQLite's online backup API while servers write; pg_dump for PostgreSQL), with a manifest of hashes."""
    from forgeml.backup import backup_workspace, read_manifest
    from forgeml.workspace import workspace_root

    if list_archive is not None:
        manifest = read_manifest(list_archive)
        console.print(f"{list_archive}: {len(manifest['members'])} files, made {manifest['created_at']}")
        console.print_json(json.dumps({"database": manifest["database"]}, default=str))
        return
    if output is None:
        raise ConfigError("backup: give --output FILE.tar.zst (or --list ARCHIVE)")
    summary = backup_workspace(workspace_root(workspace), output, db)
    rows = ", ".join(f"{table} {count:,}" for table, count in sorted(summary["rows"].items()))
    console.print(
        f"wrote {summary['path']}: {summary['files']:,} files, {summary['archive_bytes']:,} bytes", markup=False
    )
    if rows:
        console.print(f"store rows at the snapshot: {rows}", markup=False)
    for skipped in summary["skipped"]:
        errors.print(f"left out: {skipped}", markup=False)


@app.command()
def restore(
    archive: Annotated[Path, typer.Argument(help="an archive written by forgeml backup")],
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="an empty (or new) folder to restore into")],
    db: Database = None,
) -> None:
    """Restore a backup into an empty folder. Every file's hash is checked before anything is written; a
    damaged archive is refused (exit 2) and nothing is written."""
    from forgeml.backup import restore_workspace

    summary = restore_workspace(archive, workspace, db or os.environ.get("FORGEML_DB_URL"))
    console.print(f"restored {summary['files']:,} files into {summary['path']} (every hash verified)", markup=False)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the config file."""
    from forgeml.config import config_schema as schema

    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


def _metric_text(value: float) -> str:
    """Counts (tokens, rows) as whole numbers, scores to four decimals."""
    return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1000 else f"{value:.4f}"


def _print_metrics(metrics: dict[str, Any]) -> None:
    from forgeml.evaluate.metrics import scalar_metrics

    for split in ("validation", "test", *[k for k in metrics if k not in ("validation", "test")]):
        values = metrics.get(split)
        if not isinstance(values, dict) or split in ("training", "cross_validation", "baselines", "model"):
            continue
        table = Table(title=f"{split} metrics", title_justify="left")
        scalars = scalar_metrics(values)
        for name in scalars:
            table.add_column(name)
        table.add_row(*(_metric_text(v) for v in scalars.values()))
        console.print(table)
    baselines = metrics.get("baselines") or {}
    model = scalar_metrics(metrics.get(baselines.get("split"), {}) if baselines.get("split") else {})
    if baselines.get("models") and model:
        # The model's scores first, then the simple baselines' on the same split (evaluate/baseline.py).
        table = Table("model", *model, title=f"baselines ({baselines['split']})", title_justify="left")
        table.add_row("this model", *(f"{v:.4f}" for v in model.values()))
        for entry in baselines["models"].values():
            scores = entry.get("metrics") or {}
            table.add_row(entry["label"], *(f"{scores[k]:.4f}" if k in scores else "—" for k in model))
        console.print(table)
    elif baselines.get("skipped"):
        console.print(f"no baselines: {baselines['skipped']}")
    folds = metrics.get("cross_validation")
    if folds:
        text = ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in folds["metrics"].items())
        console.print(f"{folds['k']}-fold cross-validation: {text}")


def _silence_libraries() -> None:
    """Keep the terminal for our own progress display: no third-party progress bars or load reports."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def entrypoint() -> None:
    """Console script: run the app, turning user errors into exit code 2 without a traceback."""
    try:
        code = app(standalone_mode=False)
    except ForgeError as error:
        if STATE["debug"]:
            raise
        errors.print(f"[bold red]error:[/bold red] {error}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("interrupted; resume with `forgeml run --resume RUN_DIR`")
        sys.exit(130)
    except (typer.Abort, typer.Exit) as stop:
        sys.exit(getattr(stop, "exit_code", 1))
    except Exception as error:
        if not _is_usage_error(error):
            raise
        error.show()  # click's usage paragraph: "Usage: forgeml run ... Error: No such option: --bogus"
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(error: Exception) -> bool:
    """Whether `error` is one of click's usage errors (unknown command or option, missing or bad value).

    Recognised by what they can do, not by class: typer releases differ in whether they use click itself
    or a vendored copy (`typer._click`), whose exceptions are not `click.ClickException` instances.
    """
    return callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int)


if __name__ == "__main__":
    entrypoint()
