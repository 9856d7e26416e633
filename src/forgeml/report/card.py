"""The model card: one run directory summarised as `card.md` and a self-contained `card.html`.

The card is built once as a list of sections made of a few plain blocks (paragraph, facts,
table, figure) and then rendered twice, so the Markdown and the HTML always say the same thing.
Markdown is rendered by hand because the blocks are this simple; a Markdown library would be a
dependency for nothing. The HTML embeds its plots as base64 data URIs and its CSS inline, so the
file can be mailed or attached to a ticket and still show everything, offline.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forgeml.config import LOWER_IS_BETTER, family_defaults_used
from forgeml.errors import ArtifactError
from forgeml.workspace import LINEAGE, SAMPLES, atomic_write_text, read_json

SPLIT_ORDER = ("train", "validation", "test", "feedback")
METRIC_ORDER = ("accuracy", "f1", "precision", "recall", "log_loss", "roc_auc", "mae", "rmse", "mse", "r2")
# Known plots first, in the order a reader needs them: data, then training, then results.
PLOT_CAPTIONS = {
    "class_balance.png": "Class balance per split.",
    "lengths.png": "Input lengths per split.",
    "curves.png": "Training loss and validation metric over training steps.",
    "confusion_matrix.png": "Confusion matrix: rows are true classes, columns are predicted classes.",
    "calibration.png": "Calibration: predicted confidence against observed accuracy (the diagonal is perfect).",
    "predicted_vs_true.png": "Predicted against true values (the diagonal is perfect).",
    "examples.png": "Test images with the model's answer and confidence; wrong answers in red (with the true "
    "class), the most confident mistakes first.",
    "federated.png": "Federated training: the global model per round with the range over clients, and the final "
    "model on each client's own held-out rows.",
    # image generation (tasks/image_generation.py)
    "samples.png": "New images from the final weights (the decoder's mean image for a VAE), drawn from the same "
    "latent points as every per-epoch grid in plots/samples_by_step/.",
    "reconstructions.png": "Test images (odd rows) above their VAE reconstructions (the row below).",
    "interpolation.png": "Latent interpolation: each row walks a straight line between two latent points (a VAE: "
    "the codes of two test images), decoded.",
    "frechet_by_epoch.png": "Fréchet distance between classifier features of generated and validation images at "
    "every epoch (lower is better; not comparable to published Inception-based FID).",
    "losses.png": "The GAN's discriminator and generator losses on validation images and fixed noise, per epoch.",
    "sample_classes.png": "The classes the evaluate.classifier run assigns to the test samples.",
}
CLEANING_COLUMNS = {
    "rows_in": "rows in",
    "normalized": "normalized",
    "dropped_empty": "dropped empty",
    "dropped_duplicates": "dropped duplicates",
    "conflicting_label_inputs": "conflicting-label inputs",
    "conflicting_label_rows": "conflicting-label rows",
    "rows_out": "rows out",
}
HYPERPARAMETERS = (
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum_steps",
    "lr",
    "optimizer",
    "scheduler",
    "warmup_ratio",
    "weight_decay",
    "l1",
    "max_grad_norm",
    "group_by_length",
    "seed",
)
LABELS = {"lr": "Learning rate", "grad_accum_steps": "Gradient accumulation steps", "l1": "L1 penalty"}
# The model settings that mean something for each family of task (the config carries them all).
TEXT_MODEL_KEYS = ("backbone", "max_length", "pooling", "dropout")
TABULAR_MODEL_KEYS = ("backbone", "hidden_sizes", "dropout", "categorical", "embedding_dim")
LANGUAGE_MODEL_KEYS = ("backbone", "style", "architecture", "tokenizer", "vocab_size")
WEIGHTS = "model/model.safetensors"
BASELINE_METRICS = ("accuracy", "f1", "mae", "rmse", "r2")  # shown beside the primary metric
FRACTION_METRICS = ("accuracy", "f1", "precision", "recall", "roc_auc", "r2")  # differences read as points
METRIC_MEANINGS = {
    "f1": "macro-averaged F1: every class counts equally, however rare",
    "accuracy": "share of correct predictions",
    "rmse": "root mean squared error, in the target's units",
    "mae": "mean absolute error, in the target's units",
    "loss": "mean cross-entropy per predicted token, in nats",
}
# Where a task's metric means something else than the same name above.
TASK_METRIC_MEANINGS = {
    ("token-classification", "f1"): "entity-level micro F1, seqeval's strict IOB2: an entity counts when its type "
    "and both boundaries match",
}
# Scores of generated answers (instruction tuning), as the evaluation table names them.
GENERATION_MEANINGS = {
    "exact_match": "answers equal to the reference (trimmed, case-folded)",
    "contains": "answers that contain the reference",
    "rouge_l": "ROUGE-L F1 of answer and reference words",
    "ended_with_eos": "answers that ended with the end-of-sequence token before the token limit",
}


# --- blocks: what a card is made of -----------------------------------------------------------


@dataclass
class Paragraph:
    text: str


@dataclass
class Facts:
    """A short list of `label: value` lines."""

    items: list[tuple[str, str]]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Fragment:
    """Markup our own code produced and escaped (highlighted explanations): inlined in the HTML
    card, linked from the Markdown one."""

    html: str
    path: Path


Block = Paragraph | Facts | Table | Figure | Fragment


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# --- public entry point -----------------------------------------------------------------------


def write_card(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `card.md` and `card.html` into `run_dir` and return their paths.

    Reads `config.yaml` (required) and, when present, `data_profile.json`, `metrics.json`,
    `manifest.json` and `plots/*.png`; whatever is missing is left out of the card. `card.md`
    links plots by relative path; `card.html` embeds them and needs no other file or network.
    Both files are written atomically.
    """
    run = Path(run_dir)
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise ArtifactError(f"{run} is not a run directory (no config.yaml in it)")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    profile = _read_optional_json(run / "data_profile.json")
    metrics = _read_optional_json(run / "metrics.json")
    manifest = _read_optional_json(run / "manifest.json")

    title = f"Model card: {config.get('name') or run.name}"
    # The headings of Mitchell et al. (2019), "Model Cards for Model Reporting", in their order.
    sections = [
        _task_and_model(config, profile, manifest, metrics, run),
        _intended_use(config),
        _factors(config, run),
        _metrics_used(metrics),
        _data(profile),
        _lineage(run),
        _training(config, metrics),
        _evaluation(metrics),
        _plots(run / "plots"),
        _samples(run / SAMPLES),
        *_trust(run),
        _compression(run),
        _exports(run),
        _promotion_gate(run),
        _ethics(config, profile, run),
        _limitations(metrics, profile),
    ]
    sections = [section for section in sections if section.blocks]

    md_path, html_path = run / "card.md", run / "card.html"
    atomic_write_text(md_path, render_markdown(title, sections, run))
    atomic_write_text(html_path, render_html(title, sections))
    return md_path, html_path


def _read_optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


# --- sections ---------------------------------------------------------------------------------


def _intended_use(config: dict[str, Any]) -> Section:
    description = (config.get("description") or "").strip()
    if not description:
        return Section("Intended use", [Paragraph('No intended use was given (set "description" in the config).')])
    paragraphs = [part.strip() for part in re.split(r"\n\s*\n", description) if part.strip()]
    return Section("Intended use", [Paragraph(part) for part in paragraphs])


def _task_and_model(
    config: dict[str, Any], profile: dict[str, Any], manifest: dict[str, Any], metrics: dict[str, Any], run: Path
) -> Section:
    facts = [("Task", str(config.get("task") or profile.get("task") or "unknown"))]
    inputs = profile.get("inputs") or _configured_inputs(config.get("data") or {})
    if inputs:
        facts.append(("Inputs", ", ".join(map(str, inputs))))
    # The profile names the label of a labelled task (a language model has none); a run without one, the config.
    label = profile.get("label") if profile else (config.get("data") or {}).get("label")
    if label:
        facts.append(("Label", str(label)))
    model = config.get("model") or {}
    task = str(config.get("task", ""))
    keys = TEXT_MODEL_KEYS
    if task.startswith("tabular"):
        keys = TABULAR_MODEL_KEYS
    elif task == "language-modeling":
        keys = LANGUAGE_MODEL_KEYS if model.get("backbone") == "gpt" else ("backbone", "tokenizer", "max_length")
    elif task == "instruction-tuning":
        keys = ("backbone", "max_length")
    elif task == "masked-lm":
        keys = ("backbone", "architecture", "tokenizer", "vocab_size", "max_length")
    elif task == "token-classification":  # a head on every token: no pooling
        keys = ("backbone", "max_length", "dropout")
    for key in keys:
        if key == "hidden_sizes" and model.get(key) == []:
            facts.append(("Hidden sizes", "none (a linear model)"))
        elif model.get(key) is not None:
            facts.append((_humanize(key), _format_value(model[key])))
    template = (_read_optional_json(run / "model" / "task.json").get("options") or {}).get("template")
    if template:  # instruction tuning
        from forgeml.tasks.instruction_tuning import TEMPLATE_NAMES

        facts.append(("Prompt template", TEMPLATE_NAMES.get(template, template)))
    if model.get("lora"):
        lora = model["lora"]
        targets = ", ".join(lora.get("target_modules") or []) or "PEFT's default layers"
        merged = "merged into the saved model; adapter in model/adapter" if lora.get("merge", True) else "adapter only"
        facts.append(("LoRA", f"rank {lora['r']}, alpha {lora['alpha']:g} on {targets} ({merged})"))
    sizes = metrics.get("model") or {}
    if sizes.get("parameters"):
        facts.append(("Parameters", f"{sizes['parameters']:,}"))
    trainable = sizes.get("trainable_parameters")
    if trainable and trainable != sizes.get("parameters"):
        facts.append(("Trained parameters", f"{trainable:,} ({100 * trainable / sizes['parameters']:.1f} %)"))
    weights_hash = (manifest.get("files") or {}).get(WEIGHTS)
    if weights_hash:
        # The full hash, not a prefix: this is the value someone verifies a deployed file against.
        facts.append(("Weights SHA-256", f"{weights_hash} ({WEIGHTS})"))
    return Section("Model details", [Facts(facts)])


def _factors(config: dict[str, Any], run: Path) -> Section:
    """Which groups of people (or other factors) the evaluation was broken down by."""
    sensitive = (config.get("data") or {}).get("sensitive") or []
    if not sensitive:
        return Section(
            "Factors",
            [
                Paragraph(
                    "No sensitive attributes were configured (data.sensitive), so performance was not compared across "
                    "groups of people. Set data.sensitive and an audit: section to measure it."
                )
            ],
        )
    report = _read_optional_json(run / "trust" / "fairness.json").get("report") or {}
    facts = [
        (str(name), ", ".join(str(g) for g in (report.get("columns", {}).get(name, {}).get("groups") or {})) or "—")
        for name in sensitive
    ]
    return Section(
        "Factors",
        [
            Paragraph("Results are broken down by these attributes (groups as evaluated; numbers are binned):"),
            Facts(facts),
        ],
    )


def _metrics_used(metrics: dict[str, Any]) -> Section:
    primary = metrics.get("primary_metric")
    if not primary:
        return Section("Metrics")
    training = metrics.get("training") or {}
    watched = training.get("watched_metric") or primary
    meaning = TASK_METRIC_MEANINGS.get((metrics.get("task"), primary)) or METRIC_MEANINGS.get(primary, primary)
    return Section(
        "Metrics",
        [
            Paragraph(
                f"The primary metric is {primary} ({meaning}); early stopping and the "
                f"choice of checkpoint watched validation {watched}. Every metric is reported on held-out data, with "
                "per-class results and plots below; cross-validation spread where it was run."
            )
        ],
    )


def _ethics(config: dict[str, Any], profile: dict[str, Any], run: Path) -> Section:
    """What was done about personal data, fairness and privacy, and what was not."""
    data = config.get("data") or {}
    pii = data.get("pii") or {}
    redacted = {
        entity: count
        for split in (profile.get("cleaning") or {}).values()
        for entity, count in (split.get("pii_redacted") or {}).items()
    }
    images = str(config.get("task", "")).startswith("image")  # pixels: no text to screen for personal data
    if pii.get("redact") and not images:
        found = ", ".join(f"{name} {count:,}" for name, count in sorted(redacted.items())) or "none found"
        blocks: list[Block] = [Paragraph(f"Personal data was redacted from the text before training ({found}).")]
    elif not images and not str(config.get("task", "")).startswith("tabular"):
        blocks = [Paragraph("Text inputs were not screened for personal data (data.pii.redact is off).")]
    else:
        blocks = []
    summary = _read_optional_json(run / "trust" / "summary.json")
    titles = [entry["title"] for entry in summary.get("sections", [])]
    if titles:
        blocks.append(Paragraph(f"Audits run: {', '.join(titles)}; their findings are in the sections above."))
    else:
        blocks.append(
            Paragraph(
                "No fairness, privacy, robustness or explanation audit was run for this model (see `forgeml audit`)."
            )
        )
    if summary.get("skipped"):
        missed = "; ".join(entry["audit"] for entry in summary["skipped"])
        blocks.append(Paragraph(f"Not run: {missed} (reasons under Trust: audits not run)."))
    return Section("Ethical considerations", blocks)


def _configured_inputs(data: dict[str, Any]) -> list[str]:
    if data.get("features"):
        return list(data["features"])
    return [data[key] for key in ("text", "text_pair") if data.get(key)]


def _data(profile: dict[str, Any]) -> Section:
    if not profile:
        return Section("Training and evaluation data")
    blocks: list[Block] = []
    sources = profile.get("sources") or {}
    if sources:
        blocks.append(
            Table(["split", "source"], [[split, _describe_source(sources[split])] for split in _ordered(sources)])
        )
    splits = profile.get("splits") or {}
    hashes = profile.get("sha256") or {}
    if splits and any("documents" in splits[split] for split in splits):  # unlabelled text for a language model
        counts = ("documents", "characters")
        rows = [
            [split, *(_format_value(splits[split].get(key)) for key in counts), _short_hash(hashes.get(split))]
            for split in _ordered(splits)
        ]
        blocks.append(Table(["split", "documents", "characters", "SHA-256"], rows, "Text per split."))
    elif splits:
        rows = [
            [split, _format_value(splits[split].get("rows")), _short_hash(hashes.get(split))]
            for split in _ordered(splits)
        ]
        blocks.append(Table(["split", "rows", "SHA-256"], rows, "Rows per split after cleaning."))
        blocks.extend(_label_tables(splits))
        blocks.extend(_length_tables(splits))
    cleaning = profile.get("cleaning") or {}
    if cleaning:
        blocks.append(_cleaning_table(cleaning))
    tokens = profile.get("tokens") or {}
    packed = any("blocks" in tokens[split] for split in tokens)
    examples = any("learnt_tokens" in tokens[split] for split in tokens)
    if packed:  # documents joined into one stream and cut into blocks (language modeling)
        keys, header = ("tokens", "blocks", "dropped_tokens"), ["split", "tokens", "blocks", "tokens in no block"]
        caption = "Tokens per split, cut into training blocks; the stream's tail that fills no block is not used."
    elif any("masked_tokens" in tokens[split] for split in tokens):  # masked-LM rows
        keys = ("documents", "chunks", "chunked_documents", "tokens", "masked_tokens")
        header = ["split", "documents", "rows", "documents cut", "tokens", "masked (evaluation)"]
        caption = (
            "Tokens per split; documents longer than model.max_length are cut into several rows. Evaluation scores "
            "the same masked positions every time; training masks anew each pass."
        )
    elif examples:  # prompt -> response examples (instruction tuning)
        keys = ("examples", "tokens", "learnt_tokens", "truncated", "no_response_tokens")
        header = ["split", "examples", "tokens", "learnt tokens", "truncated", "no response left"]
        caption = (
            "Tokens per split; learnt tokens carry the loss (responses and their end-of-sequence tokens). Truncated "
            "examples lost their end to model.max_length; those with no response left teach nothing."
        )
    else:
        keys, header = ("p50", "p95", "p100", "truncated"), ["split", "tokens p50", "p95", "max", "truncated"]
        caption = "Tokens per input."
    if tokens:
        rows = [[split, *(_format_value(tokens[split].get(key)) for key in keys)] for split in _ordered(tokens)]
        unknown = profile.get("unknown_token_share") or {}
        if unknown:
            # Vocabulary coverage: the share of tokens the backbone's tokenizer could only call [UNK].
            for row in rows:
                share = unknown.get(row[0])
                row.append("—" if share is None else f"{100 * share:.1f} %")
            header.append("unknown tokens")
            caption += " Unknown tokens: the share the tokenizer could only call unknown ([UNK])."
        blocks.append(Table(header, rows, caption))
    return Section("Training and evaluation data", blocks)


def _samples(path: Path) -> Section:
    """A generative model's seeded sample generations (samples.jsonl), prompt beside continuation."""
    if not path.is_file():
        return Section("Sample generations")
    samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not samples:
        return Section("Sample generations")
    first = samples[0]
    if "entities" in first:  # token classification: entities found in held-out sentences, beside the true ones
        caption = "Entities the model finds in held-out sentences (score: mean tag probability), and the true ones."
        rows = [[sample["sentence"], sample["entities"], sample["reference"]] for sample in samples]
        return Section("Example predictions", [Table(["sentence", "predicted", "true"], rows, caption)])
    if "reference" in first:  # answers to held-out prompts, beside the answers the data gives
        caption = "Greedy answers to the first held-out prompts (forgeml generate RUN PROMPT --temperature 0)."
        rows = [[repr(sample["prompt"]), sample["text"], sample["reference"]] for sample in samples]
        return Section("Sample generations", [Table(["prompt", "answer", "reference"], rows, caption)])
    caption = (
        f"Seed {first.get('seed')}, temperature {first.get('temperature')}, top-k {first.get('top_k')}; "
        "the same settings give the same text again (forgeml generate RUN PROMPT --seed ...)."
    )
    rows = [[repr(sample["prompt"]), sample["text"]] for sample in samples]
    return Section("Sample generations", [Table(["prompt", "continuation"], rows, caption)])


def _describe_source(source: Any) -> str:
    if isinstance(source, dict) and "split_from_train" in source:
        details = source["split_from_train"] or {}
        settings = ", ".join(f"{key}={_format_value(value)}" for key, value in details.items())
        return f"split from train ({settings})" if settings else "split from train"
    return _format_value(source)


def _short_hash(digest: str | None) -> str:
    # A 12-hex prefix is enough to tell two data versions apart by eye; the full hash is in the profile.
    return f"{digest[:12]}…" if digest else "—"


def _label_tables(splits: dict[str, Any]) -> list[Block]:
    """Class counts (classification) or target summary (regression), one column per split."""
    names = _ordered(splits)
    counted = [name for name in names if splits[name].get("class_counts")]
    if counted:
        classes = sorted({str(c) for name in counted for c in splits[name]["class_counts"]}, key=_natural_key)
        rows = []
        for cls in classes:
            row = [cls]
            for name in counted:
                counts = {str(k): v for k, v in splits[name]["class_counts"].items()}
                total = sum(counts.values()) or 1
                n = counts.get(cls, 0)
                row.append(f"{n:,} ({100 * n / total:.1f} %)")
            rows.append(row)
        return [Table(["class", *counted], rows, "Class balance.")]
    summarised = [name for name in names if splits[name].get("target")]
    if summarised:
        stats = ("mean", "std", "min", "max")
        rows = [[name, *(_format_value(splits[name]["target"].get(s)) for s in stats)] for name in summarised]
        return [Table(["split", *stats], rows, "Target distribution.")]
    return []


def _length_tables(splits: dict[str, Any]) -> list[Block]:
    rows = []
    for name in _ordered(splits):
        for key, stats in splits[name].items():
            if isinstance(stats, dict) and key.endswith(("_chars", "_words")):
                column, unit = key.rsplit("_", 1)
                rows.append([name, column, unit, *(_format_value(stats.get(p)) for p in ("p50", "p95", "p100"))])
    return [Table(["split", "column", "unit", "p50", "p95", "max"], rows, "Input lengths.")] if rows else []


def _cleaning_table(cleaning: dict[str, Any]) -> Table:
    keys = [key for key in CLEANING_COLUMNS if any(key in counts for counts in cleaning.values())]
    # Counters added later by the cleaning step still show up, after the known ones.
    keys += sorted({key for counts in cleaning.values() for key in counts if key not in CLEANING_COLUMNS})
    header = ["split", *(CLEANING_COLUMNS.get(key, _humanize(key).lower()) for key in keys)]
    rows = [[split, *(_format_value(cleaning[split].get(key)) for key in keys)] for split in _ordered(cleaning)]
    return Table(header, rows, "Cleaning.")


def _training(config: dict[str, Any], metrics: dict[str, Any]) -> Section:
    train = config.get("train") or {}
    blocks: list[Block] = []
    # DP-SGD samples its own batches and clips per example: those two settings did nothing.
    unused = {"max_grad_norm", "group_by_length"} if train.get("privacy") else set()
    if config.get("federated"):  # each client's local passes are federated.local_epochs, shown with the rounds
        unused |= {"epochs", "max_steps"}
    # Values that are their model family's default say so: "0.001 (default for mlp)".
    model = config.get("model") or {}
    defaults = family_defaults_used(train, model.get("backbone"), config.get("task"), bool(model.get("lora")))

    def shown(key: str, text: str) -> str:
        return f"{text} (default for {defaults[key]})" if key in defaults else text

    settings = [
        (_humanize(key), shown(key, _format_value(train[key])))
        for key in HYPERPARAMETERS
        if train.get(key) is not None and key not in unused
    ]
    stopping = train.get("early_stopping")
    if stopping:
        settings.append(("Early stopping", _early_stopping(stopping, metrics, shown)))
    adversarial = train.get("adversarial")
    if adversarial:
        method = str(adversarial.get("method") or "fgm")
        if method == "pgd":
            levels = 255 * float(adversarial["epsilon"])
            step = 255 * float(adversarial.get("step_size") or 0)
            described = (
                f"PGD on pixels (Madry et al.), ε = {levels:.3g}/255 (L∞), {adversarial.get('steps')} steps of "
                f"{step:.3g}/255, random start; trained on the attacked images"
            )
        else:
            described = f"FGM on word embeddings, ε = {adversarial.get('epsilon'):g}"
        settings.append(("Adversarial training", described))
    if settings:
        blocks.append(Table(["setting", "value"], [list(item) for item in settings], "Hyperparameters."))
    outcome = metrics.get("training") or {}
    if outcome:
        blocks.append(Facts(_training_outcome(outcome)))
    if outcome.get("privacy"):
        blocks += _differential_privacy(outcome["privacy"], str(config.get("task", "")).startswith("tabular"))
    if outcome.get("federated"):
        blocks += _federated(outcome["federated"], outcome.get("watched_metric") or "")
    if outcome.get("ensemble"):
        blocks += _ensemble(outcome["ensemble"], metrics)
    return Section("Training set-up", blocks)


def _ensemble(summary: dict[str, Any], metrics: dict[str, Any]) -> list[Block]:
    """The members and the ensemble side by side on the same held-out splits."""
    described = {
        "mean": "the members' probabilities (or values) averaged",
        "vote": "the label most members choose (ties broken by the mean probability)",
        "stack": "a logistic (ridge, for a number) regression on the members' outputs, fitted on the validation split",
    }
    splits = [name for name in ("validation", "test") if name in metrics]
    names = [metrics.get("primary_metric") or "", "accuracy", "macro_f1", "rmse"]
    shown = list(dict.fromkeys(n for n in names if n and any(n in metrics[s] for s in splits)))
    header = ["model", *(f"{split} {name}" for split in splits for name in shown)]
    rows = [
        [
            f"member {index + 1}: {member['id']}",
            *(_format_value(member.get(s, {}).get(n)) for s in splits for n in shown),
        ]
        for index, member in enumerate(summary["members"])
    ]
    rows.append([f"ensemble ({summary['method']})", *(_format_value(metrics[s].get(n)) for s in splits for n in shown)])
    facts = [
        ("Ensemble", f"{len(summary['members'])} trained runs combined: {described[summary['method']]}"),
        ("Encodings per request", f"{summary['input_groups']} (members that read inputs alike share one)"),
    ]
    caption = "Each member and the ensemble on the same rows; the member runs keep their own cards."
    return [Facts(facts), Table(header, rows, caption)]


def _early_stopping(stopping: dict[str, Any], metrics: dict[str, Any], shown: Callable[[str, str], str]) -> str:
    """The patience and the metric actually watched, e.g. 'patience 5 (default for mlp) on validation f1'."""
    patience = shown("early_stopping.patience", f"patience {stopping.get('patience')}")
    if stopping.get("metric"):
        return f"{patience} on validation {shown('early_stopping.metric', str(stopping['metric']))}"
    # No metric named: training watched the task's primary metric (recorded in the training summary).
    watched = (metrics.get("training") or {}).get("watched_metric") or metrics.get("primary_metric")
    if watched:
        return f"{patience} on validation {watched} (the task's primary metric)"
    return f"{patience} on the task's primary validation metric"


def _differential_privacy(privacy: dict[str, Any], tabular: bool) -> list[Block]:
    """What DP-SGD guaranteed, and, as plainly, what it did not cover."""
    facts = [
        (
            "Privacy spent",
            f"ε = {privacy['epsilon']:.2f} (budget {privacy['target_epsilon']:g}), δ = {privacy['delta']:g}",
        ),
        ("Accountant", str(privacy["accountant"]).upper()),
        ("Noise multiplier", f"{privacy['noise_multiplier']:.3f}"),
        ("Per-example clipping", f"L2 norm ≤ {privacy['max_grad_norm']:g}"),
        ("Sampling", f"Poisson, rate {privacy['sample_rate']:.4f}, {privacy['steps']:,} steps"),
    ]
    if privacy.get("frozen_parameters"):
        facts.append(("Frozen (not trained)", f"{privacy['frozen_parameters']:,} embedding parameters"))
    fitted = (
        "the numeric columns' means and standard deviations and the category vocabularies"
        if tabular
        else "the label set"
    )
    scope = (
        f"Trained with DP-SGD: the weights are ({privacy['epsilon']:.2f}, {privacy['delta']:g})-differentially "
        "private with respect to any one training row. Not covered by the guarantee: "
        f"{fitted}, computed from the training data without noise, and the validation split, used to pick the "
        "checkpoint."
    )
    if privacy.get("frozen_parameters"):
        scope += " Embedding tables were frozen at their pre-trained values, which costs some accuracy."
    return [Facts(facts), Paragraph(scope)]


def _federated(summary: dict[str, Any], metric: str) -> list[Block]:
    """How the federation was made and run, each client's share and score, and what its privacy covers."""
    facts = [
        ("Federated training", f"{summary['strategy']} over {summary['clients']} clients ({summary['split']})"),
        (
            "Rounds",
            f"{summary['rounds']} (best: {summary.get('best_round')}), {summary['clients_per_round']} clients "
            f"a round, {summary['local_epochs']} local epoch(s) each",
        ),
        ("Engine", str(summary.get("engine", ""))),
    ]
    if summary.get("proximal_mu") is not None:
        facts.append(("Proximal term (FedProx)", f"mu = {summary['proximal_mu']:g}"))
    blocks: list[Block] = [Facts(facts)]
    rows = []
    for client in summary.get("clients_scored", []):
        score = client.get(metric)
        held_out = f"{client['rows']:,} {client['split']}" if client.get("rows") else "none"
        rows.append([client["client"], f"{client['train_rows']:,}", held_out, _format_value(score)])
    if rows:
        blocks.append(
            Table(
                ["client", "training rows", "held-out rows", metric],
                rows,
                "The final model on each "
                "client's own held-out rows (shared among clients as their training rows were).",
            )
        )
    privacy = summary.get("privacy")
    if privacy:
        blocks.append(
            Facts(
                [
                    (
                        "Client-level privacy",
                        f"ε = {privacy['epsilon']:.2f}, δ = {privacy['delta']:g} after "
                        f"{privacy['releases']} noisy averages",
                    ),
                    (
                        "Noise and clipping",
                        f"noise multiplier {privacy['noise_multiplier']:g}, each client's update clipped "
                        f"to L2 norm {privacy['clipping_norm']:g}",
                    ),
                    ("Accounting", privacy["accounting"]),
                ]
            )
        )
        blocks.append(
            Paragraph(
                "The global weights are differentially private with respect to any one client's participation (all of "
                "its rows together), as released after each round. Not covered: the preprocessing fitted on the "
                "pooled training rows (scales, vocabularies), the validation split the server uses to pick the "
                "best round, and the per-client scores in this card."
            )
        )
    return blocks


def _training_outcome(outcome: dict[str, Any]) -> list[tuple[str, str]]:
    facts = []
    if outcome.get("steps") is not None:
        facts.append(("Optimizer steps", _format_value(outcome["steps"])))
    if outcome.get("best_step") is not None:
        best = _format_value(outcome["best_step"])
        if outcome.get("best_metric") is not None:
            best += f" ({outcome.get('watched_metric') or 'metric'} = {_format_value(outcome['best_metric'])})"
        facts.append(("Best step", best))
    if outcome.get("stopped_early") is not None:
        facts.append(("Stopped early", "yes" if outcome["stopped_early"] else "no"))
    if outcome.get("samples_per_second") is not None:
        facts.append(("Throughput", f"{outcome['samples_per_second']:.1f} samples/s"))
    if outcome.get("mfu") is not None:
        # MFU is recorded as a fraction of the device's peak FLOP/s.
        facts.append(("Model FLOPs utilisation", f"{100 * outcome['mfu']:.1f} %"))
    if outcome.get("seconds") is not None:
        facts.append(("Training time", _format_duration(outcome["seconds"])))
    return facts


def _evaluation(metrics: dict[str, Any]) -> Section:
    splits = _evaluated_splits(metrics)
    primary = metrics.get("primary_metric")
    blocks: list[Block] = []
    if primary:
        blocks.append(Paragraph(f"Primary metric: {primary}."))
    if splits:
        blocks.append(_metrics_table({name: metrics[name] for name in splits}, primary))
    scored = [key for key in GENERATION_MEANINGS if any(key in metrics[name] for name in splits)]
    if scored:
        meanings = "; ".join(f"{key.replace('_', ' ')}: {GENERATION_MEANINGS[key]}" for key in scored)
        blocks.append(
            Paragraph(
                f"Greedy answers to the prompts were scored against the references ({meanings}). "
                "Every answer is in generations.jsonl."
            )
        )
    for name in splits:
        per_class = metrics[name].get("per_class") or {}
        if per_class:
            rows = [
                [str(cls), *(_format_metric(scores.get(key)) for key in ("precision", "recall", "f1", "support"))]
                for cls, scores in per_class.items()
            ]
            blocks.append(Table(["class", "precision", "recall", "f1", "support"], rows, f"Per class ({name})."))
    if any("frechet_distance" in metrics[name] for name in splits):
        from forgeml.evaluate.frechet import NOT_FID

        blocks.append(Paragraph(NOT_FID))
    if any("bits_per_dim" in metrics[name] for name in splits):
        from forgeml.evaluate.pixel_likelihood import ELBO_NOTE

        blocks.append(Paragraph(ELBO_NOTE))
    blocks.extend(_baselines(metrics))
    cross_validation = metrics.get("cross_validation") or {}
    if cross_validation.get("metrics"):
        blocks.append(_cross_validation_table(cross_validation))
    return Section("Quantitative analyses", blocks)


def _baselines(metrics: dict[str, Any]) -> list[Block]:
    """The simple baselines (evaluate/baseline.py) beside the model, on the same split, and what the model adds."""
    baselines = metrics.get("baselines") or {}
    if baselines.get("skipped"):
        return [Paragraph(f"No baselines: {baselines['skipped']}.")]
    split, models = baselines.get("split"), baselines.get("models") or {}
    model_scores = metrics.get(split) if split else None
    if not models or not isinstance(model_scores, dict):
        return []
    primary = metrics.get("primary_metric")
    keys = [key for key in (primary, *BASELINE_METRICS) if key and key in model_scores]
    keys = list(dict.fromkeys(keys))
    rows = [["this model", *(_format_metric(model_scores.get(key)) for key in keys)]]
    skipped = []
    for entry in models.values():
        scores = entry.get("metrics") or {}
        rows.append([str(entry.get("label")), *(_format_metric(scores.get(key)) for key in keys)])
        if entry.get("skipped"):
            skipped.append(f"{entry.get('label')} could not be fitted ({entry['skipped']})")
    header = ["model", *(f"{key} (primary)" if key == primary else key for key in keys)]
    rows_used, seconds = _format_value(baselines.get("train_rows")), _format_duration(baselines.get("seconds") or 0.0)
    caption = (
        f"Baselines on the {split} split: simple models fitted on {rows_used} rows of the same training split "
        f"in {seconds}, scored like this model."
    )
    how = [(str(entry.get("label")), str(entry.get("description"))) for entry in models.values()]
    blocks: list[Block] = [Table(header, rows, caption), Facts(how)]
    gain = _gain_over_baselines(model_scores, models, primary, split)
    if gain:
        blocks.append(Paragraph(gain))
    if skipped:
        text = "; ".join(skipped)
        blocks.append(Paragraph(text[:1].upper() + text[1:] + "."))
    return blocks


def _gain_over_baselines(
    model_scores: dict[str, Any], models: dict[str, Any], primary: str | None, split: str
) -> str | None:
    """One sentence: the model's primary metric against the best baseline's."""
    mine = model_scores.get(primary) if primary else None
    scored = {
        entry.get("label"): (entry.get("metrics") or {}).get(primary)
        for entry in models.values()
        if _is_scalar((entry.get("metrics") or {}).get(primary))
    }
    if not _is_scalar(mine) or not scored:
        return None
    lower_is_better = primary in LOWER_IS_BETTER
    best = (min if lower_is_better else max)(scored, key=lambda label: scored[label])
    theirs = scored[best]
    if not (mine < theirs if lower_is_better else mine > theirs):
        return (
            f"On the {split} split the model ({primary} {mine:.4f}) does not beat the best baseline, {best} "
            f"({theirs:.4f}): the model adds nothing measurable over it here."
        )
    if lower_is_better:
        gain = f"{(theirs - mine) / theirs * 100:.1f} % lower {primary} than"
    elif primary in FRACTION_METRICS:
        gain = f"+{(mine - theirs) * 100:.1f} points {primary} over"
    else:
        gain = f"+{mine - theirs:.4g} {primary} over"
    return (
        f"On the {split} split the model scores {primary} {mine:.4f}, {gain} the best baseline, {best} ({theirs:.4f})."
    )


def _evaluated_splits(metrics: dict[str, Any]) -> list[str]:
    """The splits metrics.json has scores for (validation, test, ...), in reading order."""
    return [
        name
        for name in _ordered(metrics)
        if name not in ("training", "cross_validation", "audit", "baselines", "model") and _is_split(metrics[name])
    ]


def _is_split(value: Any) -> bool:
    return isinstance(value, dict) and any(_is_scalar(v) for v in value.values())


def _metrics_table(splits: dict[str, dict[str, Any]], primary: str | None) -> Table:
    names = {key for scores in splits.values() for key, value in scores.items() if _is_scalar(value)}
    ordered = sorted(names, key=lambda key: (key != primary, _metric_rank(key), key))
    rows = []
    for key in ordered:
        label = f"{key} (primary)" if key == primary else key
        rows.append([label, *(_format_metric(scores.get(key)) for scores in splits.values())])
    return Table(["metric", *splits], rows, "Scores per split.")


def _cross_validation_table(cross_validation: dict[str, Any]) -> Table:
    results = cross_validation["metrics"]
    rows = []
    for key in sorted(results, key=lambda key: (_metric_rank(key), key)):
        result = results[key]
        folds = ", ".join(_format_metric(value) for value in result.get("folds") or [])
        rows.append([key, f"{_format_metric(result.get('mean'))} ± {_format_metric(result.get('std'))}", folds])
    k = cross_validation.get("k")
    return Table(["metric", "mean ± std", "folds"], rows, f"{k}-fold cross-validation." if k else "Cross-validation.")


def _metric_rank(key: str) -> int:
    return METRIC_ORDER.index(key) if key in METRIC_ORDER else len(METRIC_ORDER)


def _plots(plots_dir: Path) -> Section:
    if not plots_dir.is_dir():
        return Section("Plots")
    files = sorted(plots_dir.glob("*.png"), key=_plot_order)
    figures: list[Block] = [Figure(path, PLOT_CAPTIONS.get(path.name) or _humanize(path.stem) + ".") for path in files]
    return Section("Plots", figures)


def _plot_order(path: Path) -> tuple[int, str]:
    known = list(PLOT_CAPTIONS)
    return (known.index(path.name), "") if path.name in known else (len(known), path.name)


def _trust(run: Path) -> list[Section]:
    """One section per audit, from `trust/summary.json` (written by forgeml.trust.audit)."""
    summary = _read_optional_json(run / "trust" / "summary.json")
    sections = []
    for entry in summary.get("sections", []):
        blocks: list[Block] = [Paragraph(text) for text in entry.get("paragraphs", [])]
        if entry.get("facts"):
            blocks.append(Facts([(str(label), str(value)) for label, value in entry["facts"]]))
        for table in entry.get("tables", []):
            blocks.append(
                Table(table["header"], [[str(c) for c in row] for row in table["rows"]], table.get("caption", ""))
            )
        for plot in entry.get("plots", []):
            if (run / plot["path"]).is_file():
                blocks.append(Figure(run / plot["path"], plot.get("caption", "")))
        fragment = entry.get("fragment")
        if fragment and (run / fragment).is_file():
            blocks.append(Fragment((run / fragment).read_text(encoding="utf-8"), run / fragment))
        sections.append(Section(f"Trust: {entry['title']}", blocks))
    skipped = summary.get("skipped") or []
    if skipped:  # an audit that could not run is a finding too: never leave it out silently
        sections.append(
            Section(
                "Trust: audits not run",
                [
                    Paragraph("These audits, or parts of them, were skipped:"),
                    Facts([(str(entry["audit"]), str(entry["reason"])) for entry in skipped]),
                ],
            )
        )
    return sections


def _lineage(run: Path) -> Section:
    """Where a retrained run comes from: its parent version and the corrections it learned (lineage.json)."""
    lineage = _read_optional_json(run / LINEAGE)
    if not lineage:
        return Section("Lineage", [])
    facts = []
    parent = lineage.get("parent")
    if parent:
        facts.append(("Parent", f"{parent['name']}@{parent['version']} ({parent['alias']}, run {parent['run_id']})"))
    feedback = lineage.get("feedback")
    if feedback:
        facts += [
            ("Corrections", f"{feedback['corrections']:,} received, {feedback['distinct_inputs']:,} distinct inputs"),
            (
                "Trained on",
                f"{feedback['trained']:,} (weight {feedback['weight']:g}: {feedback['added_training_rows']:,} rows)",
            ),
            ("Replaced training rows", f"{feedback['replaced_training_rows']:,}"),
            ("Left out (inputs in validation/test)", f"{feedback['left_out_in_evaluation_splits']:,}"),
            ("Held out for evaluation", f"{feedback['held_out']:,} (split 'feedback')"),
        ]
        if lineage.get("corrections_since"):
            facts.append(("Corrections since", str(lineage["corrections_since"])))
    text = (
        "This model was retrained from a registered version with its users' corrections; the latest correction of "
        "an input wins, and it is judged on the same test split as its parent. lineage.json lists every correction."
    )
    return Section("Lineage", [Paragraph(text), Facts(facts)])


def _promotion_gate(run: Path) -> Section:
    """The last `forgeml models compare` of this run against the model it would replace."""
    report = _read_optional_json(run / "gate" / "report.json")
    if not report:
        return Section("Promotion gate", [])
    test, metric = report["test"], report["metric"]
    champion, candidate = report["champion"]["label"], report["candidate"]["label"]
    verdict = "passed" if report["passed"] else "refused"
    text = (
        f"Compared with {champion} on the same {report['split']['rows']:,} {report['split']['name']} rows "
        f"({test['name']}): {metric} {report['values']['champion']:.4f} -> {report['values']['candidate']:.4f} "
        f"({report['gain']:+.4f}), p = {test['p_value']:.3g}. The gate {verdict} this model."
    )
    rows = [
        [check["check"], {True: "pass", False: "fail", None: "n/a"}[check["passed"]], check["detail"]]
        for check in report["checks"]
    ]
    blocks: list[Block] = [
        Paragraph(text),
        Table(["check", "result", "detail"], rows, f"{candidate} against {champion}."),
    ]
    held = report.get("feedback_holdout")
    if held:
        blocks.append(
            Paragraph(
                f"On {held['split']['rows']:,} held-out corrections: {metric} {held['values']['champion']:.4f} -> "
                f"{held['values']['candidate']:.4f} (p = {held['test']['p_value']:.3g}; shown, not gated)."
            )
        )
    if (run / "gate" / "gate.png").is_file():
        blocks.append(
            Figure(run / "gate" / "gate.png", "The metric with its 95 % bootstrap interval, and the paired rows.")
        )
    return Section("Promotion gate", blocks)


def _compression_mark(result: dict[str, Any], selected: str) -> str:
    if result["name"] == selected:
        return " (selected)"
    return "" if result.get("parity_passed", True) else " (failed its int8 parity check)"


def _language_model_compression(report: dict[str, Any]) -> Section:
    from forgeml.compress.language_model import comparison_table

    header, rows = comparison_table(report)
    text = (
        f"Perplexity on the {report['held_out']} split ({report['tokens']:,} tokens); greedy decoding of "
        f"{report['new_tokens']} tokens timed alone (batch 1) and with 8 sequences decoding together in the "
        f"serving engine (batch 8), on this machine; 'greedy same': share of {report['prompts']} prompts whose "
        f"greedy text equals the original's. Selected for serving: {report['selected']}, the fastest at batch 8 "
        f"whose perplexity is within {report['tolerance']:.0%} of the original's."
    )
    return Section("Compression", [Paragraph(text), Table(header, rows, "The language model's variants.")])


def _compression(run: Path) -> Section:
    """The variants side by side (compress/compression.json) and the frontier plot."""
    report = _read_optional_json(run / "compress" / "compression.json")
    if not report.get("variants"):
        return Section("Compression", [])
    if report.get("kind") == "language-model":
        return _language_model_compression(report)
    metric = report["metric"]
    rows = [
        [
            result["name"] + _compression_mark(result, report["selected"]),
            f"{result['bytes'] / 1e6:.1f}",
            f"{result['metrics'][metric]:.4f}",
            f"{result['drop']:+.4f}",
            f"{result['latency_ms']['p50']:.2f}",
            f"{result['latency_ms']['p95']:.2f}",
            f"{result['throughput_rows_per_s']:,.0f}",
            f"{result['speedup_batch1']:.2f}x",
            f"{result['speedup_batch32']:.2f}x",
        ]
        for result in report["variants"]
    ]
    header = ["variant", "MB", metric, "drop", "p50 ms", "p95 ms", "rows/s at 32", "speed-up at 1", "speed-up at 32"]
    blocks: list[Block] = [
        Paragraph(
            f"Each variant scored on the same {report['rows']:,} test rows; latency is single-row calls, throughput "
            f"batches of 32, on this machine. Selected for serving: {report['selected']}, the fastest at batch 1 "
            f"whose {metric} is within {report['tolerance']:g} of the original."
        ),
        Table(header, rows, "Compressed variants."),
    ]
    notes = []
    if report.get("magnitude_pruning"):
        notes.append(
            f"The pruned model has {report['magnitude_pruning']['sparsity']:.0%} of its Linear weights at zero "
            "(global magnitude pruning, kept through a recovery fine-tune on the original's answers); dense "
            "kernels run it no faster, but it compresses."
        )
    if (report.get("ffn_pruning") or {}).get("intermediate_size"):
        notes.append(
            f"The feed-forward-pruned model keeps the {report['ffn_pruning']['intermediate_size']:,} most important "
            "neurons of each layer's feed-forward block (|input weights| x |output weights|), then recovers on the "
            "original's answers."
        )
    heads = report.get("head_pruning") or {}
    if heads.get("heads_kept"):
        notes.append(
            f"The head-pruned model keeps {heads['heads_kept']} of the {heads['heads']} attention heads in each "
            "layer: those whose share of the attention output is largest on training data. It then recovers on "
            "the original's answers."
        )
    for note in reversed(notes):
        blocks.insert(1, Paragraph(note))
    distilled = report.get("distillation")
    if distilled:
        kept = ", ".join(str(i) for i in distilled["teacher_layers_kept"])
        blocks.insert(
            1,
            Paragraph(
                f"The distilled student keeps the teacher's embeddings, head and transformer layers {kept}; it was "
                f"trained for {distilled['steps']:,} steps on the teacher's softened answers and the labels "
                "(saved in compress/student/)."
            ),
        )
    plot = run / "compress" / "frontier.png"
    if plot.is_file():
        blocks.append(Figure(plot, "Quality against latency; marker area is the size on disk; ringed: selected."))
    return Section("Compression", blocks)


def _exports(run: Path) -> Section:
    """The exported files and how closely each matches the PyTorch model (export/parity.json)."""
    parity = _read_optional_json(run / "export" / "parity.json")
    if not parity.get("checks"):
        return Section("Exports", [])
    rows = [
        [
            name,
            f"export/{check['file']}",
            f"{check['bytes'] / 1e6:.1f}",
            f"{check['max_abs_diff']:.1e}",
            "—" if check.get("label_agreement") is None else f"{100 * check['label_agreement']:.1f} %",
            "yes" if check["passed"] else "no",
        ]
        for name, check in parity["checks"].items()
    ]
    header = ["export", "file", "MB", "max |output diff|", "same label", "within tolerance"]
    caption = (
        f"Each export against the PyTorch model on {parity['rows']:,} rows (fp32: diff ≤ 1e-4; int8: ≥ 99 % labels)."
    )
    return Section("Exports", [Table(header, rows, caption)])


def _limitations(metrics: dict[str, Any], profile: dict[str, Any]) -> Section:
    evaluated = _evaluated_splits(metrics)
    if evaluated:
        splits = f"the {' and '.join(evaluated)} split{'s' if len(evaluated) > 1 else ''} listed above"
        scope = f"This model was evaluated only on {splits}, drawn from the same sources as its training data. "
    else:
        scope = "This card records no evaluation on held-out data, so nothing here shows how well the model works. "
    blocks: list[Block] = [
        Paragraph(
            scope + "Scores on such data say little about data from other sources, time periods, languages or "
            "groups of people, and they average over everyone, so they can hide groups the model serves badly. "
            "Before deploying it, check fairness across the groups it will affect, robustness to noisy, shifted or "
            "adversarial input, and calibration on data like production's, then keep monitoring it once it is live."
        )
    ]
    blocks.extend(Paragraph(warning) for warning in profile.get("warnings") or [])
    truncated = ((profile.get("tokens") or {}).get("train") or {}).get("truncated")
    if truncated:
        blocks.append(
            Paragraph(
                f"{truncated:,} training inputs were longer than the model's maximum length and were truncated; "
                "the model never saw their ends."
            )
        )
    return Section("Caveats and recommendations", blocks)


# --- formatting -------------------------------------------------------------------------------


def _ordered(mapping: dict[str, Any]) -> list[str]:
    """Split names in reading order: train, validation, test, then any others as given."""
    known = [name for name in SPLIT_ORDER if name in mapping]
    return known + [name for name in mapping if name not in SPLIT_ORDER]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_metric(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else _format_value(value)


def _format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}={_format_value(item)}" for key, item in value.items())
    return str(value)


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _humanize(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    text = key.replace("_", " ")
    return text[:1].upper() + text[1:]


def _natural_key(text: str) -> tuple[int, float | str]:
    # Class labels are often numbers stored as strings: sort "2" before "10".
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?( \(.*\))?( %)?$|^—$")


def _numeric_columns(table: Table) -> list[bool]:
    """Right-align a column when every cell in it is a number (or a dash for missing)."""
    columns = list(zip(*table.rows, strict=True)) if table.rows else [() for _ in table.header]
    return [any(cell != "—" for cell in cells) and all(_NUMERIC.match(cell) for cell in cells) for cells in columns]


# --- Markdown ---------------------------------------------------------------------------------


def render_markdown(title: str, sections: list[Section], run: Path) -> str:
    lines = [f"# {_md_text(title)}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += [*_markdown_block(block, run), ""]
    return "\n".join(lines).rstrip() + "\n"


def _markdown_block(block: Block, run: Path) -> list[str]:
    if isinstance(block, Paragraph):
        return [_md_text(block.text)]
    if isinstance(block, Facts):
        return [f"- **{_md_cell(label)}:** {_md_cell(value)}" for label, value in block.items]
    if isinstance(block, Table):
        numeric = _numeric_columns(block)
        lines = [f"*{_md_text(block.caption)}*", ""] if block.caption else []
        lines.append("| " + " | ".join(_md_cell(cell) for cell in block.header) + " |")
        lines.append("|" + "|".join("---:" if right else "---" for right in numeric) + "|")
        lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in block.rows]
        return lines
    relative = block.path.relative_to(run).as_posix()
    if isinstance(block, Fragment):
        return [f"[Open the highlighted explanations]({relative})"]
    return [f"![{_md_cell(block.caption)}]({relative})", "", f"*{_md_text(block.caption)}*"]


def _md_text(text: str) -> str:
    # Markdown passes raw HTML through, so user text is escaped here too: a card shown by a wiki or
    # registry must not run a `<script>` that someone put in a config's description.
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    # A pipe or newline inside a cell would break the table row.
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


# --- HTML -------------------------------------------------------------------------------------

# Inline, and no web fonts: the card must render the same with no network.
CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 960px; margin: 2rem auto; padding: 0 1.5rem; background: #fff; }
h1 { font-size: 1.8rem; border-bottom: 2px solid #d0d7de; padding-bottom: .4rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .25rem; }
ul.facts { list-style: none; padding: 0; }
ul.facts li { margin: .15rem 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .4rem 0 1.2rem; font-size: 14px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; color: #57606a; }
th, td { border: 1px solid #d0d7de; padding: .3rem .7rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 14px; margin-top: .3rem; }
"""


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<section>\n<h2>{html.escape(section.title)}</h2>")
        body += [_html_block(block) for block in section.blocks]
        body.append("</section>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Facts):
        items = "".join(f"<li><b>{html.escape(label)}:</b> {html.escape(value)}</li>" for label, value in block.items)
        return f'<ul class="facts">{items}</ul>'
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Fragment):
        return block.html
    encoded = base64.b64encode(block.path.read_bytes()).decode("ascii")
    caption = html.escape(block.caption)
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{caption}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _html_table(table: Table) -> str:
    numeric = _numeric_columns(table)
    parts = ["<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header) + "</tr>")
    for row in table.rows:
        cells = (
            f'<td class="num">{html.escape(c)}</td>' if right else f"<td>{html.escape(c)}</td>"
            for c, right in zip(row, numeric, strict=True)
        )
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)
