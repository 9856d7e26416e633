"""Run the audits a config's `audit:` section asks for.

Each audit writes its full result as JSON (and its plots) under the run's `trust/` folder and adds a
section to `trust/summary.json`, which the model card renders. The headline numbers are returned
for `metrics.json` and the run store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from torch import nn

from forgeml.config import AuditConfig, ForgeConfig
from forgeml.data.io import column
from forgeml.errors import ConfigError
from forgeml.evaluate.outputs import model_outputs
from forgeml.tasks.base import EncodedSplit, Task
from forgeml.trust import explain, fairness, membership, robustness
from forgeml.workspace import atomic_write_json, atomic_write_text

THRESHOLDS = "fairness_thresholds.json"  # in model/: applied by predict when the column is given


def run_audits(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    splits: dict[str, Dataset | None],
    encoded: dict[str, EncodedSplit],
    folder: Path,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """Run every enabled audit on the run's splits; return the headline numbers."""
    audit = config.audit or AuditConfig()
    folder.mkdir(parents=True, exist_ok=True)
    scored = "test" if splits.get("test") is not None else "validation"
    if splits.get(scored) is None:
        raise ConfigError("audit: needs a validation or test split to audit on (data.split or data.test)")
    sections: list[dict[str, Any]] = []
    headline: dict[str, Any] = {"split": scored}
    text = bool(getattr(task, "text_columns", None))
    if audit.fairness.enabled and config.is_classification:
        if config.data.sensitive:
            sections.append(_fairness(config, task, model, splits, scored, folder, model_dir, headline))
        if text and len(task.text_columns) == 1 and audit.fairness.counterfactual:
            sections.append(_counterfactual(config, task, model, splits[scored], folder, headline))
    if audit.privacy.enabled and "train" in encoded:
        # Non-members should come from the training rows' own distribution, or the attack measures the shift
        # between two files rather than memorisation: the validation split is usually carved from train.
        unseen = "validation" if "validation" in encoded else scored
        sections.append(_membership(config, task, model, encoded["train"], encoded[unseen], unseen, folder, headline))
    if audit.robustness.enabled:
        sections.append(_robustness(config, task, model, splits[scored], folder, headline))
    if audit.explain:
        explained = splits.get("validation") if splits.get("validation") is not None else splits[scored]
        if text:
            sections.append(_text_explanations(config, task, model, explained, folder, headline))
        else:
            sections.append(_tabular_explanations(config, task, model, explained, folder, headline))
    atomic_write_json(folder / "summary.json", {"sections": sections, "headline": headline})
    return headline


# --- predictions the audits share ------------------------------------------------------------------


def predict(task: Task, model: nn.Module, dataset: Dataset, batch_size: int = 64) -> dict[str, Any]:
    """The task's answers for an (unlabelled or labelled) dataset: {'label', 'probabilities'}."""
    outputs, _ = model_outputs(model, task.encode(dataset, "audit", with_targets=False), batch_size)
    return task.predictions(outputs)


def positive_label(config: ForgeConfig, task: Task) -> str:
    classes = task.target.classes
    chosen = config.audit.fairness.positive_label if config.audit else None
    if chosen is None:
        return classes[-1]
    if chosen not in classes:
        raise ConfigError(f"audit.fairness.positive_label: {chosen!r} is not a class; classes: {', '.join(classes)}")
    return chosen


def _fmt(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "undefined"
    text = f"{value:.4f}"
    return f"{text} [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else text


# --- fairness -------------------------------------------------------------------------------------


def _fairness(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    splits: dict[str, Dataset | None],
    scored: str,
    folder: Path,
    model_dir: Path | None,
    headline: dict[str, Any],
) -> dict[str, Any]:
    options = config.audit.fairness
    dataset = splits[scored]
    positive = positive_label(config, task)
    truth = [str(v) for v in column(dataset, config.data.label)]
    answers = predict(task, model, dataset)
    sensitive = {name: column(dataset, name) for name in config.data.sensitive}
    report = fairness.group_report(truth, answers["label"], sensitive, positive, options.bins, options.bootstrap)
    plots = fairness.plot_group_metrics(report, folder)
    result: dict[str, Any] = {"split": scored, "report": report}
    rows, facts = [], []
    for name, column_report in report["columns"].items():
        for group, values in column_report["groups"].items():
            rows.append(
                [name, group, values["count"], *(_fmt(values[k]) for k in ("accuracy", "selection_rate", "tpr", "fpr"))]
            )
        for measure, values in column_report["disparities"].items():
            facts.append((f"{name}: {measure.replace('_', ' ')}", _fmt(values["value"], values["ci95"])))
        headline[f"fairness.{name}.demographic_parity_difference"] = column_report["disparities"][
            "demographic_parity_difference"
        ]["value"]
    section = {
        "title": "Fairness",
        "paragraphs": [
            f"Predictions on the {scored} split ({report['rows']:,} rows) compared across the groups of each "
            f"sensitive column. Selection rate, TPR and FPR are for the class {positive!r}; brackets are 95 % "
            "bootstrap intervals."
        ],
        "facts": facts,
        "tables": [
            {
                "header": ["column", "group", "rows", "accuracy", "selection rate", "TPR", "FPR"],
                "rows": rows,
                "caption": "Metrics by group.",
            }
        ],
        "plots": [
            {"path": f"trust/{p.name}", "caption": f"Metrics by group of {p.stem.split('_', 1)[-1]}."} for p in plots
        ],
    }
    if options.mitigate:
        mitigation = _mitigate(config, task, model, splits, dataset, truth, answers, positive, folder, model_dir)
        result["mitigation"] = mitigation
        before, after = mitigation["before"], mitigation["after"]
        section["tables"].append(
            {
                "header": ["", "accuracy", "demographic parity difference", "equalized odds difference"],
                "rows": [
                    [
                        stage,
                        _fmt(values["accuracy"]),
                        _fmt(values["demographic_parity_difference"]),
                        _fmt(values["equalized_odds_difference"]),
                    ]
                    for stage, values in (("before", before), ("after", after))
                ],
                "caption": f"Mitigation ({options.mitigate} thresholds per {mitigation['column']!r} group, fitted on "
                f"validation, scored on {scored}).",
            }
        )
        headline["fairness.mitigation"] = {"before": before, "after": after, "column": mitigation["column"]}
    atomic_write_json(folder / "fairness.json", result)
    return section


def _mitigate(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    splits: dict[str, Dataset | None],
    dataset: Dataset,
    truth: list[str],
    answers: dict[str, Any],
    positive: str,
    folder: Path,
    model_dir: Path | None,
) -> dict[str, Any]:
    """Fit per-group thresholds on validation; score before/after on the audited split; save the rule."""
    options = config.audit.fairness
    name = options.mitigate_on or config.data.sensitive[0]
    classes = task.target.classes
    if len(classes) != 2:
        raise ConfigError(f"audit.fairness.mitigate: threshold mitigation needs two classes, have {len(classes)}")
    validation = splits.get("validation")
    if validation is None:
        raise ConfigError("audit.fairness.mitigate: needs a validation split to fit thresholds on")
    if name not in validation.column_names:
        raise ConfigError(f"audit.fairness.mitigate: the validation split has no column {name!r} to fit thresholds on")
    index = classes.index(positive)
    other = classes[1 - index]
    validation_scores = predict(task, model, validation)["probabilities"][:, index]
    validation_truth = [str(v) for v in column(validation, config.data.label)]
    rule = fairness.fit_thresholds(
        validation_scores, validation_truth, column(validation, name), options.mitigate, positive, bins=options.bins
    )
    rule["column"] = name
    decisions = fairness.apply_thresholds(rule, answers["probabilities"][:, index], column(dataset, name))
    adjusted = [positive if decided else other for decided in decisions]
    sensitive = {name: column(dataset, name)}
    before = fairness.group_report(truth, answers["label"], sensitive, positive, options.bins, 0)
    after = fairness.group_report(truth, adjusted, sensitive, positive, options.bins, 0)
    atomic_write_json(folder / THRESHOLDS, rule)
    if model_dir is not None:
        atomic_write_json(model_dir / THRESHOLDS, rule)

    def headline(report: dict[str, Any]) -> dict[str, Any]:
        disparities = report["columns"][name]["disparities"]
        return {
            "accuracy": report["overall"]["accuracy"],
            "demographic_parity_difference": disparities["demographic_parity_difference"]["value"],
            "equalized_odds_difference": disparities["equalized_odds_difference"]["value"],
        }

    return {
        "column": name,
        "constraint": options.mitigate,
        "rule": rule,
        "before": headline(before),
        "after": headline(after),
    }


def _counterfactual(
    config: ForgeConfig, task: Task, model: nn.Module, dataset: Dataset, folder: Path, headline: dict[str, Any]
) -> dict[str, Any]:
    options = config.audit.fairness
    positive = positive_label(config, task)
    index = task.target.classes.index(positive)
    text_column = task.text_columns[0]

    def predict_texts(texts: list[str]) -> tuple[list[str], np.ndarray]:
        answers = predict(task, model, Dataset.from_dict({text_column: texts}))
        return answers["label"], answers["probabilities"][:, index]

    texts = [t or "" for t in column(dataset, text_column)]
    report = fairness.counterfactual_flips(texts, predict_texts, positive, max_examples=options.max_examples)
    plot = fairness.plot_counterfactual(report, folder / "counterfactual.png")
    atomic_write_json(folder / "counterfactual.json", report)
    rows = [
        [
            dimension,
            values["texts"],
            values["variants"],
            _fmt(values["flip_rate"]),
            _fmt(values["mean_abs_shift"]),
            _fmt(values["max_abs_shift"]),
        ]
        for dimension, values in report["dimensions"].items()
    ]
    headline["counterfactual_flip_rate"] = {d: v["flip_rate"] for d, v in report["dimensions"].items()}
    return {
        "title": "Identity-term swaps",
        "paragraphs": [
            "Texts mentioning an identity term (gender, religion, nationality, ethnicity, disability, sexual "
            "orientation, age) were rewritten with every other term of the same group; a fair model's "
            f"prediction should not change. Shifts are in P({positive!r})."
        ],
        "tables": [
            {
                "header": ["dimension", "texts", "variants", "flip rate", "mean |shift|", "max |shift|"],
                "rows": rows,
                "caption": "Counterfactual identity swaps.",
            }
        ],
        "plots": [
            {
                "path": f"trust/{plot.name}",
                "caption": "Share of swaps that flip the prediction, and the mean probability shift.",
            }
        ],
    }


# --- privacy --------------------------------------------------------------------------------------


def _membership(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    members: EncodedSplit,
    non_members: EncodedSplit,
    unseen: str,
    folder: Path,
    headline: dict[str, Any],
) -> dict[str, Any]:
    options = config.audit.privacy
    report = membership.membership_inference(
        task, model, members, non_members, max_examples=options.max_examples, bootstrap=options.bootstrap
    )
    plot = membership.plot_membership_roc(report, folder / "membership_roc.png")
    atomic_write_json(folder / "membership.json", report)
    headline["membership_auc"] = report["auc"]
    headline["membership_non_members"] = unseen
    return {
        "title": "Privacy: membership inference",
        "paragraphs": [
            f"A loss-threshold attack tries to tell training rows from held-out rows (the {unseen} split) by the "
            "model's loss on them. AUC 0.5 means it cannot; this attack gives a lower bound on what a stronger "
            "attacker could learn.",
            membership.verdict(report),
        ],
        "facts": [
            ("AUC", _fmt(report["auc"], report.get("auc_ci95"))),
            ("TPR at 1 % FPR", _fmt(report["tpr_at_1pct_fpr"])),
            ("Membership advantage", _fmt(report["advantage"])),
            (
                "Rows compared",
                f"{report['members']['count']:,} members, {report['non_members']['count']:,} non-members",
            ),
        ],
        "plots": [{"path": f"trust/{plot.name}", "caption": "ROC of the membership-inference attack."}],
    }


# --- robustness -----------------------------------------------------------------------------------


def _robustness(
    config: ForgeConfig, task: Task, model: nn.Module, dataset: Dataset, folder: Path, headline: dict[str, Any]
) -> dict[str, Any]:
    options = config.audit.robustness
    text_report = attack = tabular_report = None
    if getattr(task, "text_columns", None):
        text_report = robustness.text_robustness(
            task, model, dataset, rates=options.rates, max_examples=options.max_examples
        )
        if config.is_classification and options.attack_examples:
            attack = robustness.word_substitution_attack(task, model, dataset, max_examples=options.attack_examples)
        report = text_report
    else:
        tabular_report = robustness.tabular_robustness(
            task, model, dataset, sigmas=options.sigmas, max_examples=options.max_examples
        )
        report = tabular_report
    robustness.plot_robustness(report, folder / "robustness.png")
    atomic_write_json(folder / "robustness.json", {"text": text_report, "attack": attack, "tabular": tabular_report})
    change = "flip_rate" if report["kind"] == "classification" else "mean_abs_change"
    headline["robustness_worst_" + change] = max(r[change] for r in report["results"])
    if attack is not None:
        headline["attack_success_rate"] = attack["success_rate"]
    return robustness.robustness_section(text_report, attack, tabular_report, "trust/robustness.png")


# --- explanations ---------------------------------------------------------------------------------


def _text_explanations(
    config: ForgeConfig, task: Task, model: nn.Module, dataset: Dataset, folder: Path, headline: dict[str, Any]
) -> dict[str, Any]:
    count = config.audit.explain
    inputs = _inputs(task, dataset)
    chosen = _confident_examples(config, task, model, dataset, count)
    items = [inputs[i] for i in chosen]
    explanations = explain.explain_texts(task, model, items)
    fragment = explain.explanation_html(explanations)
    atomic_write_text(folder / "explanations.html", fragment)
    faithful = explain.faithfulness(task, model, items, k=2)
    atomic_write_json(
        folder / "explanations.json", {"explanations": [e.to_dict() for e in explanations], "faithfulness": faithful}
    )
    headline["faithfulness"] = faithful
    return {
        "title": "Explanations",
        "paragraphs": [
            f"Integrated-gradients word attributions (Captum) for {len(items)} validation examples: the most "
            "confidently right and the most confidently wrong. Green words push toward the predicted class, red "
            "ones away from it. Faithfulness: deleting the top-attributed words should lower the predicted "
            "class's probability more than deleting random words."
        ],
        "facts": [
            (key.replace("_", " "), _fmt(value) if isinstance(value, float) else str(value))
            for key, value in faithful.items()
            if not isinstance(value, dict | list)
        ],
        "fragment": "trust/explanations.html",
    }


def _tabular_explanations(
    config: ForgeConfig, task: Task, model: nn.Module, dataset: Dataset, folder: Path, headline: dict[str, Any]
) -> dict[str, Any]:
    importance = explain.permutation_importance(task, model, dataset)
    plot = explain.plot_importance(importance, folder / "feature_importance.png")
    rows = dataset.select(_confident_examples(config, task, model, dataset, config.audit.explain))
    attributions = explain.explain_tabular(task, model, rows)
    atomic_write_json(folder / "explanations.json", {"permutation_importance": importance, "rows": attributions})
    headline["top_features"] = list(importance)[:5]
    return {
        "title": "Explanations",
        "paragraphs": [
            f"Permutation importance: how much {task.primary_metric} drops when one column is shuffled "
            "(mean ± std over 5 shuffles). Per-row integrated-gradients attributions are in trust/explanations.json."
        ],
        "tables": [
            {
                "header": ["feature", "mean drop", "std"],
                "rows": [[name, _fmt(v["mean"]), _fmt(v["std"])] for name, v in importance.items()],
                "caption": "Permutation importance.",
            }
        ],
        "plots": [{"path": f"trust/{plot.name}", "caption": "Permutation importance of each input column."}],
    }


def _inputs(task: Task, dataset: Dataset) -> list[Any]:
    columns = [[v or "" for v in column(dataset, name)] for name in task.text_columns]
    return columns[0] if len(columns) == 1 else list(zip(*columns, strict=True))


def _confident_examples(config: ForgeConfig, task: Task, model: nn.Module, dataset: Dataset, count: int) -> list[int]:
    """Rows to explain: the most confident correct predictions and the most confident mistakes."""
    count = min(count, len(dataset))
    if not config.is_classification:
        return list(range(count))
    answers = predict(task, model, dataset)
    confidence = answers["probabilities"].max(axis=1)
    correct = np.asarray(answers["label"]) == np.asarray([str(v) for v in column(dataset, config.data.label)])
    order = np.argsort(-confidence, kind="stable")
    wrong = [int(i) for i in order if not correct[i]][: count // 2]
    right = [int(i) for i in order if correct[i]][: count - len(wrong)]
    return right + wrong
