"""The model card: written from a run directory, self-contained, escaped, and rendered by a real browser."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from forgeml.report.card import write_card

try:  # tests/ is on sys.path when it is not a package, the repository root when it is
    import chromium
except ImportError:  # pragma: no cover
    from tests import chromium

NAME = "sst2-minilm"
DESCRIPTION = "Flags negative product reviews for the support team. <script>alert('x')</script> & more."
CLASSES = ["negative", "positive"]
CONFUSION = [[401, 27], [38, 406]]


def _config(description: str = DESCRIPTION) -> dict:
    return {
        "name": NAME,
        "description": description,
        "task": "text-classification",
        "data": {
            "train": "/data/sst2/train.csv",
            "validation": "/data/sst2/validation.csv",
            "test": None,
            "text": "sentence",
            "text_pair": None,
            "label": "label",
            "split": {"validation": 0.1, "test": 0.1, "stratify": True, "seed": 42},
            "clean": {"dedupe": True, "drop_empty": True},
        },
        "model": {"backbone": "minilm", "max_length": 128, "pooling": "mean", "dropout": 0.1},
        "train": {
            "epochs": 3,
            "max_steps": None,
            "batch_size": 32,
            "lr": 5.0e-5,
            "optimizer": "adamw",
            "scheduler": "linear",
            "warmup_ratio": 0.06,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "grad_accum_steps": 1,
            "group_by_length": True,
            "early_stopping": {"patience": 2, "metric": "f1"},
            "seed": 42,
        },
        "evaluate": {"cross_validation": None, "batch_size": 64},
    }


def _profile() -> dict:
    lengths = {"p5": 12, "p25": 40, "p50": 71, "p75": 110, "p95": 180, "p99": 230, "p100": 268, "mean": 78.4}
    return {
        "task": "text-classification",
        "inputs": ["sentence"],
        "label": "label",
        "sources": {
            "train": "/data/sst2/train.csv",
            "validation": "/data/sst2/validation.csv",
            "test": {"split_from_train": {"fraction": 0.1, "stratify": True, "seed": 42}},
        },
        "cleaning": {
            "train": {
                "rows_in": 8000,
                "normalized": 112,
                "dropped_empty": 3,
                "dropped_duplicates": 41,
                "conflicting_label_inputs": 2,
                "conflicting_label_rows": 4,
                "rows_out": 7952,
            }
        },
        "splits": {
            "train": {"rows": 7080, "class_counts": {"negative": 3150, "positive": 3930}, "sentence_chars": lengths},
            "validation": {"rows": 872, "class_counts": {"negative": 428, "positive": 444}},
            "test": {"rows": 872, "class_counts": {"negative": 428, "positive": 444}},
        },
        "sha256": {"train": "a" * 64, "validation": "b" * 64, "test": "c" * 64},
        "tokens": {"train": {"p50": 18, "p95": 44, "p100": 140, "truncated": 3}},
    }


def _split_metrics(accuracy: float) -> dict:
    return {
        "accuracy": accuracy,
        "f1": 0.92501234,
        "precision": 0.9261,
        "recall": 0.9249,
        "log_loss": 0.21034,
        "roc_auc": 0.97312,
        "per_class": {
            "negative": {"precision": 0.9134, "recall": 0.9369, "f1": 0.925, "support": 428},
            "positive": {"precision": 0.9376, "recall": 0.9144, "f1": 0.9259, "support": 444},
        },
        "confusion_matrix": CONFUSION,
        "classes": CLASSES,
    }


def _metrics() -> dict:
    return {
        "task": "text-classification",
        "primary_metric": "f1",
        "validation": _split_metrics(0.93187),
        "test": _split_metrics(0.92546),
        "cross_validation": {
            "k": 3,
            "metrics": {"f1": {"mean": 0.9187, "std": 0.0043, "folds": [0.9141, 0.9176, 0.9244]}},
        },
        "training": {
            "steps": 663,
            "best_step": 442,
            "best_metric": 0.9312,
            "watched_metric": "f1",
            "stopped_early": True,
            "samples_per_second": 17.3,
            "mfu": 0.4912,
            "seconds": 1264.5,
        },
    }


def _save_confusion_matrix(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4, 3.5), dpi=100)
    ax.imshow(CONFUSION, cmap="Blues")
    for i, row in enumerate(CONFUSION):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(range(2), CLASSES)
    ax.set_yticks(range(2), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _save_curves(path: Path) -> None:
    steps = list(range(0, 663, 13))
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.plot(steps, [0.7 * 0.995**s + 0.1 for s in steps], label="train loss")
    ax.plot(steps, [0.93 - 0.4 * 0.99**s for s in steps], label="validation f1")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_yaml(path: Path, payload: dict) -> None:
    path.write_text(yaml.safe_dump(payload, sort_keys=False), encoding="utf-8")


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / NAME / "20260101-120000-abcd"
    (run / "plots").mkdir(parents=True)
    _write_yaml(run / "config.yaml", _config())
    _write_json(run / "data_profile.json", _profile())
    _write_json(run / "metrics.json", _metrics())
    _write_json(run / "manifest.json", {"algorithm": "sha256", "files": {"model/model.safetensors": "d" * 64}})
    _save_confusion_matrix(run / "plots" / "confusion_matrix.png")
    _save_curves(run / "plots" / "curves.png")
    return run


def test_card_is_written_self_contained_and_escaped(run_dir: Path) -> None:
    md_path, html_path = write_card(run_dir)
    assert (md_path, html_path) == (run_dir / "card.md", run_dir / "card.html")
    markdown, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")

    assert markdown.startswith(f"# Model card: {NAME}\n")
    assert "Flags negative product reviews for the support team." in markdown
    assert "&lt;script&gt;" in markdown and "<script" not in markdown  # Markdown renderers pass raw HTML on
    for value in (
        "0.9319",
        "0.9255",
        "0.9250",
        "0.9731",
        "0.2103",
        "| 0.9250 | 428 |",
        "0.9187 ± 0.0043",
        "49.1 %",
        "aaaaaaaaaaaa…",
    ):
        assert value in markdown, value
    assert "d" * 64 in markdown  # the weights hash, in full
    assert "(plots/curves.png)" in markdown and "(plots/confusion_matrix.png)" in markdown
    assert markdown.index("curves.png") < markdown.index("confusion_matrix.png")  # training before results

    # Self-contained: no network references, no scripts, plots inlined byte for byte.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page.lower()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    expected = {(run_dir / "plots" / name).read_bytes() for name in ("curves.png", "confusion_matrix.png")}
    assert {base64.b64decode(image) for image in images} == expected

    # User text is escaped, never executed.
    assert "<script" not in page.lower()
    assert html.escape(DESCRIPTION) in page
    assert f"<title>Model card: {NAME}</title>" in page


def test_card_with_only_config(tmp_path: Path) -> None:
    _write_yaml(tmp_path / "config.yaml", _config(description=""))
    md_path, html_path = write_card(tmp_path)
    markdown, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")

    assert f"# Model card: {NAME}" in markdown
    assert "No intended use was given" in markdown
    assert "## Model details" in markdown and "minilm" in markdown
    assert "## Training set-up" in markdown and "## Caveats and recommendations" in markdown
    assert "## Quantitative analyses" not in markdown and "## Plots" not in markdown
    assert "## Training and evaluation data" not in markdown
    assert "## Factors" in markdown and "No sensitive attributes" in markdown
    assert "## Ethical considerations" in markdown and "No fairness, privacy" in markdown
    assert "data:image" not in page
    assert "no evaluation on held-out data" in markdown
    assert page.rstrip().endswith("</html>")


def test_regression_card(tmp_path: Path) -> None:
    config = {**_config(), "task": "regression"}
    _write_yaml(tmp_path / "config.yaml", config)
    target = {"mean": 2.5, "std": 1.1, "min": 0.0, "max": 5.0}
    _write_json(tmp_path / "data_profile.json", {"splits": {"train": {"rows": 5000, "target": target}}})
    scores = {"mae": 0.61234, "rmse": 0.80123, "mse": 0.64197, "r2": 0.48712}
    _write_json(tmp_path / "metrics.json", {"primary_metric": "rmse", "test": scores})
    markdown = write_card(tmp_path)[0].read_text(encoding="utf-8")

    assert "| rmse (primary) | 0.8012 |" in markdown
    assert "0.4871" in markdown and "0.6123" in markdown
    assert "Target distribution" in markdown and "per class" not in markdown.lower()


def test_missing_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"config\.yaml"):
        write_card(tmp_path)


def test_chromium_renders_card(run_dir: Path, tmp_path: Path) -> None:
    if chromium.find_chromium() is None:
        pytest.skip("chromium not installed; `make test` installs it")
    html_path = write_card(run_dir)[1]

    dom = chromium.dump_dom(html_path)
    title = re.search(r"<title>(.*?)</title>", dom, re.DOTALL)
    assert title and html.unescape(title.group(1)) == f"Model card: {NAME}"

    # The card has no scripts of its own, so a copy with one appended reports how many images decoded.
    probe = tmp_path / "probe.html"
    counter = (
        "<script>window.addEventListener('load', () => { document.title += ' | images=' + "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });</script>"
    )
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", counter + "</body>"), encoding="utf-8")
    decoded = re.search(r"\| images=(\d+)</title>", chromium.dump_dom(probe))
    assert decoded, "the probe script did not run"
    assert int(decoded.group(1)) == len(list((run_dir / "plots").glob("*.png")))

    shot = chromium.screenshot(html_path, tmp_path / "card.png")
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_training_settings_name_family_defaults_and_the_watched_metric(tmp_path: Path) -> None:
    config = _config()
    config["task"] = "tabular-classification"
    config["model"] = {"backbone": "mlp", "hidden_sizes": [128, 64], "dropout": 0.1}
    config["train"].update(lr=1.0e-3, batch_size=256, epochs=100, scheduler="constant", warmup_ratio=0.0)
    config["train"]["early_stopping"] = {"patience": 5, "metric": "loss"}
    _write_yaml(tmp_path / "config.yaml", config)
    markdown = write_card(tmp_path)[0].read_text(encoding="utf-8")
    assert "| Learning rate | 0.001 (default for mlp) |" in markdown
    assert "| Epochs | 100 (default for mlp) |" in markdown
    assert "| Batch size | 256 |" in markdown  # set in the config: no family mark
    assert "| Early stopping | patience 5 (default for mlp) on validation loss (default for mlp) |" in markdown

    # No metric named: the card says which one training watched, never "on None".
    config["train"]["early_stopping"] = {"patience": 2, "metric": None}
    _write_yaml(tmp_path / "config.yaml", config)
    _write_json(tmp_path / "metrics.json", _metrics())
    markdown = write_card(tmp_path)[0].read_text(encoding="utf-8")
    assert "| Early stopping | patience 2 on validation f1 (the task's primary metric) |" in markdown
    assert "None" not in markdown
