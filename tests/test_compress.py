"""Compression: int8 and ONNX Runtime variants of real runs measured side by side, the frontier plot,
the selection rule, and the card section."""

from __future__ import annotations

import copy
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


def test_a_failing_int8_parity_inside_a_run_leaves_a_finished_run_with_int8_marked_and_not_selected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import forgeml.export
    from forgeml.store import Store, database_url

    monkeypatch.setattr(forgeml.export, "INT8_AGREEMENT", 1.01)  # no int8 file can pass now
    path = write_csv(tmp_path / "t.csv", tabular_rows(300))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"].update(epochs=3, threads=1)
    config["compress"] = {"latency_rows": 10, "throughput_rows": 32, "select": {"max_accuracy_drop": 1.0}}
    result = forgeml.run(config, workspace=tmp_path)
    report = json.loads((result.run_dir / "compress" / "compression.json").read_text())
    int8 = next(r for r in report["variants"] if r["name"] == "onnx_int8")
    assert int8["parity_passed"] is False and "same label as its PyTorch model on" in int8["description"]
    assert report["selected"] != "onnx_int8"  # even with any accuracy drop allowed
    assert report["onnx_parity"]["passed"] and report["onnx_parity"]["int8_passed"] is False
    assert Store(database_url(tmp_path)).run(result.run_id)["status"] == "finished"
    assert "failed its int8 parity check" in (result.run_dir / "card.md").read_text()


def test_compress_config_errors_name_the_key() -> None:
    base = {"task": "text-classification", "data": {"train": "t.csv"}}
    with pytest.raises(ConfigError, match=r"compress\.select\.max_accuracy_drop"):
        forgeml.load_config({**base, "compress": {"select": {"max_accuracy_drop": 2}}})
    with pytest.raises(ConfigError, match=r"compress\.latency_rowz"):
        forgeml.load_config({**base, "compress": {"latency_rowz": 5}})


def test_evenly_spaced_layers_keep_the_first_and_the_last() -> None:
    from forgeml.compress.distill import evenly_spaced

    assert evenly_spaced(6, 3) == [0, 2, 5]  # round(2.5) is 2
    assert evenly_spaced(6, 6) == list(range(6)) and evenly_spaced(6, 1) == [0]
    with pytest.raises(ConfigError, match=r"compress\.distill\.layers"):
        evenly_spaced(6, 7)


def test_a_student_with_every_layer_is_the_teacher(sentiment_model) -> None:
    import torch

    from forgeml.compress.distill import student_from_teacher

    teacher = sentiment_model.model
    student = student_from_teacher(teacher, teacher.encoder.config.num_hidden_layers)
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert torch.equal(student(**inputs), teacher(**inputs))
    shallow = student_from_teacher(teacher, 1)
    assert len(shallow.encoder.encoder.layer) == 1 and shallow.encoder.config.num_hidden_layers == 1
    assert len(teacher.encoder.encoder.layer) == 2  # the teacher is left whole


def test_distilled_student_learns_is_saved_and_measured(text_run: Path) -> None:
    from forgeml.tasks import load_task

    config = (text_run / "config.yaml").read_text().replace("compress: null\n", "")
    config += "compress: {distill: {layers: 1, epochs: 3, lr: 3.0e-3}, latency_rows: 20, throughput_rows: 64}\n"
    (text_run / "config.yaml").write_text(config)
    report = forgeml.api.compress(text_run)
    student = next(r for r in report["variants"] if r["name"] == "distilled_1_layers")
    assert student["metrics"]["accuracy"] >= 0.85  # one sentiment word decides the label: learnable with 1 layer
    assert student["bytes"] < report["variants"][0]["bytes"]
    assert report["distillation"]["teacher_layers_kept"] == [0] and report["distillation"]["steps"] > 0
    task, model = load_task(text_run / "compress" / "student")  # saved like a run's model/
    assert model.encoder.config.num_hidden_layers == 1 and task.target.classes == ["negative", "positive"]


def test_magnitude_pruning_keeps_its_zeros_through_recovery(sentiment_model) -> None:
    import torch

    from forgeml.compress.prune import magnitude_prune, make_permanent

    pruned = magnitude_prune(sentiment_model.model, 0.5)
    with torch.no_grad():  # what a recovery step would do to every weight, pruned ones included
        for name, parameter in pruned.named_parameters():
            if name.endswith("weight_orig"):
                parameter.add_(1.0)
    assert make_permanent(pruned) >= 0.5
    assert not any(name.endswith(("weight_orig", "weight_mask")) for name, _ in pruned.state_dict().items())
    assert (pruned.head.weight != 0).all()  # the head is left whole


def test_feed_forward_pruning_keeping_every_neuron_changes_nothing(sentiment_model) -> None:
    import torch

    from forgeml.compress.prune import prune_feed_forward

    teacher = sentiment_model.model
    width = teacher.encoder.config.intermediate_size
    same, kept = prune_feed_forward(teacher, 1.0)
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert kept == width and torch.allclose(same(**inputs), teacher(**inputs), atol=1e-6)
    half, kept = prune_feed_forward(teacher, 0.5)
    assert kept == width // 2 and half.encoder.encoder.layer[0].intermediate.dense.out_features == width // 2
    assert teacher.encoder.config.intermediate_size == width  # the original is left as it was


def test_removing_a_silent_head_changes_nothing_and_survives_a_reload(sentiment_model, tmp_path: Path) -> None:
    import torch

    from forgeml.compress.prune import head_importance, prune_attention_heads
    from forgeml.tasks import load_task

    model = copy.deepcopy(sentiment_model.model)
    output = model.encoder.encoder.layer[0].attention.output.dense
    with torch.no_grad():
        output.weight[:, 16:] = 0  # head 1 of layer 0 now adds nothing to the layer's output
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 3, 11]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    batches = [inputs, {"input_ids": torch.tensor([[4, 8, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}]
    importance = head_importance(model, batches)
    assert importance.shape == (2, 2) and importance[0, 1] == 0 and (importance[0, 0] > 0) and (importance[1] > 0).all()

    fewer, removed = prune_attention_heads(model, 0.5, batches)
    assert removed[0] == [1]  # the silent head is the one cut in layer 0
    attention = fewer.encoder.encoder.layer[0].attention
    assert attention.self.query.out_features == 16 and attention.output.dense.in_features == 16
    model.eval(), fewer.eval()
    with torch.no_grad():
        expected = model(**inputs)
        kept_all, _ = prune_attention_heads(model, 0.99, batches)  # rounds to both heads: nothing cut
        assert torch.allclose(kept_all.eval()(**inputs), expected, atol=1e-6)
        only_silent = copy.deepcopy(model)
        from forgeml.models.hf import remove_attention_heads

        remove_attention_heads(only_silent.encoder, {0: [1]})
        assert torch.allclose(only_silent.eval()(**inputs), expected, atol=1e-5)

    sentiment_model.task.save(tmp_path / "fewer", fewer)
    _, reloaded = load_task(tmp_path / "fewer")
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**inputs), fewer(**inputs), atol=1e-6)
    assert reloaded.encoder.encoder.layer[1].attention.self.num_attention_heads == 1


def test_pruned_variants_recover_and_reload(text_run: Path) -> None:
    from forgeml.tasks import load_task

    config = (text_run / "config.yaml").read_text().replace("compress: null\n", "")
    prune = "{sparsity: 0.5, ffn_keep: 0.5, epochs: 2, lr: 1.0e-3}"
    config += f"compress: {{prune: {prune}, latency_rows: 10, throughput_rows: 32}}\n"
    (text_run / "config.yaml").write_text(config)
    report = forgeml.api.compress(text_run)
    by_name = {r["name"]: r for r in report["variants"]}
    assert report["magnitude_pruning"]["sparsity"] >= 0.5 and report["ffn_pruning"]["intermediate_size"] == 32
    assert report["head_pruning"]["heads_kept"] == 1 and report["head_pruning"]["heads"] == 2
    for name in ("pruned_50pct", "ffn_pruned_50pct", "heads_pruned_50pct"):
        assert by_name[name]["metrics"]["accuracy"] >= 0.85, name
    _, narrow = load_task(text_run / "compress" / "ffn_pruned_50pct")
    assert narrow.encoder.encoder.layer[1].output.dense.in_features == 32
    _, fewer = load_task(text_run / "compress" / "heads_pruned_50pct")  # reloads with one head per layer
    assert fewer.encoder.encoder.layer[1].attention.self.query.out_features == 16
    card = (text_run / "card.md").read_text()
    assert "most important neurons" in card and "of its Linear weights at zero" in card

    # each trained variant in int8 as well (the gains stack), parity-checked against its own PyTorch outputs
    for name in ("pruned_50pct", "ffn_pruned_50pct", "heads_pruned_50pct"):
        stacked = by_name[f"{name}_onnx_int8"]
        assert stacked["file"] == f"compress/{name}/export/model.int8.onnx" and stacked["source"] == f"compress/{name}"
        assert stacked["metrics"]["accuracy"] >= 0.85, name
        parity = json.loads((text_run / "compress" / name / "export" / "parity.json").read_text())
        assert parity["passed"]

    # whatever compress selects is what the server runs, explained by its own PyTorch weights
    from forgeml.serve.runtime import ModelRuntime
    from forgeml.workspace import RunDir

    comparison_file = text_run / "compress" / "compression.json"
    comparison = json.loads(comparison_file.read_text())
    texts = ["the film was great", "a dull and boring plot"]
    for selected, engine in [
        ("heads_pruned_50pct_onnx_int8", "onnxruntime (heads_pruned_50pct_onnx_int8)"),
        ("ffn_pruned_50pct", "pytorch (ffn_pruned_50pct)"),
        ("pytorch_int8", "pytorch (pytorch_int8)"),
    ]:
        comparison_file.write_text(json.dumps({**comparison, "selected": selected}))
        RunDir(text_run).record([comparison_file])
        runtime = ModelRuntime(text_run)
        assert runtime.engine == engine
        assert [answer["label"] for answer in runtime.predict(texts)] == ["positive", "negative"], selected
    original = ModelRuntime(text_run)  # pytorch_int8 still selected: the trained model itself explains
    assert original.predictor.torch_model.encoder.encoder.layer[0].attention.self.num_attention_heads == 2
    comparison_file.write_text(json.dumps({**comparison, "selected": "heads_pruned_50pct_onnx_int8"}))
    RunDir(text_run).record([comparison_file])
    fewer_heads = ModelRuntime(text_run).predictor.torch_model
    assert fewer_heads.encoder.encoder.layer[0].attention.self.num_attention_heads == 1


def test_an_int8_variant_failing_parity_is_measured_and_marked(sentiment_model, tmp_path, monkeypatch) -> None:
    from datasets import Dataset

    import forgeml.export
    from forgeml.compress.variants import Variant, onnx_int8_of

    monkeypatch.setattr(forgeml.export, "INT8_AGREEMENT", 1.01)  # no int8 file can pass now
    folder = tmp_path / "student"
    sentiment_model.task.save(folder, sentiment_model.model)
    texts = Dataset.from_dict({"text": ["the film was great", "a dull and boring plot", "fine"]})
    rows = sentiment_model.task.encode(texts, "check", with_targets=False)
    trained = Variant("student", sentiment_model.model, 1, "a copy", folder, folder)
    stacked = onnx_int8_of(sentiment_model.task, trained, rows)
    assert not stacked.parity_passed and "same label as its PyTorch model on" in stacked.description
    assert stacked.file == folder / "export" / "model.int8.onnx" and stacked.file.is_file()
    parity = json.loads((folder / "export" / "parity.json").read_text())
    assert parity["passed"] and parity["int8_passed"] is False  # fp32 is fine; only the int8 file is off


def test_selection_takes_the_fastest_within_tolerance_and_trusts_parity_unless_told() -> None:
    from forgeml.compress.frontier import select_variant

    def result(name: str, drop: float, p50: float, parity: bool = True) -> dict:
        return {"name": name, "drop": drop, "latency_ms": {"p50": p50}, "parity_passed": parity}

    results = [
        result("original", 0.0, 10.0),
        result("int8", 0.004, 3.0),
        result("too_lossy", 0.05, 1.0),
        result("student_int8", 0.002, 0.8, parity=False),
    ]
    assert select_variant(results, 0.01)["name"] == "int8"
    assert select_variant(results, 0.01, require_parity=False)["name"] == "student_int8"
    assert select_variant(results, 0.1, require_parity=False)["name"] == "student_int8"
    assert select_variant(results, 0.0)["name"] == "original"
