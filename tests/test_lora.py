"""LoRA adapters on a text classifier's encoder: only the adapters and the new head train, the saved model
is the merged one (it scores exactly as the run reported) and the adapter is kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModel

import forgeml
from forgeml.api import evaluate
from forgeml.config import load_config
from forgeml.errors import ConfigError
from forgeml.models.lora import load_adapter

from conftest import sentiment_rows, write_csv


def test_lora_on_an_encoder_trains_adapters_and_head_and_saves_the_merged_model(
    text_config: dict, tiny_backbone: Path, sentiment_csv: Path, tmp_path: Path
):
    test_file = write_csv(tmp_path / "test.csv", sentiment_rows(100, seed=7))
    text_config["data"] = {"train": str(sentiment_csv), "test": str(test_file), "split": {"validation": 0.15}}
    text_config["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    text_config["train"] |= {"threads": 1, "epochs": 8, "lr": 2e-2}
    result = forgeml.run(text_config, workspace=tmp_path)
    sizes = result.metrics["model"]
    hidden, layers = 32, 2  # the tiny backbone's width and depth (conftest)
    adapters = layers * 2 * 4 * (hidden + hidden)  # query and value: A (4 x 32) and B (32 x 4) each
    head = hidden * 2 + 2  # a linear layer to the two classes
    assert sizes["trainable_parameters"] == adapters + head
    assert (result.run_dir / "model" / "adapter" / "adapter_model.safetensors").is_file()
    # The model saved (the merged one) scores the test file exactly as the run reported.
    assert evaluate(result.run_dir, test_file)["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert result.metrics["test"]["accuracy"] >= 0.8
    adapter = load_adapter(AutoModel.from_pretrained(tiny_backbone), result.run_dir / "model" / "adapter")
    assert any("lora_B" in name and weight.abs().max() > 0 for name, weight in adapter.named_parameters())
    card = (result.run_dir / "card.md").read_text()
    assert "rank 4, alpha 8 on query, value" in card and "Trained parameters" in card
    assert json.loads((result.run_dir / "model" / "task.json").read_text())["model"]["lora"]["r"] == 4


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match=r"model\.lora\.r"):
        load_config({"task": "text-classification", "data": {"train": "x.csv"}, "model": {"lora": {"r": 0}}})
    with pytest.raises(ConfigError, match=r"model\.lora\.merge"):
        load_config({"task": "text-classification", "data": {"train": "x.csv"}, "model": {"lora": {"merge": False}}})
    with pytest.raises(ConfigError, match=r"model\.lora"):
        load_config({"task": "tabular-classification", "data": {"train": "x.csv"}, "model": {"lora": {}}})


def test_a_classifier_run_is_refused_as_a_backbone_with_a_reason(sentiment_model, text_config: dict, tmp_path: Path):
    text_config["model"]["backbone"] = str(sentiment_model.run.path)
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        forgeml.run(text_config, workspace=tmp_path)
