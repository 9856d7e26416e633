"""The model variants compression compares: PyTorch fp32 and int8, ONNX Runtime fp32 and per-token int8."""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgeml.export import OnnxModel, export_model
from forgeml.tasks.base import EncodedSplit, Task


@dataclass
class Variant:
    """One way to run the model: a callable with the PyTorch model's calling convention, and its size.

    `file` is what serves it (an ONNX file, or a folder saved like a run's `model/`); `source` the folder
    of the PyTorch model it was made from, when that is not the run's own model.
    """

    name: str
    runtime: Any
    bytes: int
    description: str
    file: Path | None = None
    source: Path | None = None
    parity_passed: bool = True  # False: an int8 file that fails its parity check (served only if allowed)
    batch_invariant: bool = True  # False: a row's answer depends on its batch neighbours (never served)


def _in_memory_size(module: nn.Module) -> int:
    """Bytes of the module's state serialised (int8 packed weights have no safetensors form to measure)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)  # only measured, never written: artefacts stay safetensors
    return buffer.tell()


def pytorch_int8(model: nn.Module) -> nn.Module:
    """torch's dynamic quantization: Linear weights in int8, activations quantized per call."""
    with warnings.catch_warnings():  # torch.ao.quantization is in maintenance; it still works on CPU
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return quantized.eval()


def build_variants(
    task: Task,
    model: nn.Module,
    rows: EncodedSplit,
    folder: Path,
    quantize: bool = True,
    calibration: EncodedSplit | None = None,
) -> tuple[list[Variant], dict[str, Any]]:
    """The variants (the original first) and the ONNX export's parity report (written to `folder`);
    `calibration`: training rows for a statically quantized int8 export."""
    model.eval()
    variants = [Variant("pytorch_fp32", model, _in_memory_size(model), "the trained model, PyTorch eager")]
    if quantize:
        quantized = pytorch_int8(model)
        variants.append(
            Variant(
                "pytorch_int8",
                quantized,
                _in_memory_size(quantized),
                # One activation scale per call over the whole padded batch: measured, never served.
                "PyTorch dynamic int8 (Linear layers; batch-dependent answers)",
                batch_invariant=False,
            )
        )
    parity = export_model(task, model, rows, folder, ("onnx",), calibration)
    fp32 = folder / "model.onnx"
    variants.append(Variant("onnx_fp32", OnnxModel(fp32), fp32.stat().st_size, "ONNX Runtime", file=fp32))
    if quantize:
        int8 = folder / "model.int8.onnx"
        variants.append(
            Variant(
                "onnx_int8",
                OnnxModel(int8),
                int8.stat().st_size,
                _int8_description("ONNX Runtime int8", parity),
                int8,
                parity_passed=parity["int8_passed"],
            )
        )
    return variants, parity


def _int8_description(description: str, parity: dict[str, Any]) -> str:
    check = parity["checks"]["onnx_int8"]
    if check["passed"]:
        return description
    return f"{description} (same label as its PyTorch model on {check['label_agreement']:.1%})"


def onnx_int8_of(task: Task, trained: Variant, rows: EncodedSplit) -> Variant:
    """A trained variant (a student, a pruned model) exported and quantized like the original, so the two
    gains stack; its parity report sits beside it. When the int8 file fails the parity check against the
    variant's own outputs, it is still measured (the frontier shows it) and marked, and selected for
    serving only when `compress.select.require_parity` is off."""
    folder = trained.file / "export"
    parity = export_model(task, trained.runtime, rows, folder, ("onnx",))
    int8 = folder / "model.int8.onnx"
    description = _int8_description(f"{trained.description}, ONNX Runtime int8", parity)
    name = f"{trained.name}_onnx_int8"
    return Variant(name, OnnxModel(int8), int8.stat().st_size, description, int8, trained.file, parity["int8_passed"])
