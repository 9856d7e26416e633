"""What answers requests: the run's model through the same Predictor `forgeml predict` uses, on the
variant `forgeml compress` selected when it is an ONNX file (onnxruntime), else PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgeml.api import Predictor
from forgeml.encryption import plaintext_view
from forgeml.workspace import RunDir, read_json

ONNX_FILES = {"onnx_int8": "model.int8.onnx", "onnx_fp32": "model.onnx"}


class ModelRuntime:
    """A loaded model plus its name and version; `predict` takes raw inputs as `Predictor.predict` does."""

    def __init__(self, run_dir: str | Path, engine: str | None = None):
        """`engine`: auto (the variant `forgeml compress` selected), onnx or pytorch; None: the run's
        `serve.engine`."""
        self.predictor = Predictor(run_dir)
        run = self.predictor.run
        engine = engine or self.predictor.config.serve.engine
        self.name, self.version = run.name, run.id
        self.engine = "pytorch"
        if engine in ("auto", "onnx"):
            # An encrypted run's ONNX file is decrypted into a private folder just long enough for
            # onnxruntime to read it into memory.
            with plaintext_view(run.path, only=("manifest.json", "compress/", "export/")) as plain:
                selected = _selected_variant(plain)
                file = ONNX_FILES.get(selected or "", "model.int8.onnx" if engine == "onnx" else None)
                if file and (plain / "export" / file).is_file():
                    from forgeml.export import OnnxModel

                    RunDir(plain).verify("export/")  # the ONNX file is an artefact like the others: checked
                    self.predictor.model = OnnxModel(plain / "export" / file)
                    self.engine = f"onnxruntime ({selected or 'onnx_int8'})"
        self.input_columns = list(self.predictor.input_columns)
        self.classes = list(getattr(self.predictor.task.target, "classes", []))
        self.explainable = bool(getattr(self.predictor.task, "text_columns", None))

    def predict(self, inputs: list[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        return self.predictor.predict(inputs, batch_size=batch_size)

    def explain(self, inputs: list[Any], steps: int = 20) -> list[dict[str, Any]]:
        """Word attributions from the PyTorch model (gradients), whichever engine answers predictions."""
        return [explanation.to_dict() for explanation in self.predictor.explain(inputs, steps)]

    def storable(self, inputs: list[Any]) -> list[Any]:
        """Inputs as they may be kept in the database: PII redacted when the run redacts it for training.

        Every text of the request goes through one `redact_texts` call (and one NER batch), not one each.
        """
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
        if getattr(self.predictor.task, "text_columns", None):
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
            "inputs": self.input_columns,
            "labels": self.classes,
            "explainable": self.explainable,
        }


def record_values(record: Any) -> list[Any]:
    """A request record's values in order: a mapping's values, a pair's texts, or the text itself."""
    if isinstance(record, dict):
        return list(record.values())
    return list(record) if isinstance(record, list) else [record]


def _selected_variant(run_dir: Path) -> str | None:
    report = run_dir / "compress" / "compression.json"
    return read_json(report).get("selected") if report.is_file() else None
