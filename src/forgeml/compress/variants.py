"""The model variants compression compares: PyTorch fp32 and int8, ONNX Runtime fp32 and int8."""

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
    """One way to run the model: a callable with the PyTorch model's calling convention, and its size."""

    name: str
    runtime: Any
    bytes: int
    description: str


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
    task: Task, model: nn.Module, rows: EncodedSplit, folder: Path, quantize: bool = True
) -> tuple[list[Variant], dict[str, Any]]:
    """The variants (the original first) and the ONNX export's parity report (written to `folder`)."""
    model.eval()
    variants = [Variant("pytorch_fp32", model, _in_memory_size(model), "the trained model, PyTorch eager")]
    if quantize:
        quantized = pytorch_int8(model)
        variants.append(
            Variant("pytorch_int8", quantized, _in_memory_size(quantized), "PyTorch dynamic int8 (Linear layers)")
        )
    parity = export_model(task, model, rows, folder, ("onnx",))
    variants.append(
        Variant("onnx_fp32", OnnxModel(folder / "model.onnx"), (folder / "model.onnx").stat().st_size, "ONNX Runtime")
    )
    if quantize:
        int8 = folder / "model.int8.onnx"
        variants.append(Variant("onnx_int8", OnnxModel(int8), int8.stat().st_size, "ONNX Runtime dynamic int8"))
    return variants, parity
