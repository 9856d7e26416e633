"""What answers requests: the run's model through the same Predictor `forgeml predict` uses, as the
variant `forgeml compress` selected: an ONNX file (onnxruntime), a distilled or pruned model, PyTorch
int8, or the trained model itself. A language model is served by `GenerativeRuntime` instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from forgeml.api import Predictor
from forgeml.encryption import plaintext_view
from forgeml.errors import ForgeError
from forgeml.workspace import MANIFEST, RunDir, read_json

# Where the run's own exports are, for comparisons written before entries named their files.
COMPARISON = "compress/compression.json"
ONNX_FILES = {"onnx_int8": "export/model.int8.onnx", "onnx_fp32": "export/model.onnx"}
PARITY = "export/parity.json"
# Largest share of padding tokens in one model call: on the SST-2 model in int8, a call on rows of similar
# lengths costs 5 ms per row, one on 8 rows of scattered lengths 8 ms per row, one row alone 7 ms.
MAX_PADDING = 0.25


class ModelRuntime:
    """A loaded model plus its name and version; `predict` takes raw inputs as `Predictor.predict` does."""

    def __init__(self, run_dir: str | Path | Predictor, engine: str | None = None, workers: int | None = None):
        """`engine`: auto (the variant `forgeml compress` selected), onnx (the int8 export), onnx_fp32 or
        pytorch; None: the run's `serve.engine`. `workers`: batches scored at once (None: the run's
        `serve.workers`, else one per core for ONNX and one for PyTorch)."""
        self.predictor = predictor = run_dir if isinstance(run_dir, Predictor) else Predictor(run_dir)
        run = predictor.run
        predictor.refuse("serve")  # e.g. a generator answers no requests (forgeml generate draws)
        if getattr(predictor.task, "target", None) is None:
            raise ForgeError(
                f"serve: {run.path} is a {predictor.task.name} run, a pre-trained encoder with nothing to answer: "
                f"fine-tune it for a task first (model.backbone: {run.path})"
            )
        engine = engine or self.predictor.config.serve.engine
        self._workers = workers or self.predictor.config.serve.workers
        self.workers = self._workers or 1
        self.name, self.version = run.name, run.id
        self.engine = "pytorch"
        if engine in ("auto", "onnx", "onnx_fp32"):
            chosen = _variant_to_serve(run.path, engine)
            if chosen is not None:
                self._load_variant(run.path, chosen)
        self.input_columns = list(self.predictor.input_columns)
        self.classes = list(getattr(self.predictor.task.target, "classes", []))
        task = self.predictor.task  # an ensemble reads text but has no one model's words to attribute
        self.explainable = bool(getattr(task, "text_columns", None)) and getattr(task, "explainable", True)
        # An image model takes pictures (decoded by the app before batching); None for text and tables.
        shape = getattr(self.predictor.task, "image_shape", None)
        self.image_shape: tuple[int, ...] | None = tuple(shape) if shape else None

    def _load_variant(self, run_dir: Path, chosen: dict[str, Any]) -> None:
        """Swap in the chosen variant, checking (and for an encrypted run, decrypting) only its own files."""
        name = chosen["name"]
        if name == "pytorch_fp32":
            return
        if name == "pytorch_int8":  # made at load time, as compress made it (never saved)
            from forgeml.compress.variants import pytorch_int8

            self.predictor.model = pytorch_int8(self.predictor.model)
            self.engine = "pytorch (pytorch_int8)"
            return
        relative = chosen.get("file") or ONNX_FILES.get(name)
        if relative is None:
            return
        needed = (relative, f"{chosen['source']}/") if chosen.get("source") else (relative,)
        if chosen.get("forced") == "onnx":  # asked for by name: it must have passed its parity check
            needed += (PARITY,)
        # An encrypted run's files are decrypted into a private folder just long enough to load them.
        with plaintext_view(run_dir, only=(MANIFEST, *needed)) as plain:
            if not (plain / relative).exists():
                return
            for under in needed:  # artefacts like the others: checked before use
                RunDir(plain).verify(under)
            if PARITY in needed:
                _refuse_failed_int8(plain / PARITY)
            if chosen.get("source"):  # a student or a pruned model: explanations come from its PyTorch weights
                from forgeml.tasks import load_task

                self.predictor.torch_model = load_task(plain / chosen["source"])[1].eval()
            if relative.endswith(".onnx"):
                import torch

                from forgeml.export import OnnxModel

                # One batch per core, each on a single-threaded session: splitting the small matrix multiplies
                # of one request's batch across cores costs more in synchronisation than it gains.
                cores = torch.get_num_threads()
                self.workers = self._workers or cores
                self.predictor.model = OnnxModel(plain / relative, threads=max(1, cores // self.workers))
                self.engine = f"onnxruntime ({name})"
            else:
                self.predictor.model = self.predictor.torch_model
                self.engine = f"pytorch ({name})"

    @property
    def explains_with_the_predicting_model(self) -> bool:
        """Whether explanations run on the very module that answers predictions (PyTorch engines)."""
        return self.predictor.model is self.predictor.torch_model

    def predict(self, inputs: list[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        # A micro-batch holds requests of scattered lengths: split it rather than pad the short ones a lot.
        return self.predictor.predict(inputs, batch_size=batch_size, max_padding=MAX_PADDING)

    def explain(self, inputs: list[Any], steps: int = 20) -> list[dict[str, Any]]:
        """Word attributions from the PyTorch model (gradients), whichever engine answers predictions."""
        return [explanation.to_dict() for explanation in self.predictor.explain(inputs, steps)]

    def storable(self, inputs: list[Any]) -> list[Any]:
        """Inputs as they may be kept in the database: PII redacted when the run redacts it for training.

        Every text of the request goes through one `redact_texts` call (and one NER batch), not one each.
        """
        if self.image_shape is not None:  # decoded pixels are kept as PNG (as sent, when they are text)
            from forgeml.serve.images import png_base64

            return [png_base64(image) if isinstance(image, np.ndarray) else image for image in inputs]
        pii = self.predictor.config.data.pii
        if not (pii.redact and getattr(self.predictor.task, "text_columns", None)):
            return inputs
        from forgeml.data.pii import find_names, redact_texts

        texts = [value for record in inputs for value in record_values(record) if isinstance(value, str)]
        names = find_names(texts, pii.ner_model) if pii.ner_model else None
        redacted = iter(redact_texts(texts, pii.types, pii.style, names)[0])

        def swap(value: Any) -> Any:
            return next(redacted) if isinstance(value, str) else value

        stored = []
        for record in inputs:
            if isinstance(record, dict):
                stored.append({key: swap(value) for key, value in record.items()})
            elif isinstance(record, list):
                stored.append([swap(value) for value in record])
            else:
                stored.append(swap(record))
        return stored

    def warm_up(self) -> None:
        """One call through every layer before reporting ready, so the first request is not the slow one."""
        if self.image_shape is not None:
            example: Any = np.zeros(self.image_shape, dtype=np.uint8)
        elif getattr(self.predictor.task, "text_columns", None):
            example = "warm-up" if len(self.input_columns) == 1 else dict.fromkeys(self.input_columns, "warm-up")
        else:  # tabular: missing values take what training filled them with
            example = dict.fromkeys(self.input_columns, None)
        self.predict([example])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.predictor.task.name,
            "engine": self.engine,
            "workers": self.workers,
            "inputs": self.input_columns,
            "labels": self.classes,
            "explainable": self.explainable,
            "image_shape": list(self.image_shape) if self.image_shape else None,
        }


class GenerativeRuntime:
    """A language-modeling or instruction-tuning run: its causal LM, tokenizer and prompt rendering."""

    generates = True

    def __init__(self, predictor: Predictor, engine: str | None = None):
        """`engine`: auto (the variant `forgeml compress` selected), onnx (the int8 export), onnx_fp32 or
        pytorch; None: the run's `serve.engine`."""
        self.predictor = predictor
        self.model, self.tokenizer = predictor._language_model()
        self.name, self.version = predictor.run.name, predictor.run.id
        self.engine = "pytorch"
        self._load_variant(engine or predictor.config.serve.engine)
        self.chat_template = "the run's template" if getattr(predictor.task, "prompt_ids", None) else None
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None):
            self.chat_template = "the tokenizer's chat template"

    def _load_variant(self, engine: str) -> None:
        """Swap in an ONNX Runtime export (hash-checked) when `engine` asks for one or compress selected one."""
        if engine == "pytorch":
            return
        from forgeml.compress.language_model import ONNX_FILES

        run_dir = self.predictor.run.path
        chosen = _variant_to_serve(run_dir, engine)
        if chosen is None or chosen["name"] == "pytorch_fp32":
            return
        relative = ONNX_FILES[chosen["name"]]
        with plaintext_view(run_dir, only=(MANIFEST, relative)) as plain:
            if not (plain / relative).is_file():
                raise ForgeError(f"serve: --engine {engine}: {relative} is missing; run forgeml compress {run_dir}")
            RunDir(plain).verify(relative)
            from forgeml.models.onnx_lm import OnnxCausalLM

            self.model = OnnxCausalLM(plain / relative, self.model)
        self.engine = f"onnxruntime ({chosen['name']})"

    def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's token ids: text as the tokenizer encodes it (special tokens included), or ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if not all(0 <= token < len(self.tokenizer) for token in prompt):
            raise ForgeError(f"prompt: token ids must be in [0, {len(self.tokenizer) - 1}]")
        return list(prompt)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's token ids, rendered as in training (instruction tuning) or by the tokenizer's template."""
        render = getattr(self.predictor.task, "prompt_ids", None)
        if render is not None:
            return render(messages)
        if self.chat_template is None:
            raise ForgeError(
                f"messages: {self.name} is a {self.predictor.task.name} model without a chat template; it continues "
                "text: use /v1/completions with a prompt"
            )
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)

    def storable(self, prompt: Any) -> Any:
        """A prompt (text or messages) as it may be kept in the database: PII redacted when the run redacts."""
        pii = self.predictor.config.data.pii
        if not pii.redact:
            return prompt
        from forgeml.data.pii import redact_texts

        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
        redacted = redact_texts(texts, pii.types, pii.style)[0]
        if isinstance(prompt, str):
            return redacted[0]
        return [{**m, "content": text} for m, text in zip(prompt, redacted, strict=True)]

    def describe(self) -> dict[str, Any]:
        from forgeml.generate import context_length

        return {
            "name": self.name,
            "version": self.version,
            "task": self.predictor.task.name,
            "engine": self.engine,
            "context": context_length(self.model),
            "chat": self.chat_template is not None,
        }


def load_runtime(
    run_dir: str | Path, engine: str | None = None, workers: int | None = None
) -> ModelRuntime | GenerativeRuntime:
    """The runtime that serves `run_dir`: a language model's, or a predictor's."""
    predictor = Predictor(run_dir)
    if predictor.generates:
        return GenerativeRuntime(predictor, engine)
    return ModelRuntime(predictor, engine, workers)


def record_values(record: Any) -> list[Any]:
    """A request record's values in order: a mapping's values, a pair's texts, or the text itself."""
    if isinstance(record, dict):
        return list(record.values())
    return list(record) if isinstance(record, list) else [record]


def _variant_to_serve(run_dir: Path, engine: str) -> dict[str, Any] | None:
    """The comparison entry of what to serve: the run's own export for engine onnx or onnx_fp32, else the
    variant `forgeml compress` selected (None when it never ran)."""
    if engine != "auto":
        return {"name": "onnx_int8" if engine == "onnx" else "onnx_fp32", "forced": engine}
    with plaintext_view(run_dir, only=(MANIFEST, COMPARISON)) as plain:
        if not (plain / COMPARISON).is_file():
            return None
        RunDir(plain).verify(COMPARISON)  # it decides what answers requests: checked like the model
        comparison = read_json(plain / COMPARISON)
    return next(entry for entry in comparison["variants"] if entry["name"] == comparison["selected"])


def _refuse_failed_int8(parity_file: Path) -> None:
    """`--engine onnx` on an int8 export that gives PyTorch's label too rarely is refused, not served."""
    from forgeml.export import int8_finding

    finding = int8_finding(read_json(parity_file)) if parity_file.is_file() else None
    if finding:
        raise ForgeError(f"serve: --engine onnx: {finding}")
