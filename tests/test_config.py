"""Config loading: overrides, and errors that name the key path, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forgeml.config import (
    FAMILY_DEFAULTS,
    TASKS,
    ForgeConfig,
    config_schema,
    dump_config,
    family_defaults_used,
    load_config,
)
from forgeml.errors import ConfigError
from forgeml.starter import starter_config

BASE = {"name": "t", "task": "text-classification", "data": {"train": "train.csv"}}


def config_file(tmp_path: Path, body: dict | str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def error_of(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(source, overrides)
    return str(caught.value)


def test_defaults_fill_every_section_and_paths_resolve_against_the_file(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, BASE))
    assert config.model.backbone == "minilm"
    assert config.train.lr == pytest.approx(5e-5)
    assert config.data.train == (tmp_path / "train.csv").resolve()


def test_overrides_coerce_types_and_create_sections(tmp_path: Path) -> None:
    config = load_config(
        config_file(tmp_path, BASE),
        ["train.lr=3e-5", "train.epochs=2", "data.sample.train=100", "train.early_stopping=null", "name=other"],
    )
    assert config.train.lr == pytest.approx(3e-5)
    assert config.train.epochs == 2
    assert config.data.sample == {"train": 100}
    assert config.train.early_stopping is None
    assert config.name == "other"


def test_unknown_key_names_the_full_path_and_suggests_the_right_one() -> None:
    message = error_of({**BASE, "train": {"lrr": 0.1}})
    assert "'train.lrr'" in message
    assert "did you mean 'train.lr'" in message


def test_unknown_override_key_is_an_error_too(tmp_path: Path) -> None:
    message = error_of(config_file(tmp_path, BASE), ["model.max_lenght=64"])
    assert "model.max_lenght" in message and "model.max_length" in message


def test_wrong_type_names_path_and_value() -> None:
    message = error_of({**BASE, "train": {"lr": "fast"}})
    assert "train.lr" in message and "'fast'" in message


def test_out_of_range_names_path_value_and_bound() -> None:
    message = error_of({**BASE, "train": {"epochs": 0}})
    assert "train.epochs" in message and "greater than or equal to 1" in message and "0" in message


def test_wrong_choice_lists_the_allowed_values() -> None:
    message = error_of({**BASE, "train": {"scheduler": "exponential"}})
    assert "train.scheduler" in message and "'linear'" in message and "'cosine'" in message


def test_unknown_task_lists_tasks() -> None:
    message = error_of({**BASE, "task": "image-captioning"})
    assert "task" in message and "'tabular-classification'" in message


def test_missing_required_section() -> None:
    assert "data is required" in error_of({"name": "t", "task": "regression"})


def test_split_fractions_must_leave_training_rows() -> None:
    message = error_of({**BASE, "data": {"train": "x.csv", "split": {"validation": 0.6, "test": 0.5}}})
    assert "data.split" in message and "0.6 + 0.5" in message


def test_backbone_must_fit_the_task() -> None:
    assert "model.backbone" in error_of({**BASE, "model": {"backbone": "mlp"}})
    tabular = {**BASE, "task": "tabular-classification", "model": {"backbone": "minilm"}}
    assert "model.backbone" in error_of(tabular)


def test_early_stopping_metric_must_exist_for_the_task() -> None:
    message = error_of({**BASE, "train": {"early_stopping": {"metric": "r2"}}})
    assert "train.early_stopping.metric" in message and "'r2'" in message and "accuracy" in message


def test_pair_task_needs_text_pair() -> None:
    assert "data.text_pair" in error_of({**BASE, "task": "text-pair-classification"})


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = config_file(tmp_path, "name: t\ntask: regression\ndata:\n  train: [a.csv\n  label: y\n")
    message = error_of(path)
    assert "YAML syntax error" in message and "line 5" in message and "column" in message


def test_missing_file_and_malformed_override(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "nope.yaml")
    assert "key.path=value" in error_of(config_file(tmp_path, BASE), ["train.lr"])
    assert "is a value, not a section" in error_of(config_file(tmp_path, BASE), ["name.first=x"])


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, BASE), ["train.lr=1e-4"])
    again = ForgeConfig.model_validate(yaml.safe_load(dump_config(config)))
    assert again == config


def test_schema_describes_every_section() -> None:
    schema = config_schema()
    assert {"name", "task", "data", "model", "train", "evaluate"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("task", TASKS)
def test_starter_configs_are_valid_and_annotated(task: str, tmp_path: Path) -> None:
    text = starter_config(task)
    assert "# " in text and f"task: {task}" in text
    config = load_config(config_file(tmp_path, text))
    assert config.task == task


def test_starter_for_unknown_task_lists_choices() -> None:
    with pytest.raises(ConfigError, match="text-classification"):
        starter_config("nope")


TABULAR = {"name": "t", "task": "tabular-classification", "data": {"train": "train.csv", "label": "y"}}


def test_training_defaults_come_from_the_model_family(tmp_path: Path) -> None:
    mlp = load_config(config_file(tmp_path, TABULAR))
    encoder = load_config(config_file(tmp_path, BASE))
    for config, family in ((mlp, "mlp"), (encoder, "encoder")):
        assert config.family == family
        for key, value in FAMILY_DEFAULTS[family].items():
            section, name = (config.train.early_stopping, key.split(".")[1]) if "." in key else (config.train, key)
            assert getattr(section, name) == value, (family, key)
        assert set(config.family_defaults) == set(FAMILY_DEFAULTS[family])
    # The two families really differ where it matters: a from-scratch MLP takes far larger, more steps.
    assert mlp.train.lr == pytest.approx(1e-3) and encoder.train.lr == pytest.approx(5e-5)
    assert mlp.train.epochs > encoder.train.epochs and mlp.train.early_stopping.patience > 2
    assert mlp.train.early_stopping.metric == "loss" and encoder.train.early_stopping.metric is None
    hub = load_config({**BASE, "model": {"backbone": "some-org/some-encoder"}})
    assert hub.family == "encoder" and hub.train.lr == pytest.approx(5e-5)


def test_explicit_training_values_are_kept_and_not_called_defaults(tmp_path: Path) -> None:
    body = {**TABULAR, "train": {"lr": 0.01, "batch_size": 64, "early_stopping": {"metric": "roc_auc"}}}
    config = load_config(config_file(tmp_path, body), ["train.scheduler=cosine"])
    assert (config.train.lr, config.train.batch_size, config.train.scheduler) == (0.01, 64, "cosine")
    assert config.train.early_stopping.metric == "roc_auc"
    assert config.train.early_stopping.patience == FAMILY_DEFAULTS["mlp"]["early_stopping.patience"]
    assert config.train.epochs == FAMILY_DEFAULTS["mlp"]["epochs"]
    assert not {"lr", "batch_size", "scheduler", "early_stopping.metric"} & set(config.family_defaults)
    assert {"epochs", "early_stopping.patience"} <= set(config.family_defaults)
    # Disabled early stopping stays disabled; an explicit null asks for the family default again.
    off = load_config(config_file(tmp_path, TABULAR), ["train.early_stopping=null", "train.lr=null"])
    assert off.train.early_stopping is None and off.train.lr == FAMILY_DEFAULTS["mlp"]["lr"]


@pytest.mark.parametrize("body", [BASE, TABULAR])
def test_family_defaults_round_trip_through_the_saved_config(body: dict, tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, body))
    text = dump_config(config)
    saved = yaml.safe_load(text)["train"]
    assert saved["lr"] is not None and saved["early_stopping"]["patience"] is not None  # concrete values on disk
    (tmp_path / "config.yaml").write_text(text)
    again = load_config(tmp_path / "config.yaml")  # what `forgeml run --resume` reads
    assert again == config and again.family_defaults == config.family_defaults
    assert dump_config(again) == text
    # The card reads the saved values, not the validated config: it finds the same family defaults.
    assert family_defaults_used(saved, config.model.backbone) == config.family_defaults


def test_schema_says_which_training_keys_follow_the_family() -> None:
    train = config_schema()["$defs"]["TrainConfig"]["properties"]
    for key in ("lr", "epochs", "batch_size", "scheduler", "warmup_ratio", "weight_decay"):
        assert train[key]["default"] is None
        assert "mlp" in train[key]["description"] and "encoder" in train[key]["description"], key


@pytest.mark.parametrize(
    ("task", "family"),
    [("tabular-classification", "mlp"), ("text-classification", "encoder"), ("language-modeling", "gpt")],
)
def test_starter_shows_the_family_defaults(task: str, family: str, tmp_path: Path) -> None:
    text = starter_config(task)
    assert f"show the {family} defaults" in text
    train = yaml.safe_load(text)["train"]
    for key, value in FAMILY_DEFAULTS[family].items():
        shown = train["early_stopping"][key.split(".")[1]] if "." in key else train[key]
        assert shown == pytest.approx(value) if isinstance(value, float) else shown == value, key
    assert load_config(config_file(tmp_path, text)).family_defaults.keys() == FAMILY_DEFAULTS[family].keys()
