"""ONNX and TorchScript exports of a run's model, each checked against PyTorch on real rows.

The exported graph takes exactly what the model's forward takes (token ids and attention mask, or
standardised numbers and category ids), with dynamic batch and sequence axes. Preprocessing is not
duplicated into the graph: `OnnxModel` stands where the PyTorch model stood, so the run's own
`Task.encode` (tokenizer, label map, tabular preprocessing from `model/`) feeds both, by one code path.

Parity (`export/parity.json`): fp32 ONNX (and TorchScript) must match PyTorch's outputs to 1e-4, or the
export fails. The int8 model is a derived, lossy file: it must give the same label on at least 99 % of
the rows to be served, and when it does not, that is reported (a less confident model loses more to
quantization) while the export itself succeeds.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from forgeml.errors import ArtifactError, ForgeError
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.workspace import atomic_write_json

FORMATS = ("onnx", "torchscript")
OPSET = 17
FP32_TOLERANCE = 1e-4  # largest allowed |output difference| between ONNX fp32 and PyTorch
INT8_AGREEMENT = 0.99  # smallest allowed share of rows where int8 and PyTorch give the same label
PARITY_ROWS = 2000  # int8 label agreement moves by a point between 256-row samples: measure on more


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ForgeError("export: ONNX needs onnx and onnxruntime; pip install onnx onnxruntime") from None
    return onnxruntime


class _ExportedModel:
    """What `model_outputs` and the predictor need of a module besides calling it: always in eval mode."""

    training = False

    def eval(self) -> _ExportedModel:
        return self

    def train(self, mode: bool = True) -> _ExportedModel:
        return self


class OnnxModel(_ExportedModel):
    """An onnxruntime session with the calling convention of the PyTorch model it was exported from.

    `model_outputs`, the audits and the predictor call it as they call the module: keyword tensors in,
    a tensor of outputs back.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        onnxruntime = _onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable models
            raise ArtifactError(f"{path}: not a loadable ONNX model ({error})") from None
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.path = Path(path)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[name].cpu().numpy() for name in self.input_names}
        return torch.from_numpy(self.session.run(None, feed)[0])


def parity_sample(rows: Dataset) -> Dataset:
    """A seeded subset of at most `PARITY_ROWS` rows to check exports on."""
    return rows.shuffle(seed=0).select(range(PARITY_ROWS)) if len(rows) > PARITY_ROWS else rows


def load_exported(folder: str | Path, file: str = "model.int8.onnx") -> tuple[Task, OnnxModel]:
    """An exported model and its task from an `export/` folder alone (no PyTorch weights needed).

    `task.encode(dataset, with_targets=False)` turns raw inputs into the model's, `model_outputs(model,
    encoded)` runs it, and `task.predictions(outputs)` gives the labels and probabilities (or values).
    Text clean-up the run applies before tokenizing (Unicode normalisation, PII redaction) is set in the
    run's config, not here: `forgeml.load(run).prepare_inputs` applies it.
    """
    from forgeml.tasks import load_task_inputs

    folder = Path(folder)
    return load_task_inputs(folder), OnnxModel(folder / file)


class _Positional(nn.Module):
    """`model` called with its inputs in order: the tracer passes inputs positionally, and a forward that takes
    `**inputs` (an ensemble's) would receive none of them."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True)))


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    """Write `model` as one ONNX file (legacy exporter, opset 17) with dynamic batch and sequence axes."""
    names = list(example)
    # Token inputs vary in batch and length; tabular inputs (numeric, categorical) and images only in batch.
    # An ensemble's inputs are its members' under a group prefix ("g0.input_ids"): each group its own length.
    dynamic: dict[str, dict[int, str]] = {"outputs": {0: "batch"}}
    for name in names:
        group, _, own = name.rpartition(".")
        tokens = own in ("input_ids", "attention_mask", "token_type_ids")
        dynamic[name] = {0: "batch", 1: f"{group}.sequence" if group else "sequence"} if tokens else {0: "batch"}
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about every Python branch on a tensor; the parity check is what shows the graph is right.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Positional(model, names),
            tuple(example.values()),
            str(staging),
            input_names=names,
            output_names=["outputs"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    staging.replace(path)
    return path


def quantize_int8(source: Path, target: Path, calibration: EncodedSplit | None = None) -> Path:
    """The int8 file of `source`. Without `calibration`: int8 matrix multiplies with a scale per token and per
    weight column (`forgeml.quantize`), for transformers and MLPs. With it (a convolutional network): static
    quantization calibrated on those rows (`quantize_static_int8`). Either way a row's answer does not depend
    on the rows batched with it, unlike onnxruntime's dynamic quantization."""
    staging = target.with_name(f".{target.name}.tmp")
    if calibration is not None:
        quantize_static_int8(source, staging, calibration)
    else:
        from forgeml.quantize import quantize_per_token

        quantize_per_token(source, staging)
    staging.replace(target)
    return target


def quantize_static_int8(source: Path, target: Path, calibration: EncodedSplit, batch_size: int = 64) -> None:
    """onnxruntime's static quantization: convolutions and matrix multiplies in int8 (QDQ: per-channel int8
    weights, uint8 activations), every activation scale fixed beforehand from its range on `calibration`: the
    99.999th percentile of its values rather than the extreme (on the CIFAR-10 example model, 2,000 test
    images: the same label as fp32 on 99.3 % against 98.95 % with min-max ranges, at the same speed).

    Dynamic quantization would leave a CNN's convolutions (nearly all of its work) in fp32; fixed scales also
    keep a row's answer independent of its batch. The calibration rows should be training rows: scales fitted
    on the rows a model is then scored on would flatter it.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [node.name for node in _onnxruntime().InferenceSession(str(source)).get_inputs()]

    # Batches of one size (the percentile calibrator stacks them): whole batches only, or all rows as one.
    size = min(batch_size, len(calibration))
    last = len(calibration) - len(calibration) % size

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, last, size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            inputs, _ = calibration.batch(range(start, start + size))
            return {name: inputs[name].numpy() for name in names}

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference and graph fusions, as onnxruntime advises
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it suggests pre-processing, which was just done
            quantize_static(
                str(prepared),
                str(target),
                Batches(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.Percentile,
            )


def export_torchscript(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    """A traced TorchScript module (for C++/mobile runtimes); shapes stay dynamic for these models."""
    model.eval()
    staging = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example_kwarg_inputs=example, strict=False)
    traced.save(str(staging))
    staging.replace(path)
    return path


class TorchScriptModel(_ExportedModel):
    """A TorchScript module called like the PyTorch model (for the parity check)."""

    def __init__(self, path: Path):
        self.module = torch.jit.load(str(path), map_location="cpu")
        self.module.eval()

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.module(**inputs)


def export_model(
    task: Task,
    model: nn.Module,
    rows: EncodedSplit,
    folder: Path,
    formats: tuple[str, ...] = ("onnx",),
    calibration: EncodedSplit | None = None,
) -> dict[str, Any]:
    """Export `model` into `folder` in each format, check every export on `rows`; return the parity report.

    `calibration` (training rows) makes the int8 file by static quantization; see `quantize_int8`.

    Raises ForgeError when a format asked for (ONNX fp32, TorchScript) disagrees with PyTorch, after writing
    the report so it can be read. An int8 file below its label-agreement threshold does not raise: its
    check is marked failed (`report["int8_passed"]` is False), which keeps it from being served.
    """
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ForgeError(f"export: unknown format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    if not len(rows):
        raise ForgeError("export: no rows to trace the model with and check it on")
    # The longest and the shortest row: the traced graph must see padding, or the attention-mask branch
    # that only padded batches take could be traced away.
    example, _ = rows.batch(sorted({int(np.argmax(rows.lengths)), int(np.argmin(rows.lengths))}))
    reference, _ = model_outputs(model, rows)
    classification = hasattr(task.target, "classes")
    report: dict[str, Any] = {"rows": len(rows), "checks": {}}
    task.save_inputs(folder)  # tokenizer or tabular preprocessing and label map: the folder stands alone
    exported: dict[str, Any] = {}
    if "onnx" in formats:
        fp32 = export_onnx(model, example, folder / "model.onnx")
        exported["onnx_fp32"] = (fp32, OnnxModel(fp32))
        int8 = quantize_int8(fp32, folder / "model.int8.onnx", calibration)
        exported["onnx_int8"] = (int8, OnnxModel(int8))
    if "torchscript" in formats:
        scripted = export_torchscript(model, example, folder / "model.torchscript.pt")
        exported["torchscript"] = (scripted, TorchScriptModel(scripted))
    for name, (path, runtime) in exported.items():
        started = time.perf_counter()
        outputs, _ = model_outputs(runtime, rows)
        seconds = time.perf_counter() - started
        check = {"file": path.name, "bytes": path.stat().st_size, "seconds": seconds}
        check["max_abs_diff"] = float(np.max(np.abs(outputs - reference)))
        if classification:
            check["label_agreement"] = float(np.mean(outputs.argmax(axis=1) == reference.argmax(axis=1)))
        if name == "onnx_int8":
            check["scheme"] = "per-token" if calibration is None else f"static ({len(calibration)} calibration rows)"
            check["threshold"] = {"label_agreement": INT8_AGREEMENT} if classification else None
            check["passed"] = check.get("label_agreement", 1.0) >= INT8_AGREEMENT
        else:
            check["threshold"] = {"max_abs_diff": FP32_TOLERANCE}
            check["passed"] = check["max_abs_diff"] <= FP32_TOLERANCE
        report["checks"][name] = check
    required = {name: check for name, check in report["checks"].items() if name != "onnx_int8"}
    report["passed"] = all(check["passed"] for check in required.values())
    if "onnx_int8" in report["checks"]:
        report["int8_passed"] = report["checks"]["onnx_int8"]["passed"]
    atomic_write_json(folder / "parity.json", report)
    if not report["passed"]:
        failed = [name for name, check in required.items() if not check["passed"]]
        raise ForgeError(f"export: parity check failed for {', '.join(failed)}; see {folder / 'parity.json'}")
    return report


def int8_finding(report: dict[str, Any]) -> str | None:
    """One sentence on an int8 file that failed its parity check (None when it passed or was not made)."""
    check = report.get("checks", {}).get("onnx_int8")
    if check is None or check["passed"]:
        return None
    return (
        f"int8 gives PyTorch's label on {check['label_agreement']:.1%} of {report['rows']:,} rows "
        f"(below {INT8_AGREEMENT:.0%}): it is kept for inspection but not served; "
        "serve the fp32 export (--engine onnx_fp32) or the trained model"
    )
