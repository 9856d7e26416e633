"""The public Python API. The CLI only parses arguments and calls these functions.

import forgeml
result = forgeml.run("examples/sst2.yaml", overrides=["train.epochs=1"])
model = forgeml.load(result.run_dir)
model.predict(["a gripping, beautiful film"])
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

from forgeml import _API
from forgeml.config import ForgeConfig, load_config
from forgeml.data.clean import clean, normalize_text
from forgeml.data.io import column, read_table, replace_column
from forgeml.data.prepare import read_split, redact_pii
from forgeml.encryption import MODEL_FILES, on_plaintext, plaintext_view, refuse_encrypted, wants_encryption
from forgeml.errors import ConfigError, ForgeError
from forgeml.evaluate.outputs import model_outputs
from forgeml.pipeline import RunResult, dataset_from_rows, evaluate_split, execute, rerun_config
from forgeml.report.card import write_card
from forgeml.store import Store, database_url
from forgeml.tasks import load_task
from forgeml.workspace import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    resolve_run_path,
    workspace_root,
)

if TYPE_CHECKING:  # generation loads only for language models
    from forgeml.generate import GenerationOptions

__all__ = list(_API)  # one list: the package exposes these lazily


def run(
    config: str | Path | dict | ForgeConfig,
    overrides: list[str] | tuple[str, ...] = (),
    workspace: str | Path | None = None,
    quiet: bool = True,
    encrypt: bool | None = None,
) -> RunResult:
    """Train and evaluate from a config file (or dict); everything lands in `runs/<name>/<run-id>/`.

    `encrypt` (default: $FORGEML_ENCRYPT) encrypts the finished run with the key in $FORGEML_KEY.
    """
    resolved = config if isinstance(config, ForgeConfig) else load_config(config, overrides)
    encrypt = wants_encryption(encrypt)  # a missing key fails now, not after training
    return execute(resolved, workspace_root(workspace), show_progress=not quiet, encrypt=encrypt)


def resume(
    run_dir: str | Path, workspace: str | Path | None = None, quiet: bool = True, encrypt: bool | None = None
) -> RunResult:
    """Continue an interrupted run from its last checkpoint, with the config it started with."""
    refuse_encrypted(run_dir, "resume")
    run_path = RunDir.open(run_dir).path
    root = workspace_root(workspace) if workspace else run_path.parent.parent.parent
    encrypt = wants_encryption(encrypt)
    return execute(rerun_config(RunDir(run_path)), root, show_progress=not quiet, resume_dir=run_path, encrypt=encrypt)


def ensemble(
    runs: list[str | Path],
    method: str = "mean",
    name: str | None = None,
    workspace: str | Path | None = None,
    quiet: bool = True,
) -> RunResult:
    """A new run that combines finished runs of one task, label set and data: `mean` (average probabilities
    or values), `vote` (majority label) or `stack` (a logistic or ridge regression on the members' validation
    outputs). It is evaluated on the members' splits; its card puts the members' metrics beside its own.

    The config is the first member's with an `ensemble:` section (and no audits or compression: run
    `forgeml audit` / `forgeml compress` on the result); the run lands in the first member's workspace
    unless `workspace` says otherwise.
    """
    if not runs:
        raise ConfigError("ensemble: name at least 2 runs to combine")
    first = resolve_run_path(runs[0])
    config = rerun_config(RunDir.open(first)).model_dump(mode="json")
    config |= {
        "name": name or f"{config['name']}-ensemble",
        "ensemble": {"members": [str(resolve_run_path(run)) for run in runs], "method": method},
        "audit": None,
        "compress": None,
        "tune": None,
    }
    config["evaluate"]["cross_validation"] = None
    root = workspace_root(workspace) if workspace else first.parent.parent.parent
    return execute(load_config(config), root, show_progress=not quiet)


class Predictor:
    """A trained model loaded from a run directory (every artefact checked against the manifest)."""

    def __init__(self, run_dir: str | Path):
        run_dir = resolve_run_path(run_dir)  # runs/NAME/latest: the newest finished run of that name
        # An encrypted run is decrypted into a private temporary folder, deleted once the model is in memory.
        with plaintext_view(run_dir, only=MODEL_FILES) as plain:
            self.run = RunDir.open(plain)
            self.run.verify("model/")
            self.task, self.model = load_task(self.run.model)
            self.model.eval()
            self.torch_model = self.model  # explanations need gradients, whatever engine `model` becomes
            self.config = rerun_config(self.run)
            # Per-group decision thresholds fitted by the fairness audit, applied when inputs carry the column.
            thresholds = self.run.model / "fairness_thresholds.json"
            self.thresholds: dict[str, Any] | None = read_json(thresholds) if thresholds.is_file() else None
        self.run = RunDir(run_dir)

    @property
    def input_columns(self) -> list[str]:
        return getattr(self.task, "text_columns", None) or self.task.features

    def predict(
        self,
        inputs: list[Any] | Dataset,
        batch_size: int = 64,
        show_progress: bool = False,
        max_padding: float | None = None,
    ) -> list[dict[str, Any]]:
        """Answers for raw inputs: strings, (premise, hypothesis) pairs, dicts of columns, or a Dataset; for an
        image model, image files (paths or bytes) or H x W x C pixel arrays, each alone or as {'image': ...}.

        Each answer is {'label', 'probabilities': {class: p}} or {'value'}. When the fairness audit
        fitted per-group thresholds, inputs that carry the group column are labelled by them.

        A token-classification model answers each sentence (a string, or a list of words) with its entities:
        a list of {'entity', 'text', 'start', 'end', 'score', 'words'}, character offsets into the string
        (into the words joined by single spaces for a list of words), `words` the [first, last + 1] word indices.
        """
        self.refuse("predict")
        if self.task.name == "token-classification":
            sentences = inputs[self.task.text_columns[0]] if isinstance(inputs, Dataset) else list(inputs)
            return self.task.tag(self.model, sentences, batch_size)
        if not isinstance(inputs, Dataset) and hasattr(self.task, "input_rows"):  # images: decoded by the task
            inputs = self.task.input_rows(list(inputs))
        elif not isinstance(inputs, Dataset):
            rows = list(inputs)
            columns = list(self.input_columns)
            group = self.thresholds["column"] if self.thresholds else None
            if group and rows and all(isinstance(row, dict) and group in row for row in rows):
                columns.append(group)  # lets the fairness thresholds apply
            inputs = dataset_from_rows(rows, columns)
        answers = self._answers(inputs, batch_size, show_progress, max_padding)
        if "probabilities" in answers:
            classes = self.task.target.classes
            return [
                {"label": label, "probabilities": dict(zip(classes, map(float, probs), strict=True))}
                for label, probs in zip(answers["label"], answers["probabilities"], strict=True)
            ]
        return [{"value": float(v)} for v in answers["value"]]

    def generate(
        self, prompt: str | list[dict[str, str]], options: GenerationOptions | None = None, **settings: Any
    ) -> str:
        """The continuation of `prompt` from a language-modeling run, e.g.
        `generate("ROMEO:", max_new_tokens=100, temperature=0.8, seed=1)`; settings as `GenerationOptions`.

        An instruction-tuned model answers: the prompt is one user turn (or a list of {role, content}
        messages), rendered with the run's template as in training."""
        from forgeml.generate import generate

        model, tokenizer = self._language_model()
        return generate(model, tokenizer, self._prompt(prompt), _options(options, settings)).text

    def stream(
        self, prompt: str | list[dict[str, str]], options: GenerationOptions | None = None, **settings: Any
    ) -> Iterator[str]:
        """The continuation of `prompt`, piece by piece as it is generated (same settings as `generate`)."""
        from forgeml.generate import stream

        model, tokenizer = self._language_model()
        return stream(model, tokenizer, self._prompt(prompt), _options(options, settings))

    def _prompt(self, prompt: str | list[dict[str, str]]) -> str | list[int]:
        """What the model is given: the text as it is, or for an instruction-tuned model the rendered request."""
        render = getattr(self.task, "prompt_ids", None)
        if render is None:
            if not isinstance(prompt, str):
                raise ForgeError("prompt: a language model continues text; give a string, not messages")
            return prompt
        if isinstance(prompt, str) and not prompt:
            raise ConfigError("prompt: empty; give at least one character")
        return render(prompt)

    def perplexity(self, texts: list[str], stride: int | None = None) -> dict[str, Any]:
        """Loss and perplexity of the model on `texts` (longer ones scored with a sliding window)."""
        from forgeml.generate import perplexity

        return perplexity(*self._language_model(), texts, stride=stride)

    def paired_scores(self, dataset: Dataset) -> list[dict[str, float]]:
        """A language model's summed loss (nats) and characters per piece of a prepared split's text (per
        example for instruction data): what the promotion gate pairs between two models."""
        self._language_model()
        nll, characters = self.task.paired_scores(self.model, dataset)
        return [{"nll": float(n), "characters": float(c)} for n, c in zip(nll, characters, strict=True)]

    @property
    def generates(self) -> bool:
        """Whether this is a language model (it generates text rather than predicting a label or value)."""
        return getattr(self.task, "generates", False)

    @property
    def generates_images(self) -> bool:
        """Whether this is an image-generation run (a VAE or a GAN: it draws images, it predicts nothing)."""
        return self.task.name == "image-generation"

    def sample_images(self, num_samples: int = 64, seed: int = 0) -> np.ndarray:
        """`num_samples` new images (N x C x H x W uint8) from an image-generation run; a seed always gives the
        same images."""
        if not self.generates_images:
            raise ForgeError(f"{self.run.path}: a {self.task.name} run does not generate images")
        return self.task.sample_images(self.model, num_samples, seed)

    def write_samples(self, output: str | Path, num_samples: int = 64, seed: int = 0) -> Path:
        """`sample_images` tiled into one PNG file (see `generate_images`)."""
        from forgeml.evaluate.generated_images import write_grid

        output = Path(output)
        if output.suffix.lower() != ".png":
            raise ConfigError(f"output: {output} must be a .png file")
        return write_grid(self.sample_images(num_samples, seed), output)

    def refuse(self, action: str) -> None:
        """Raise a ForgeError saying what to do instead when the run's task does not offer `action` (a task lists
        those in `refused_actions`, with the alternative in `refusal_hint`): a generator is not audited,
        exported or served; a tagger is not (yet) exported or served."""
        if action in getattr(self.task, "refused_actions", ()):
            raise ForgeError(
                f"{self.run.path}: {action} is not available for {self.task.name} runs; {self.task.refusal_hint}"
            )

    def _require_predictions(self) -> None:
        self.refuse("predict")
        if self.generates:
            raise ForgeError(
                f"{self.run.path}: a language model generates text rather than predicting: use forgeml "
                "generate RUN PROMPT (or Predictor.generate), or forgeml evaluate RUN --data FILE for perplexity"
            )
        if getattr(self.task, "target", None) is None:
            raise ForgeError(
                f"{self.run.path}: a {self.task.name} run is a pre-trained encoder, not a predictor: fine-tune it "
                f"for a text task with model.backbone: {self.run.path}"
            )

    def _language_model(self) -> tuple[Any, Any]:
        if not self.generates:
            raise ForgeError(f"{self.run.path}: a {self.task.name} model predicts, it does not generate text")
        return self.model.lm, self.task.tokenizer

    def prepare_inputs(self, dataset: Dataset) -> Dataset:
        """The text transforms training applied (Unicode normalisation, PII redaction), applied to inputs."""
        text_columns = getattr(self.task, "text_columns", [])
        if text_columns and self.config.data.clean.normalize:
            for name in text_columns:
                dataset = replace_column(dataset, name, [normalize_text(v) for v in column(dataset, name)])
        pii = self.config.data.pii
        if text_columns and pii.redact:  # the model never saw personal data; it should not see it now either
            dataset, _ = redact_pii(dataset, text_columns, pii)
        return dataset

    def explain(self, inputs: list[Any], steps: int = 20) -> list[Any]:
        """Word attributions (Captum integrated gradients) for texts or (premise, hypothesis) pairs, as the
        model sees them (normalised, PII redacted); for an image run, pixel attributions for image files, their
        bytes or pixel arrays (`trust.image_explain.ImageExplanation`; `plot_saliency` draws them)."""
        from forgeml.trust.explain import explain_texts

        self.refuse("explain")
        if self.task.name == "image-classification":
            return self._explain_images(inputs, steps)
        columns = getattr(self.task, "text_columns", None)
        if not columns:
            raise ForgeError(
                "explain: word attributions are for text models; tabular runs get them from `forgeml audit`"
            )
        prepared = self.prepare_inputs(dataset_from_rows(list(inputs), columns))
        texts = [column(prepared, name) for name in columns]
        items = texts[0] if len(columns) == 1 else list(zip(*texts, strict=True))
        return explain_texts(self.task, self.torch_model, items, steps=steps)

    def _explain_images(self, inputs: list[Any], steps: int) -> list[Any]:
        from forgeml.data.images import IMAGE_COLUMN
        from forgeml.trust.image_explain import explain_images

        if not inputs:
            raise ForgeError("explain: give at least one image (a file, its bytes or an array of pixels)")
        # Files by name (a Path is not a Dataset value), bytes as they are, arrays as nested lists.
        values = [str(v) if isinstance(v, Path) else v.tolist() if hasattr(v, "tolist") else v for v in inputs]
        rows = dataset_from_rows([{IMAGE_COLUMN: value} for value in values], [IMAGE_COLUMN])
        encoded = self.task.encode(rows, "explain", with_targets=False)
        sources = [
            str(value) if isinstance(value, str | Path) else f"image {index + 1}" for index, value in enumerate(inputs)
        ]
        return explain_images(self.torch_model, encoded.inputs["pixels"], self.task.target.classes, steps, sources)

    def _answers(
        self, dataset: Dataset, batch_size: int, show_progress: bool, max_padding: float | None = None
    ) -> dict[str, Any]:
        self._require_predictions()
        dataset = self.prepare_inputs(dataset)
        encoded = self.task.encode(dataset, "input", with_targets=False)
        outputs, _ = model_outputs(
            self.model, encoded, batch_size, show_progress=show_progress, max_padding=max_padding
        )
        answers = self.task.predictions(outputs)
        if self.thresholds and self.thresholds["column"] in dataset.column_names:
            answers["label"] = self._fair_labels(answers, column(dataset, self.thresholds["column"]))
        return answers

    def _fair_labels(self, answers: dict[str, Any], groups: list) -> list[str]:
        """Labels decided by the group's threshold instead of the arg-max (binary tasks only)."""
        from forgeml.trust.fairness import apply_thresholds

        rule, classes = self.thresholds, self.task.target.classes
        index = classes.index(rule["positive_label"])
        decisions = apply_thresholds(rule, answers["probabilities"][:, index], groups)
        return [classes[index] if decided else classes[1 - index] for decided in decisions]


def _options(options: GenerationOptions | None, settings: dict[str, Any]) -> GenerationOptions:
    from forgeml.generate import GenerationOptions

    if options is not None and settings:
        raise ForgeError("give generation settings either as options or as keywords, not both")
    return options or GenerationOptions(**settings)


def generate_images(run_dir: str | Path, num_samples: int, output: str | Path, seed: int = 0) -> Path:
    """Write `num_samples` images from an image-generation run as one PNG grid (rows of ceil(sqrt(N)) images,
    2 white pixels apart, at the images' own size); the same seed writes the same pixels."""
    return Predictor(run_dir).write_samples(output, num_samples, seed)


def load(run_dir: str | Path) -> Predictor:
    """Load a finished run's model for prediction."""
    return Predictor(run_dir)


@on_plaintext(writes=True)
def evaluate(run_dir: str | Path, data: str | Path, batch_size: int = 64) -> dict[str, Any]:
    """Re-evaluate a saved run on any labelled file with the training columns.

    The file gets the run's cleaning and PII redaction (the model never saw personal data, so it is
    scored without it too); metrics and plots go to `evaluations/<file>-<time>/`.
    """
    predictor = Predictor(run_dir)
    config = predictor.config
    task = predictor.task
    if config.task == "language-modeling":  # loss and perplexity of the file's documents, however long
        from forgeml.data.corpus import read_documents

        scores = predictor.perplexity(read_documents(Path(data), config.data.text, config.data.format))
        return {key: value for key, value in scores.items() if key != "texts"}
    if task.target is None:  # instruction tuning, masked LM: the run's own loss (and answers) on the file
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        folder = predictor.run.path / "evaluations" / f"{Path(data).stem}-{stamp}"
        folder.mkdir(parents=True, exist_ok=True)
        dataset = task.read_file(Path(data), config)
        metrics = evaluate_split(task, predictor.model, task.encode(dataset, str(data)), batch_size, folder)
        generation = config.evaluate.generation
        if generation and generation.enabled and hasattr(task, "evaluate_generations"):
            metrics |= task.evaluate_generations(predictor.model, dataset, generation.model_dump(), 0, folder)
        atomic_write_json(folder / "metrics.json", {"data": str(Path(data).resolve()), **metrics})
        return metrics
    dataset = read_split(Path(data), config, predictor.input_columns, split="test")  # an npz's x_test, else x
    text_columns = getattr(predictor.task, "text_columns", [])
    dataset, cleaning = clean(dataset, text_columns, predictor.input_columns, config.data.label, config.data.clean)
    redacted: dict[str, int] = {}
    if text_columns and config.data.pii.redact:
        dataset, redacted = redact_pii(dataset, text_columns, config.data.pii)
    encoded = predictor.task.encode(dataset, str(data))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = predictor.run.path / "evaluations" / f"{Path(data).stem}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_split(predictor.task, predictor.model, encoded, batch_size, folder)
    facts = {"data": str(Path(data).resolve()), "cleaning": cleaning, "pii_redacted": redacted}
    atomic_write_json(folder / "metrics.json", {**facts, **metrics})
    return metrics


def predict(
    run_dir: str | Path, data: str | Path, output: str | Path, batch_size: int = 64, show_progress: bool = False
) -> Path:
    """Predict every row of a file; write its rows plus `prediction` (and `p_<class>`) to CSV or JSONL (for a
    token-classification run, JSONL only: each sentence with its entities). See `predict_file`."""
    output = Path(output)
    predictor = Predictor(run_dir)
    jsonl = output.suffix.lower() in (".jsonl", ".ndjson")
    if predictor.config.task == "token-classification" and not jsonl:  # said before any sentence is tagged
        raise ForgeError(f"--output {output}: entities are lists per sentence; write JSON lines (a .jsonl file)")
    rows = predict_file(predictor, data, batch_size, show_progress)
    if jsonl:
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        from io import StringIO

        buffer = StringIO()
        names = list(rows[0]) if rows else ["prediction"]
        writer = csv.DictWriter(buffer, fieldnames=names, delimiter="\t" if output.suffix.lower() == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
        body = buffer.getvalue()
    atomic_write_bytes(output, body.encode("utf-8"))
    return output


def predict_file(
    run_dir: str | Path | Predictor, data: str | Path, batch_size: int = 64, show_progress: bool = False
) -> list[dict[str, Any]]:
    """Every row of a file (a table; for images an .npz, a folder or a table of image files, each named by its
    `source`) with its `prediction` (and `p_<class>` probabilities); for a token-classification run, each
    sentence of a text file (one a line, or JSON lines with a tokens list) with its `entities`."""
    predictor = run_dir if isinstance(run_dir, Predictor) else Predictor(run_dir)
    if predictor.config.task == "token-classification":
        return _predict_entities(predictor, Path(data), batch_size)
    predictor._require_predictions()
    if predictor.config.task == "image-classification":  # an npz, a folder of images or a table of image files
        from forgeml.data.images import PIXEL_COLUMNS, read_images

        height, width, _ = predictor.task.image_shape
        size = height if height == width else None  # files of another size are brought to the model's
        dataset = read_images(Path(data), predictor.config.data.label, "test", predictor.config.data.image, size)
        dropped = list(PIXEL_COLUMNS)  # pixels stay out of the output; `source` names each image
    else:
        dataset, dropped = read_table(Path(data), predictor.config.data.format), []
    answers = predictor._answers(dataset, batch_size, show_progress)
    columns = dataset.remove_columns(dropped).to_dict()
    if "probabilities" in answers:
        columns["prediction"] = answers["label"]
        for index, name in enumerate(predictor.task.target.classes):
            columns[f"p_{name}"] = np.round(answers["probabilities"][:, index], 6).tolist()
    else:
        columns["prediction"] = answers["value"]
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _predict_entities(predictor: Predictor, data: Path, batch_size: int) -> list[dict[str, Any]]:
    """Entities of every sentence of `data` (a text file, one sentence a line; or JSON lines with a tokens list
    or a `text` string): the sentence (or its words) and its entities."""
    from forgeml.data.tagged import read_sentences

    sentences = read_sentences(data, predictor.config.data.tokens)
    found = predictor.predict(sentences, batch_size)
    return [
        {"text" if isinstance(sentence, str) else "tokens": sentence, "entities": entities}
        for sentence, entities in zip(sentences, found, strict=True)
    ]


@on_plaintext(writes=True)
def audit(
    run_dir: str | Path,
    data: str | Path | None = None,
    sensitive: list[str] | None = None,
    baseline: str | Path | None = None,
) -> dict[str, Any]:
    """(Re)run the trust audits of a finished run; results go to trust/ and the model card.

    With `data`, fairness, identity swaps and robustness run on that file (the input columns plus the
    sensitive ones; the label column is optional) instead of the run's own test split. Without labels
    they report what needs none (selection rates, flip rates) and list what was skipped. Membership
    inference and explanations keep the run's own splits, and fitted fairness thresholds are left as
    they are. `sensitive` overrides `data.sensitive`; `baseline` (another run of the same task, e.g.
    without adversarial training) gets the same robustness probes for a before/after table. Uses the
    config's `audit:` section, or every audit's defaults when the run had none.
    """
    from forgeml.config import AuditConfig
    from forgeml.data.prepare import prepare, read_audited_file
    from forgeml.trust.audit import run_audits

    predictor = Predictor(run_dir)
    predictor.refuse("audit")
    config = predictor.config.model_copy(deep=True)
    if config.audit is None:
        config.audit = AuditConfig()
    if sensitive is not None:
        config.data.sensitive = list(sensitive)
    if baseline is not None:
        config.audit.robustness.baseline = str(Path(baseline).resolve())
    external = None
    if data is not None and config.task == "image-classification":  # an npz, a folder or a table of image files
        from forgeml.data.images import read_images

        height, width, _ = predictor.task.image_shape
        size = height if height == width else None  # files of another size are brought to the model's
        external = read_images(Path(data), config.data.label, "test", config.data.image, size)
        splits = prepare(config).splits
    elif data is not None:
        classes = getattr(predictor.task.target, "classes", None)
        external = read_audited_file(Path(data), config, predictor.input_columns, classes)  # its errors come first
        # The run's own splits, as it was trained on them, for membership inference and explanations; the
        # sensitive columns need only be in the audited file.
        own = config.model_copy(deep=True)
        own.data.sensitive = []
        splits = prepare(own).splits
    else:
        splits = prepare(config).splits
    encoded = {name: predictor.task.encode(split, name) for name, split in splits.items() if split is not None}
    headline = run_audits(
        config,
        predictor.task,
        predictor.model,
        splits,
        encoded,
        predictor.run.trust,
        predictor.run.model,
        external=external,
        external_name=Path(data).name if data is not None else "the external file",
    )
    _record_and_report(
        predictor.run, [*predictor.run.trust.rglob("*"), *predictor.run.model.glob("fairness_thresholds.json")]
    )
    return headline


def explain(run_dir: str | Path, inputs: list[Any], steps: int = 20) -> list[Any]:
    """Word attributions (Captum integrated gradients) for texts or (premise, hypothesis) pairs; for an image
    run, pixel attributions (`ImageExplanation`) for image files, their bytes or pixel arrays."""
    return Predictor(run_dir).explain(inputs, steps)


@on_plaintext(writes=True)
def export(
    run_dir: str | Path, formats: list[str] | tuple[str, ...] = ("onnx",), data: str | Path | None = None
) -> dict[str, Any]:
    """Export a run's model to `export/` (ONNX fp32 + int8, optionally TorchScript) and check parity.

    The check runs on up to 2,000 rows of `data` (a file with the input columns), else of the run's
    test split (or validation); the report is `export/parity.json`. Raises ForgeError when a format asked
    for disagrees with PyTorch beyond the tolerance; an int8 file that gives another label too often is
    marked in the report (`int8_passed`), not raised, and is never served.
    """
    from forgeml.data.prepare import prepare, read_audited_file
    from forgeml.export import export_model, parity_sample

    predictor = Predictor(run_dir)
    predictor.refuse("export")
    task = predictor.task
    splits = prepare(predictor.config).splits if data is None or _calibrates_int8(task) else {}
    if data is not None:  # prepared as the run's own rows were: cleaning and PII redaction, labels optional
        rows = read_audited_file(Path(data), predictor.config, predictor.input_columns)
    else:
        rows = _held_out(splits)[1]
    encoded = task.encode(parity_sample(rows), "export", with_targets=False)
    folder = predictor.run.path / "export"
    try:
        return export_model(task, predictor.model, encoded, folder, tuple(formats), _calibration(task, splits))
    finally:  # a failed check is recorded too: the card says which export is off, and by how much
        _record_and_report(predictor.run, folder.rglob("*"))


def _calibrates_int8(task: Any) -> bool:
    return bool(getattr(task, "int8_calibration_rows", 0))


def _calibration(task: Any, splits: dict[str, Dataset | None]) -> Any:
    """A seeded sample of training rows that calibrates a static int8 export, for a task whose model is
    quantized that way (a CNN); None for the others, whose int8 scheme needs no calibration."""
    train = splits.get("train")
    if not _calibrates_int8(task) or train is None:
        return None
    count = min(task.int8_calibration_rows, len(train))
    return task.encode(train.shuffle(seed=0).select(range(count)), "train", with_targets=False)


def _held_out(splits: dict[str, Dataset | None]) -> tuple[str, Dataset]:
    """The run's test split (else validation, else train) and its name."""
    name = next(name for name in ("test", "validation", "train") if splits.get(name) is not None)
    return name, splits[name]


def _record_and_report(run: RunDir, written: Iterable[Path]) -> None:
    """Hash files a command (re)wrote into the manifest, then rewrite the card to show them."""
    run.record([path for path in written if path.is_file() and not path.name.startswith(".")])
    report(run.path)


@on_plaintext(writes=True)
def compress(run_dir: str | Path) -> dict[str, Any]:
    """Compare the model with its int8 and ONNX Runtime variants on the test split (config `compress:`).

    Writes `compress/compression.json` (metrics, size, batch-1 latency, batch-32 throughput per
    variant, and the one selected for serving), `compress/frontier.png` and the ONNX files in `export/`.
    """
    from forgeml.compress import compress_model
    from forgeml.config import CompressConfig
    from forgeml.data.prepare import prepare
    from forgeml.export import parity_sample

    predictor = Predictor(run_dir)
    predictor.refuse("compress")
    if predictor.generates:
        return _compress_language_model(predictor)
    splits = prepare(predictor.config).splits
    name, rows = _held_out(splits)
    task = predictor.task
    test = task.encode(rows, name)
    parity_rows = task.encode(parity_sample(rows), name, with_targets=False)
    run = predictor.run
    options = predictor.config.compress or CompressConfig()
    training = None
    if options.distill or options.prune:  # the student and the pruned models learn on the training rows
        validation = splits.get("validation")
        training = (
            task.encode(splits["train"], "train"),
            None if validation is None else task.encode(validation, "validation"),
            predictor.config.train,
        )
    try:
        return compress_model(
            task,
            predictor.model,
            test,
            parity_rows,
            run.path / "compress",
            run.path / "export",
            options,
            training,
            _calibration(task, splits),
        )
    finally:
        _record_and_report(run, [*run.path.glob("compress/**/*"), *run.path.glob("export/**/*")])


def _compress_language_model(predictor: Predictor) -> dict[str, Any]:
    """A language model's variants: PyTorch fp32 against ONNX Runtime fp32 and int8 (see compress/language_model)."""
    from forgeml.compress.language_model import compress_language_model, prompts_from
    from forgeml.tasks import prepare_data

    name, rows = _held_out(prepare_data(predictor.config).splits)
    column = next((c for c in ("prompt", "text") if c in rows.column_names), None)
    texts = [str(text) for text in rows[column][:64]] if column else []
    prompts = [text for text in texts if text.strip()][:8] if column == "prompt" else prompts_from(texts)
    run = predictor.run
    try:
        return compress_language_model(
            predictor.model, predictor.task.tokenizer, predictor.task.encode(rows, name), name, prompts, run.path
        )
    finally:
        _record_and_report(run, [*run.path.glob("compress/**/*"), *run.path.glob("export/**/*")])


@on_plaintext(writes=True)
def report(run_dir: str | Path) -> tuple[Path, Path]:
    """(Re)write card.md and card.html for a run."""
    run = RunDir.open(run_dir)
    written = write_card(run.path)
    run.record(written)
    return written


def runs(workspace: str | Path | None = None, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recorded runs, newest first."""
    return Store(database_url(workspace_root(workspace))).runs(name, limit)


def run_record(run_id: str, workspace: str | Path | None = None) -> dict[str, Any]:
    return Store(database_url(workspace_root(workspace))).run(run_id)


# --- the improvement loop: registry, retraining, promotion, backup ------------------------------------


def register(
    name: str, run_dir: str | Path, alias: str | None = None, workspace: str | Path | None = None, description: str = ""
) -> dict[str, Any]:
    """Register a finished run as the next version of model `name`; with `alias`, also point `name@alias` at
    it (through the promotion gate when the alias is protected). Returns the version record."""
    from forgeml.improve.promote import promote as move_alias
    from forgeml.registry import Registry

    registry = Registry(database_url(workspace_root(workspace)))
    try:
        version = registry.register(name, resolve_run_path(run_dir, workspace), description=description)
    finally:
        registry.close()
    if alias:
        move_alias(name, version["run_path"], alias, workspace=workspace)
    return version


def retrain(name: str, workspace: str | Path | None = None, quiet: bool = True, **options: Any) -> RunResult:
    """A new run of `name@champion`'s config and data plus its served corrections, on the same test split
    (options: alias, since, weight, holdout, overrides; see `forgeml.improve.retrain.retrain`)."""
    from forgeml.improve.retrain import retrain as retrain_model

    return retrain_model(name, workspace=workspace, quiet=quiet, **options)


def tune(
    config: str | Path | dict,
    overrides: list[str] | tuple[str, ...] = (),
    trials: int | None = None,
    workspace: str | Path | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run `trials` trials (default `tune.trials`) of the Optuna study the config's `tune:` section describes
    (joining it if another worker started it) and write its card; returns the study's summary."""
    from forgeml.tuning import run_study

    return run_study(config, overrides, trials, workspace, show_progress=not quiet)


def study(name: str, workspace: str | Path | None = None) -> dict[str, Any]:
    """A study's summary (trials, best trial and its run); writes its card and best.yaml to studies/NAME/."""
    from forgeml.tuning import write_study_card

    return write_study_card(name, workspace)


def compare(champion: str | Path, candidate: str | Path, workspace: str | Path | None = None) -> dict[str, Any]:
    """The promotion gate's report: both models on the candidate's fixed test split (McNemar's exact test or
    a paired bootstrap, plus the fairness/robustness/latency limits); written to the candidate's card."""
    from forgeml.improve.promote import compare as gate_report

    return gate_report(champion, candidate, workspace)


def promote(
    name: str,
    candidate: str | Path,
    alias: str = "champion",
    force: bool = False,
    reason: str = "",
    workspace: str | Path | None = None,
) -> dict[str, Any]:
    """Point `name@alias` at `candidate` (registered first if new); a protected alias only through the gate
    or with `force`. Returns the promotion log entry and the gate report."""
    from forgeml.improve.promote import promote as move_alias

    return move_alias(name, candidate, alias, force=force, reason=reason, workspace=workspace)


def backup(output: str | Path, workspace: str | Path | None = None) -> dict[str, Any]:
    """Write the workspace (runs, corrections, a consistent snapshot of the store) to one verified archive."""
    from forgeml.backup import backup_workspace

    return backup_workspace(workspace_root(workspace), Path(output))


def restore(archive: str | Path, target: str | Path) -> dict[str, Any]:
    """Restore an archive from `backup` into an empty folder; every hash is checked before anything is written."""
    from forgeml.backup import restore_workspace

    return restore_workspace(Path(archive), Path(target))
