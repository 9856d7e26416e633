"""Export: ONNX (fp32 and int8) and TorchScript files of real runs, checked against PyTorch; real
onnxruntime sessions with dynamic batch and sequence axes; the exports are hashed in the manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import forgeml
from forgeml.errors import ArtifactError, ForgeError
from forgeml.evaluate.outputs import model_outputs
from forgeml.export import FP32_TOLERANCE, INT8_AGREEMENT, OnnxModel, load_exported
from forgeml.workspace import RunDir

from conftest import write_csv
from test_train import tabular_config, tabular_rows


@pytest.fixture
def text_run(sentiment_model, tmp_path: Path) -> Path:
    """A copy of the shared tiny sentiment run (exports write into the run directory)."""
    return shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)


def test_text_model_exports_with_parity_and_dynamic_axes(text_run: Path) -> None:
    report = forgeml.api.export(text_run, ["onnx", "torchscript"])
    checks = report["checks"]
    assert report["passed"] and set(checks) == {"onnx_fp32", "onnx_int8", "torchscript"}
    assert checks["onnx_fp32"]["max_abs_diff"] <= FP32_TOLERANCE
    assert checks["onnx_int8"]["label_agreement"] >= INT8_AGREEMENT
    assert checks["onnx_int8"]["bytes"] < checks["onnx_fp32"]["bytes"]
    assert json.loads((text_run / "export" / "parity.json").read_text()) == report
    card = (text_run / "card.md").read_text()
    assert "## Exports" in card and "| onnx_int8 | export/model.int8.onnx |" in card

    predictor = forgeml.load(text_run)
    texts = ["a wonderful film", "the plot was dull and the acting was awful , truly awful", "fine"]
    encoded = predictor.task.encode(predictor.prepare_inputs(_texts(texts)), "check", with_targets=False)
    session = OnnxModel(text_run / "export" / "model.onnx")
    inputs, _ = encoded.batch([0, 1, 2])  # another batch size and length than the export's example
    assert inputs["input_ids"].shape[1] > 4
    expected = predictor.model(**inputs).detach()
    assert torch.allclose(session(**inputs), expected, atol=FP32_TOLERANCE)
    outputs, _ = model_outputs(session, encoded, batch_size=2)
    assert np.allclose(outputs, expected.numpy(), atol=FP32_TOLERANCE)

    # The export folder stands alone: moved away from the run, it still turns texts into the same answers.
    alone = shutil.copytree(text_run / "export", text_run.parent / "shipped")
    task, exported = load_exported(alone, "model.onnx")
    shipped_outputs, _ = model_outputs(exported, task.encode(_texts(texts), "check", with_targets=False))
    assert task.predictions(shipped_outputs)["label"] == [a["label"] for a in predictor.predict(texts)]
    assert sorted(p.name for p in alone.iterdir()) == [
        "model.int8.onnx",
        "model.onnx",
        "model.torchscript.pt",
        "parity.json",
        "task.json",
        "tokenizer",
    ]

    RunDir(text_run).verify("export/")  # every export file is hashed in the manifest
    with open(text_run / "export" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model\.onnx"):
        RunDir(text_run).verify("export/")


def test_tabular_model_exports_and_int8_agrees(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(400))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"].update(epochs=10, threads=1)
    run = forgeml.run(config, workspace=tmp_path).run_dir
    unseen = write_csv(tmp_path / "unseen.csv", tabular_rows(300, seed=9))
    report = forgeml.api.export(run, ["onnx"], data=unseen)
    assert report["rows"] == 300 and report["passed"]
    assert report["checks"]["onnx_int8"]["label_agreement"] >= INT8_AGREEMENT

    predictor = forgeml.load(run)
    encoded = predictor.task.encode(
        predictor.prepare_inputs(_rows(tabular_rows(50, seed=3, missing=0.0))), "x", with_targets=False
    )
    torch_outputs, _ = model_outputs(predictor.model, encoded)
    onnx_outputs, _ = model_outputs(OnnxModel(run / "export" / "model.onnx"), encoded)
    assert np.abs(onnx_outputs - torch_outputs).max() <= FP32_TOLERANCE
    task, alone = load_exported(run / "export", "model.onnx")  # the preprocessing travels with the export
    rows = _rows(tabular_rows(50, seed=3, missing=0.0))
    shipped_outputs, _ = model_outputs(alone, task.encode(rows, "x", with_targets=False))
    assert np.abs(shipped_outputs - torch_outputs).max() <= FP32_TOLERANCE


def test_a_failing_int8_check_is_reported_and_never_served_while_the_export_succeeds(
    text_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import forgeml.export
    from forgeml.export import int8_finding
    from forgeml.serve.runtime import ModelRuntime

    monkeypatch.setattr(forgeml.export, "INT8_AGREEMENT", 1.01)  # no int8 file can pass now
    report = forgeml.api.export(text_run, ["onnx"])
    assert report["passed"] and report["int8_passed"] is False  # fp32, the format asked for, is fine
    assert (text_run / "export" / "model.int8.onnx").is_file()  # written, for inspection
    assert "not served" in int8_finding(report) and "--engine onnx_fp32" in int8_finding(report)
    RunDir.open(text_run).verify()  # the files were recorded in the manifest
    with pytest.raises(ForgeError, match=r"--engine onnx: int8 gives PyTorch's label on"):
        ModelRuntime(text_run, engine="onnx")
    assert ModelRuntime(text_run, engine="onnx_fp32").engine == "onnxruntime (onnx_fp32)"


def test_unknown_format_is_refused_by_name(text_run: Path) -> None:
    with pytest.raises(ForgeError, match=r"unknown format.*tflite.*onnx, torchscript"):
        forgeml.api.export(text_run, ["tflite"])
    result = subprocess.run(
        [sys.executable, "-m", "forgeml.cli", "export", str(text_run), "--format", "tflite"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "tflite" in result.stderr and "Traceback" not in result.stderr


def test_unreadable_onnx_file_is_an_artifact_error(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        OnnxModel(broken)


def _texts(texts: list[str]):
    from datasets import Dataset

    return Dataset.from_dict({"text": texts})


def _rows(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{k: v for k, v in row.items() if k not in ("label", "score")} for row in rows])
