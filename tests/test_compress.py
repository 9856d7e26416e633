"""Compression: int8 and ONNX Runtime variants of real runs measured side by side, the frontier plot,
the selection rule, and the card section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import forgeml
from forgeml.errors import ConfigError
from forgeml.workspace import RunDir

from conftest import write_csv
from test_train import tabular_config, tabular_rows

VARIANTS = ["pytorch_fp32", "pytorch_int8", "onnx_fp32", "onnx_int8"]


@pytest.fixture
def text_run(sentiment_model, tmp_path: Path) -> Path:
    return shutil.copytree(sentiment_model.run.path, tmp_path / "runs" / "tiny" / sentiment_model.run.id)


def test_text_run_variants_are_measured_and_the_fastest_within_tolerance_is_selected(text_run: Path) -> None:
    report = forgeml.api.compress(text_run)
    assert [r["name"] for r in report["variants"]] == VARIANTS and report["metric"] == "accuracy"
    by_name = {r["name"]: r for r in report["variants"]}
    original = by_name["pytorch_fp32"]
    assert original["drop"] == 0.0 and original["speedup_batch1"] == 1.0
    assert by_name["onnx_fp32"]["metrics"]["accuracy"] == original["metrics"]["accuracy"]  # fp32: same answers
    assert by_name["onnx_int8"]["bytes"] < by_name["onnx_fp32"]["bytes"]
    assert by_name["pytorch_int8"]["bytes"] < original["bytes"]
    for result in report["variants"]:
        assert result["latency_ms"]["calls"] > 0 and 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"]
        assert result["throughput_rows_per_s"] > 0
    eligible = [r for r in report["variants"] if r["drop"] <= report["tolerance"]]
    assert report["selected"] == min(eligible, key=lambda r: r["latency_ms"]["p50"])["name"]

    saved = json.loads((text_run / "compress" / "compression.json").read_text())
    assert saved == report and saved["onnx_parity"]["passed"]
    assert (text_run / "compress" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    card = (text_run / "card.md").read_text()
    assert "## Compression" in card and f"{report['selected']} (selected)" in card and "compress/frontier.png" in card
    RunDir(text_run).verify("compress/")  # hashed in the manifest


def test_zero_tolerance_keeps_a_variant_no_worse_than_the_original(text_run: Path) -> None:
    config = (text_run / "config.yaml").read_text() + "compress: {select: {max_accuracy_drop: 0.0}, quantize: false}\n"
    (text_run / "config.yaml").write_text(config.replace("compress: null\n", ""))
    RunDir(text_run).record([text_run / "config.yaml"])
    report = forgeml.api.compress(text_run)
    assert [r["name"] for r in report["variants"]] == ["pytorch_fp32", "onnx_fp32"]
    selected = next(r for r in report["variants"] if r["name"] == report["selected"])
    assert selected["drop"] <= 0.0


def test_a_run_with_a_compress_section_compresses_its_tabular_model(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(500))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"].update(epochs=10, threads=1)
    config["compress"] = {"latency_rows": 20, "throughput_rows": 64}
    result = forgeml.run(config, workspace=tmp_path)
    report = json.loads((result.run_dir / "compress" / "compression.json").read_text())
    assert [r["name"] for r in report["variants"]] == VARIANTS
    assert report["variants"][0]["metrics"]["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert all(r["latency_ms"]["calls"] == 20 for r in report["variants"])


def test_compress_config_errors_name_the_key() -> None:
    base = {"task": "text-classification", "data": {"train": "t.csv"}}
    with pytest.raises(ConfigError, match=r"compress\.select\.max_accuracy_drop"):
        forgeml.load_config({**base, "compress": {"select": {"max_accuracy_drop": 2}}})
    with pytest.raises(ConfigError, match=r"compress\.latency_rowz"):
        forgeml.load_config({**base, "compress": {"latency_rowz": 5}})
