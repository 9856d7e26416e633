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
    external: Dataset | None = None,
    external_name: str = "the external file",
) -> dict[str, Any]:
    """Run every enabled audit on the run's splits; return the headline numbers.

    With `external` (rows of another file, e.g. `forgeml audit --data people.csv`), fairness, identity swaps
    and robustness score those rows instead of the test split; membership inference and explanations
    keep using the run's own splits, and fitted fairness thresholds are left alone. That file may lack
    the label column: whatever needs labels is then skipped, and every skipped audit is listed in
    `summary.json` (and the card) with the reason.
    """
    audit = config.audit or AuditConfig()
    folder.mkdir(parents=True, exist_ok=True)
    if audit.memorization is not None:  # a language model: what it memorised of its training text
        section, headline = _memorization(audit.memorization, task, model, splits, folder)
        atomic_write_json(folder / "summary.json", {"sections": [section], "skipped": [], "headline": headline})
        return headline
    if external is not None:
        scored, audited, where = "external", external, external_name
    else:
        scored = "test" if splits.get("test") is not None else "validation"
        if splits.get(scored) is None:
            raise ConfigError("audit: needs a validation or test split to audit on (data.split or data.test)")
        audited, where = splits[scored], f"the {scored} split"
    labelled = config.data.label in audited.column_names
    unlabelled = f"{where} has no label column {config.data.label!r}"
    sections: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    headline: dict[str, Any] = {"split": scored}
    if external is not None:
        headline["data"] = external_name
    text = bool(getattr(task, "text_columns", None))
    if audit.fairness.enabled and config.is_classification:
        if config.data.sensitive:
            mitigate = audit.fairness.mitigate if external is None else None
            if audit.fairness.mitigate and mitigate is None:
                skipped.append(
                    _skip(
                        "Fairness mitigation",
                        "thresholds are fitted on the run's own validation split; auditing another file leaves "
                        "them as they are",
                    )
                )
            sections.append(
                _fairness(config, task, model, splits, audited, scored, where, folder, model_dir, headline, mitigate)
            )
            if not labelled:
                skipped.append(_skip("Fairness: accuracy, TPR, FPR, equalized odds", unlabelled))
        if text and audit.fairness.counterfactual:
            sections.append(_counterfactual(config, task, model, audited, folder, headline))
    if audit.privacy.enabled and "train" in encoded:
        # Non-members should come from the training rows' own distribution, or the attack measures the shift
        # between two files rather than memorisation: the validation split is usually carved from train.
        unseen = next((name for name in ("validation", "test") if name in encoded), None)
        if unseen is None:
            skipped.append(
                _skip(
                    "Privacy: membership inference",
                    "the run has no validation or test split of held-out rows to compare the training rows with",
                )
            )
        else:
            sections.append(
                _membership(config, task, model, encoded["train"], encoded[unseen], unseen, folder, headline)
            )
    image = is_image_task(task)
    if audit.robustness.enabled and image:
        sections.append(_image_robustness(config, task, model, audited, labelled, where, folder, headline))
    elif audit.robustness.enabled:
        sections.append(_robustness(config, task, model, audited, labelled, unlabelled, folder, headline, skipped))
    if audit.explain:
        own_name = "validation" if splits.get("validation") is not None else "test"
        own = splits.get(own_name)
        explained, explained_from = (own, f"the {own_name} split") if own is not None else (audited, where)
        if text and not getattr(task, "explainable", True):
            skipped.append(
                _skip("Explanations", "an ensemble has no single model's words to attribute (explain a member)")
            )
        elif text:
            if config.data.label not in explained.column_names:
                skipped.append(
                    _skip(
                        "Explanations: most confidently right and wrong examples",
                        f"{unlabelled}; the most confident predictions are explained instead",
                    )
                )
            sections.append(_text_explanations(config, task, model, explained, explained_from, folder, headline))
        elif image:
            sections.append(_image_explanations(config, task, model, explained, explained_from, folder, headline))
        elif config.data.label in explained.column_names:
            sections.append(_tabular_explanations(config, task, model, explained, folder, headline))
        else:
            skipped.append(
                _skip(
                    "Explanations",
                    f"permutation importance needs labels (it is the drop in {task.primary_metric}); {unlabelled}",
                )
            )
    if skipped:
        headline["skipped"] = {entry["audit"]: entry["reason"] for entry in skipped}
    atomic_write_json(folder / "summary.json", {"sections": sections, "skipped": skipped, "headline": headline})
    return headline


def _memorization(
    options: dict[str, Any], task: Task, model: nn.Module, splits: dict[str, Dataset | None], folder: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Canary exposure, verbatim extraction and window membership inference (trust/memorization.py)."""
    from forgeml.trust.memorization import audit_memorization, card_section, plan_canaries

    held_out_name = next((name for name in ("validation", "test") if splits.get(name) is not None), None)
    if held_out_name is None:
        raise ConfigError("audit.memorization: needs held-out text (a validation or test split) to compare with")
    train_texts, held_out = column(splits["train"], "text"), column(splits[held_out_name], "text")
    # The canaries are planned from the options alone, so these are the ones the data step inserted.
    result = audit_memorization(
        model.lm, task.tokenizer, train_texts, held_out, options, folder, plan_canaries(options)
    )
    atomic_write_json(folder / "memorization.json", result)
    headline: dict[str, Any] = {"split": held_out_name}
    table = result["canaries"].get("table") or []
    if table:
        headline["canary_exposure_bits"] = {str(row["repetitions"]): row["mean_exposure"] for row in table}
    headline["extraction_rate"] = result["extraction"]["train"]["rate"]
    headline["extraction_rate_held_out"] = result["extraction"]["held_out"]["rate"]
    headline["membership_auc"] = result["membership"]["auc"]
    return card_section(result), headline


def _skip(audit: str, reason: str) -> dict[str, str]:
    return {"audit": audit, "reason": reason}


def is_image_task(task: Task) -> bool:
    """Whether the model takes pixels (image-classification): attacks and saliency then work in pixel space."""
    return task.name == "image-classification"


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
    dataset: Dataset,
    scored: str,
    where: str,
    folder: Path,
    model_dir: Path | None,
    headline: dict[str, Any],
    mitigate: str | None,
) -> dict[str, Any]:
    """Group metrics on `dataset` (the `scored` split, described as `where` in the card)."""
    options = config.audit.fairness
    positive = positive_label(config, task)
    labelled = config.data.label in dataset.column_names
    truth = [str(v) for v in column(dataset, config.data.label)] if labelled else None
    answers = predict(task, model, dataset)
    scores = answers["probabilities"][:, task.target.classes.index(positive)]
    sensitive = {name: column(dataset, name) for name in config.data.sensitive}
    report = fairness.group_report(
        truth, answers["label"], sensitive, positive, options.bins, options.bootstrap, scores=scores
    )
    plots = fairness.plot_group_metrics(report, folder)
    result: dict[str, Any] = {"split": scored, "data": where, "report": report}
    measures = ("accuracy", "selection_rate", "tpr", "fpr") if labelled else ("selection_rate",)
    rows, facts = [], []
    for name, column_report in report["columns"].items():
        for group, values in column_report["groups"].items():
            rows.append([name, group, values["count"], *(_fmt(values[k]) for k in (*measures, "mean_probability"))])
        for measure, values in column_report["disparities"].items():
            facts.append((f"{name}: {measure.replace('_', ' ')}", _fmt(values["value"], values["ci95"])))
        headline[f"fairness.{name}.demographic_parity_difference"] = column_report["disparities"][
            "demographic_parity_difference"
        ]["value"]
    paragraphs = [
        f"Predictions on {where} ({report['rows']:,} rows) compared across the groups of each sensitive column. "
        + (
            f"Selection rate, TPR and FPR are for the class {positive!r}"
            if labelled
            else f"Selection rate is the share predicted {positive!r}"
        )
        + f"; mean P({positive!r}) is the model's average probability for it. Brackets are 95 % bootstrap intervals."
    ]
    if not labelled:
        paragraphs.append(
            f"Labels were absent: {where} has no label column {config.data.label!r}, so accuracy, TPR, FPR and "
            "equalized odds, which need the true labels, were not computed. Selection rates and demographic parity "
            "compare what the model decides for each group, not whether it decides rightly."
        )
    header = ["column", "group", "rows", *(_MEASURE_NAMES[k] for k in measures), f"mean P({positive})"]
    section = {
        "title": "Fairness",
        "paragraphs": paragraphs,
        "facts": facts,
        "tables": [{"header": header, "rows": rows, "caption": "Metrics by group."}],
        "plots": [
            {"path": f"trust/{p.name}", "caption": f"Metrics by group of {p.stem.split('_', 1)[-1]}."} for p in plots
        ],
    }
    if mitigate:
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
                "caption": f"Mitigation ({mitigate} thresholds per {mitigation['column']!r} group, fitted on "
                f"validation, scored on {where}).",
            }
        )
        headline["fairness.mitigation"] = {"before": before, "after": after, "column": mitigation["column"]}
    atomic_write_json(folder / "fairness.json", result)
    return section


_MEASURE_NAMES = {"accuracy": "accuracy", "selection_rate": "selection rate", "tpr": "TPR", "fpr": "FPR"}


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


def identity_swaps(
    task: Task, model: nn.Module, dataset: Dataset, positive: str | None = None, max_examples: int | None = None
) -> dict[str, Any]:
    """`fairness.counterfactual_flips` on a text model's inputs: single texts, or pairs swapped in both texts.

    Shifts are in P(`positive`) when it is given, else in the probability of each original's predicted class.
    """
    columns, classes = task.text_columns, task.target.classes

    def predict_inputs(inputs: list) -> tuple[list[str], np.ndarray]:
        rows = (
            {columns[0]: inputs}
            if len(columns) == 1
            else {c: [pair[i] for pair in inputs] for i, c in enumerate(columns)}
        )
        answers = predict(task, model, Dataset.from_dict(rows))
        probabilities = answers["probabilities"]
        return answers["label"], probabilities if positive is None else probabilities[:, classes.index(positive)]

    return fairness.counterfactual_flips(_inputs(task, dataset), predict_inputs, positive, max_examples=max_examples)


def _counterfactual(
    config: ForgeConfig, task: Task, model: nn.Module, dataset: Dataset, folder: Path, headline: dict[str, Any]
) -> dict[str, Any]:
    columns = task.text_columns
    # A binary single-text model keeps its shifts in P(positive class). Pairs (entailment / neutral /
    # contradiction) and multi-class tasks have no one favourable class: the shift is in the probability of
    # the class the original was given.
    positive = positive_label(config, task) if len(columns) == 1 and len(task.target.classes) == 2 else None
    report = identity_swaps(task, model, dataset, positive, config.audit.fairness.max_examples)
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
    if len(columns) == 1:
        rewritten = "Texts mentioning an identity term"
    else:
        rewritten = f"Pairs where either text ({columns[0]!r} or {columns[1]!r}) mentions an identity term"
    shifted = f"P({positive!r})" if positive else "the probability of the class predicted for the original"
    paragraph = (
        f"{rewritten} (gender, religion, nationality, ethnicity, disability, sexual orientation, age) were rewritten "
        "with every other term of the same group"
        + ("; both texts of a pair get the same substitution" if len(columns) > 1 else "")
        + f"; a fair model's prediction should not change. Shifts are in {shifted}."
    )
    return {
        "title": "Identity-term swaps",
        "paragraphs": [paragraph],
        "tables": [
            {
                "header": [
                    "dimension",
                    "texts" if len(columns) == 1 else "pairs",
                    "variants",
                    "flip rate",
                    "mean |shift|",
                    "max |shift|",
                ],
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
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    labelled: bool,
    unlabelled: str,
    folder: Path,
    headline: dict[str, Any],
    skipped: list[dict[str, str]],
) -> dict[str, Any]:
    """Noise probes on `dataset`; without labels only how often the answers change (no accuracy, no attack)."""
    options = config.audit.robustness
    text_report = attack = tabular_report = None
    if not labelled:
        metric = "accuracy" if config.is_classification else "RMSE"
        skipped.append(_skip(f"Robustness: {metric} under noise", unlabelled))
    if getattr(task, "text_columns", None):
        text_report = robustness.text_robustness(
            task, model, dataset, rates=options.rates, max_examples=options.max_examples
        )
        if config.is_classification and options.attack_examples:
            if not hasattr(task, "tokenizer"):  # an ensemble: each member has its own
                skipped.append(
                    _skip(
                        "Robustness: word-substitution attack",
                        "it searches one model's input embeddings for substitutes; an ensemble's members have one "
                        "each (audit a member)",
                    )
                )
            elif labelled:
                attack = robustness.word_substitution_attack(task, model, dataset, max_examples=options.attack_examples)
            else:  # the attack starts from the rows the model gets right
                skipped.append(_skip("Robustness: word-substitution attack", unlabelled))
        report = text_report
    else:
        tabular_report = robustness.tabular_robustness(
            task, model, dataset, sigmas=options.sigmas, max_examples=options.max_examples
        )
        report = tabular_report
    robustness.plot_robustness(report, folder / "robustness.png")
    baseline = _robustness_baseline(config, task, dataset, attack is not None) if options.baseline else None
    saved = {"text": text_report, "attack": attack, "tabular": tabular_report, "baseline": baseline}
    atomic_write_json(folder / "robustness.json", saved)
    change = "flip_rate" if report["kind"] == "classification" else "mean_abs_change"
    headline["robustness_worst_" + change] = max(r[change] for r in report["results"])
    if attack is not None:
        headline["attack_success_rate"] = attack["success_rate"]
    section = robustness.robustness_section(text_report, attack, tabular_report, "trust/robustness.png")
    if baseline is not None:
        headline["baseline_worst_" + change] = max(r[change] for r in baseline["report"]["results"])
        section["paragraphs"].append(
            f"Before and after: the baseline run {baseline['run']} got the same perturbations of the same rows"
            + (" and the same attack." if baseline["attack"] else ".")
        )
        section["tables"].append(robustness.comparison_table(baseline["report"], report))
        if baseline["attack"] is not None:
            before, after = baseline["attack"]["success_rate"], attack["success_rate"]
            headline["baseline_attack_success_rate"] = before
            section["facts"].append(["attack: success rate before → after", f"{_fmt(before)} → {_fmt(after)}"])
    return section


def _image_robustness(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    labelled: bool,
    where: str,
    folder: Path,
    headline: dict[str, Any],
) -> dict[str, Any]:
    """FGSM and PGD accuracy over `audit.robustness.epsilons` on up to `max_examples` seeded rows of `dataset`;
    without labels the attacks push away from the model's own answers and only flips are counted."""
    from forgeml.trust import image_attacks

    options = config.audit.robustness
    rows = robustness.sample_rows(len(dataset), options.max_examples, ATTACK_SEED)
    report = _attack_curve(task, model, dataset.select(rows), labelled, options)
    baseline = _robustness_baseline(config, task, dataset, False) if options.baseline else None
    atomic_write_json(folder / "robustness.json", {"images": report, "baseline": baseline})
    image_attacks.plot_attack_curve(report, folder / "robustness.png", baseline["report"] if baseline else None)
    headline.update(image_attacks.headline_numbers(report))
    if baseline is not None:
        headline.update(image_attacks.headline_numbers(baseline["report"], prefix="baseline_"))
    return image_attacks.attack_section(report, "trust/robustness.png", where, baseline)


ATTACK_SEED = 0  # rows and PGD random starts: a baseline run gets exactly the same attack


def _attack_curve(task: Task, model: nn.Module, rows: Dataset, labelled: bool, options: Any) -> dict[str, Any]:
    from forgeml.trust.image_attacks import robustness_curve

    encoded = task.encode(rows, "robustness", with_targets=labelled)
    return robustness_curve(
        model, encoded.inputs["pixels"], encoded.targets, options.epsilons, options.pgd_steps, seed=ATTACK_SEED
    )


def _robustness_baseline(config: ForgeConfig, task: Task, dataset: Dataset, attack: bool) -> dict[str, Any]:
    """The robustness probes of `audit.robustness.baseline`'s model on the same rows, for before/after."""
    from forgeml.api import load  # the baseline is another finished run, loaded (and verified) as any other

    options = config.audit.robustness
    baseline = load(options.baseline)
    same_inputs = getattr(baseline.task, "text_columns", None) == getattr(task, "text_columns", None)
    same_inputs = same_inputs and getattr(baseline.task, "image_shape", None) == getattr(task, "image_shape", None)
    if not same_inputs or getattr(baseline.task.target, "classes", None) != getattr(task.target, "classes", None):
        raise ConfigError(
            f"audit.robustness.baseline: {options.baseline} is a model of other inputs or classes; "
            "it must solve the same task to be compared"
        )
    if is_image_task(task):
        rows = dataset.select(robustness.sample_rows(len(dataset), options.max_examples, ATTACK_SEED))
        report = _attack_curve(baseline.task, baseline.model, rows, config.data.label in dataset.column_names, options)
    elif getattr(task, "text_columns", None):
        report = robustness.text_robustness(
            baseline.task, baseline.model, dataset, rates=options.rates, max_examples=options.max_examples
        )
    else:
        report = robustness.tabular_robustness(
            baseline.task, baseline.model, dataset, sigmas=options.sigmas, max_examples=options.max_examples
        )
    attacked = (
        robustness.word_substitution_attack(
            baseline.task, baseline.model, dataset, max_examples=options.attack_examples
        )
        if attack
        else None
    )
    return {"run": str(options.baseline), "report": report, "attack": attacked}


# --- explanations ---------------------------------------------------------------------------------


def _text_explanations(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    source: str,
    folder: Path,
    headline: dict[str, Any],
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
    picked = (
        "the most confidently right and the most confidently wrong"
        if config.data.label in dataset.column_names
        else "the most confident predictions (there are no labels to tell right from wrong)"
    )
    return {
        "title": "Explanations",
        "paragraphs": [
            f"Integrated-gradients word attributions (Captum) for {len(items)} examples from {source}: {picked}. "
            "Green words push toward the predicted class, red ones away from it. Faithfulness: deleting the "
            "top-attributed words should lower the predicted class's probability more than deleting random words."
        ],
        "facts": [
            (key.replace("_", " "), _fmt(value) if isinstance(value, float) else str(value))
            for key, value in faithful.items()
            if not isinstance(value, dict | list)
        ],
        "fragment": "trust/explanations.html",
    }


def _image_explanations(
    config: ForgeConfig,
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    source: str,
    folder: Path,
    headline: dict[str, Any],
) -> dict[str, Any]:
    """Integrated-gradients saliency of the most confidently right and wrong images, drawn over them."""
    from forgeml.data.images import SOURCE_COLUMN
    from forgeml.trust.image_explain import explain_images, plot_saliency

    chosen = _confident_examples(config, task, model, dataset, config.audit.explain)
    rows = dataset.select(chosen)
    labelled = config.data.label in rows.column_names
    sources = [str(v) for v in column(rows, SOURCE_COLUMN)] if SOURCE_COLUMN in rows.column_names else None
    truth = [str(v) for v in column(rows, config.data.label)] if labelled else None
    pixels = task.encode(rows, "explain", with_targets=False).inputs["pixels"]
    explanations = explain_images(
        model, pixels, task.target.classes, steps=IMAGE_STEPS, sources=sources, true_labels=truth
    )
    plot = plot_saliency(explanations, folder / "saliency.png")
    completeness = _completeness_error(explanations)
    atomic_write_json(
        folder / "explanations.json",
        {
            "method": "integrated gradients (Captum)",
            "steps": IMAGE_STEPS,
            "baseline": "training mean colour",
            "completeness_error": completeness,
            "images": [e.to_dict() for e in explanations],
        },
    )
    headline["saliency_completeness_error"] = completeness
    picked = (
        "the most confidently right and the most confidently wrong"
        if labelled
        else "the most confident predictions (there are no labels to tell right from wrong)"
    )
    return {
        "title": "Explanations",
        "paragraphs": [
            f"Integrated-gradients saliency (Captum, {IMAGE_STEPS} steps) for {len(explanations)} images from "
            f"{source}: {picked}. Each image is followed by where the evidence for its predicted class lies "
            "(bright: large attributions to the class's log-odds). The baseline is a flat image of the training "
            "mean colour, which the model sees as all-zero input, so dark pixels can be credited too.",
        ],
        "facts": [
            ("images explained", str(len(explanations))),
            ("completeness error (mean |sum of attributions - change in log-odds| / |change|)", _fmt(completeness)),
        ],
        "plots": [{"path": f"trust/{plot.name}", "caption": "Images and their integrated-gradients saliency."}],
    }


IMAGE_STEPS = 50  # integration steps for saliency: small images make 50 cheap, and the integral error small


def _completeness_error(explanations: list[Any]) -> float:
    """Mean relative gap between the attributions' sum and the change they explain (0: exactly complete)."""
    gaps = [abs(e.delta) / max(abs(e.explained_change), 1e-6) for e in explanations]
    return float(np.mean(gaps)) if gaps else 0.0


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
    """Rows to explain: the most confident correct predictions and the most confident mistakes (without
    labels: the most confident predictions)."""
    count = min(count, len(dataset))
    if not config.is_classification:
        return list(range(count))
    answers = predict(task, model, dataset)
    confidence = answers["probabilities"].max(axis=1)
    if config.data.label not in dataset.column_names:
        return [int(i) for i in np.argsort(-confidence, kind="stable")[:count]]
    correct = np.asarray(answers["label"]) == np.asarray([str(v) for v in column(dataset, config.data.label)])
    order = np.argsort(-confidence, kind="stable")
    wrong = [int(i) for i in order if not correct[i]][: count // 2]
    right = [int(i) for i in order if correct[i]][: count - len(wrong)]
    return right + wrong
