"""Adversarial training (train.adversarial: FGM on word embeddings): the perturbation has the
configured size and points uphill, training with it still learns and leaves no hooks behind,
and it is refused where there are no word embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import forgeml
from forgeml.errors import ConfigError
from forgeml.models.hf import TextModel
from forgeml.train.adversarial import EmbeddingAdversary

from conftest import write_csv
from test_train import tabular_config, tabular_rows


def test_perturbation_has_size_epsilon_per_input_and_raises_the_loss(tiny_backbone: Path) -> None:
    torch.manual_seed(0)
    model = TextModel.from_pretrained(str(tiny_backbone), num_outputs=2)
    model.eval()  # no dropout: the only difference between the passes is the perturbation
    adversary = EmbeddingAdversary(model, epsilon=0.5)
    inputs = {"input_ids": torch.randint(5, 40, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    targets = torch.tensor([0, 1, 1, 0])
    clean = torch.nn.functional.cross_entropy(model(**inputs), targets)
    clean.backward()
    with adversary.perturbed():
        attacked = torch.nn.functional.cross_entropy(model(**inputs), targets)
    assert attacked.item() > clean.item()  # the gradient direction hurts the model
    with torch.no_grad():
        again = torch.nn.functional.cross_entropy(model(**inputs), targets)
    assert again.item() == pytest.approx(clean.item(), abs=1e-6)  # outside the block: clean again
    embeddings = model.encoder.get_input_embeddings()
    adversary.remove()
    assert not embeddings._forward_hooks


def test_perturbation_norm_is_epsilon_for_every_input(tiny_backbone: Path) -> None:
    model = TextModel.from_pretrained(str(tiny_backbone), num_outputs=2)
    model.eval()
    adversary = EmbeddingAdversary(model, epsilon=0.7)
    inputs = {"input_ids": torch.randint(5, 40, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    torch.nn.functional.cross_entropy(model(**inputs), torch.tensor([0, 1, 0])).backward()
    embeddings = model.encoder.get_input_embeddings()
    with adversary.perturbed():
        perturbation = adversary._perturbation.clone()
        clean = embeddings(inputs["input_ids"])  # the hook adds the perturbation to the layer's output
        assert torch.allclose(clean - embeddings.weight[inputs["input_ids"]], perturbation)
    assert torch.allclose(perturbation.flatten(1).norm(dim=1), torch.full((3,), 0.7), atol=1e-5)
    adversary.remove()


def test_needs_a_clean_backward_pass_first(tiny_backbone: Path) -> None:
    adversary = EmbeddingAdversary(TextModel.from_pretrained(str(tiny_backbone), num_outputs=2), epsilon=1.0)
    with pytest.raises(RuntimeError, match="clean forward and backward"), adversary.perturbed():
        pass


def test_adversarial_training_learns_and_the_card_compares_it_with_a_baseline(
    text_config: dict, sentiment_model, tmp_path: Path
) -> None:
    # The tiny model's token embeddings have norm ~0.1 (MiniLM's ~1.1): a proportionate budget.
    text_config["train"].update(adversarial={"method": "fgm", "epsilon": 0.05}, threads=1)
    result = forgeml.run(text_config, workspace=tmp_path)
    assert result.metrics["test"]["accuracy"] >= 0.9
    model = forgeml.load(result.run_dir).model
    assert not model.encoder.get_input_embeddings()._forward_hooks

    baseline = sentiment_model.run.path  # the same task trained without adversarial training
    headline = forgeml.audit(result.run_dir, baseline=baseline)
    saved = json.loads((result.run_dir / "trust" / "robustness.json").read_text())
    before, after = saved["baseline"]["report"], saved["text"]
    assert saved["baseline"]["run"] == str(baseline)
    assert before["examples"] == after["examples"] and before["seed"] == after["seed"]  # the same rows
    assert [r["perturbation"] for r in before["results"]] == [r["perturbation"] for r in after["results"]]
    assert headline["baseline_attack_success_rate"] == saved["baseline"]["attack"]["success_rate"]
    card = (result.run_dir / "card.md").read_text()
    assert "FGM on word embeddings, ε = 0.05" in card
    assert "Before (the baseline run) and after (this run), same rows." in card
    assert "accuracy before | accuracy after" in card and "attack: success rate before → after" in card


def test_baseline_of_another_task_is_refused(sentiment_model, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(120))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"].update(epochs=1, threads=1)
    tabular = forgeml.run(config, workspace=tmp_path)
    with pytest.raises(ConfigError, match=r"audit\.robustness\.baseline: .* same task"):
        forgeml.audit(tabular.run_dir, baseline=sentiment_model.run.path)  # the shared model's run stays untouched


def test_adversarial_training_needs_a_text_task(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", tabular_rows(50))
    config = tabular_config(path, "tabular-classification", "label")
    config["train"]["adversarial"] = {"epsilon": 1.0}
    with pytest.raises(ConfigError, match=r"train\.adversarial.*text task"):
        forgeml.load_config(config)
    config["task"] = "text-classification"
    config["model"] = {}
    config["train"]["adversarial"] = {"method": "pgd"}
    with pytest.raises(ConfigError, match=r"train\.adversarial\.method"):
        forgeml.load_config(config)
