"""Fairness audit: group metrics, bootstrap intervals, threshold mitigation, identity swaps, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference
from fairlearn.postprocessing import ThresholdOptimizer
from sklearn.base import BaseEstimator

from forgeml.errors import ArtifactError, DataError
from forgeml.trust import fairness
from forgeml.trust.fairness import (
    apply_thresholds,
    counterfactual_flips,
    fit_thresholds,
    group_report,
    plot_counterfactual,
    plot_group_metrics,
    swap_term,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def crafted() -> tuple[list[str], list[str], list[str]]:
    """Group A: 8 of 10 approved (TPR 1, FPR 0.6); group B: 2 of 10 approved (TPR 0.4, FPR 0)."""
    truth = ["approved"] * 5 + ["denied"] * 5
    predicted_a = ["approved"] * 8 + ["denied"] * 2
    predicted_b = ["approved"] * 2 + ["denied"] * 8
    return truth + truth, predicted_a + predicted_b, ["A"] * 10 + ["B"] * 10


def assert_json_clean(report: dict) -> None:
    text = json.dumps(report, allow_nan=False)  # raises on NaN / inf
    assert json.loads(text) == report


# --- group report ---------------------------------------------------------------------------------


def test_group_report_exact_numbers_on_crafted_data():
    y_true, y_pred, groups = crafted()
    report = group_report(y_true, y_pred, {"group": groups}, positive_label="approved", bootstrap=50)
    column = report["columns"]["group"]
    assert column["kind"] == "categorical"
    assert column["groups"]["A"] == {"count": 10, "accuracy": 0.7, "selection_rate": 0.8, "tpr": 1.0, "fpr": 0.6}
    assert column["groups"]["B"] == {"count": 10, "accuracy": 0.7, "selection_rate": 0.2, "tpr": 0.4, "fpr": 0.0}
    assert report["overall"] == pytest.approx(
        {"count": 20, "accuracy": 0.7, "selection_rate": 0.5, "tpr": 0.7, "fpr": 0.3}
    )
    disparities = column["disparities"]
    assert disparities["demographic_parity_difference"]["value"] == pytest.approx(0.6)
    assert disparities["demographic_parity_ratio"]["value"] == pytest.approx(0.25)
    assert disparities["equalized_odds_difference"]["value"] == pytest.approx(0.6)
    for name in fairness.DISPARITIES:
        low, high = disparities[name]["ci95"]
        assert low <= high
    assert_json_clean(report)


def test_group_report_bins_numbers_and_groups_missing_values_as_unknown():
    ages = [*range(17, 37), None, float("nan")]
    y_true = ["yes", "no"] * 11
    y_pred = ["yes"] * 22
    report = group_report(y_true, y_pred, {"age": ages, "city": ["x", "", *["y"] * 20]}, "yes", bins=4, bootstrap=0)
    age = report["columns"]["age"]
    assert age["kind"] == "numeric"
    assert list(age["groups"]) == ["17–21", "22–26", "27–31", "32–36", "unknown"]
    assert [g["count"] for g in age["groups"].values()] == [5, 5, 5, 5, 2]
    assert list(report["columns"]["city"]["groups"]) == ["x", "y", "unknown"]
    assert report["columns"]["city"]["groups"]["x"]["count"] == 1
    assert age["disparities"]["demographic_parity_difference"]["ci95"] is None  # bootstrap off
    assert_json_clean(report)


def test_group_report_undefined_rates_are_none_and_multiclass_is_one_vs_rest():
    y_true = ["cat", "dog", "bird", "cat", "dog", "dog"]
    y_pred = ["cat", "cat", "bird", "dog", "dog", "cat"]
    groups = ["g1", "g1", "g1", "g2", "g2", "g2"]
    report = group_report(y_true, y_pred, {"g": groups}, positive_label="dog", bootstrap=20)
    g1, g2 = report["columns"]["g"]["groups"]["g1"], report["columns"]["g"]["groups"]["g2"]
    assert g1["accuracy"] == pytest.approx(2 / 3)  # accuracy uses every class
    assert g1["selection_rate"] == 0.0 and g1["tpr"] == 0.0 and g1["fpr"] == 0.0
    assert g2 == pytest.approx({"count": 3, "accuracy": 1 / 3, "selection_rate": 2 / 3, "tpr": 0.5, "fpr": 1.0})
    only_negatives = group_report(["no", "no", "yes"], ["no", "yes", "yes"], {"g": ["a", "a", "b"]}, "yes")
    assert only_negatives["columns"]["g"]["groups"]["a"]["tpr"] is None  # group a has no positives
    assert only_negatives["columns"]["g"]["groups"]["b"]["fpr"] is None  # group b has no negatives
    assert_json_clean(report)
    assert_json_clean(only_negatives)


def test_bootstrap_arithmetic_matches_fairlearn_and_is_seeded():
    rng = np.random.default_rng(3)
    truth, decision = rng.random(500) < 0.4, rng.random(500) < 0.5
    groups = rng.choice(["a", "b", "c"], 500)
    names, ids = np.unique(groups, return_inverse=True)
    fast = fairness._fast_disparities(truth, decision, ids, len(names))
    expected = [
        metric(truth.astype(int), decision.astype(int), sensitive_features=groups)
        for metric in (demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference)
    ]
    assert fast == pytest.approx(expected)
    labels = lambda flags: ["yes" if f else "no" for f in flags]  # noqa: E731
    first = group_report(labels(truth), labels(decision), {"g": list(groups)}, "yes", bootstrap=100, seed=7)
    again = group_report(labels(truth), labels(decision), {"g": list(groups)}, "yes", bootstrap=100, seed=7)
    assert first == again


def test_group_report_rejects_mismatched_lengths_and_unknown_positive_label():
    with pytest.raises(DataError, match="sensitive column 'g'"):
        group_report(["a", "b"], ["a", "b"], {"g": ["x"]}, "a")
    with pytest.raises(DataError, match="positive label 'zzz'"):
        group_report(["a", "b"], ["a", "b"], {"g": ["x", "y"]}, "zzz")


def test_group_report_without_labels_has_selection_rates_and_demographic_parity_only():
    y_true, y_pred, groups = crafted()
    scores = [0.9 if label == "approved" else 0.2 for label in y_pred]
    report = group_report(None, y_pred, {"group": groups}, "approved", bootstrap=50, scores=scores)
    labelled = group_report(y_true, y_pred, {"group": groups}, "approved", bootstrap=50, scores=scores)
    column = report["columns"]["group"]
    assert report["labelled"] is False and labelled["labelled"] is True
    assert set(report["needs_labels"]) == {"accuracy", "tpr", "fpr", "equalized_odds_difference"}
    assert column["groups"]["A"] == pytest.approx({"count": 10, "selection_rate": 0.8, "mean_probability": 0.76})
    assert column["groups"]["B"] == pytest.approx({"count": 10, "selection_rate": 0.2, "mean_probability": 0.34})
    assert set(column["disparities"]) == {"demographic_parity_difference", "demographic_parity_ratio"}
    assert report["overall"] == pytest.approx({"count": 20, "selection_rate": 0.5, "mean_probability": 0.55})
    # What needs no labels is the same number, interval included, with or without them.
    for name in ("demographic_parity_difference", "demographic_parity_ratio"):
        assert column["disparities"][name] == labelled["columns"]["group"]["disparities"][name]
    assert column["disparities"]["demographic_parity_difference"]["value"] == pytest.approx(0.6)
    assert labelled["columns"]["group"]["groups"]["A"]["accuracy"] == 0.7  # the labelled path is unchanged
    assert_json_clean(report)


# --- threshold mitigation -------------------------------------------------------------------------


def synthetic_scores(seed: int, rows: int = 4000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both groups have a 40 % positive rate, but the model scores group b lower than group a."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b"], rows, p=[0.6, 0.4])
    truth = rng.random(rows) < 0.4
    logit = 5.0 * (truth - 0.5) + rng.normal(0, 1.5, rows) + np.where(groups == "a", 1.0, -1.0)
    return 1 / (1 + np.exp(-logit)), np.where(truth, "yes", "no"), groups


def dp_difference(decision: np.ndarray, groups: np.ndarray) -> float:
    rates = [decision[groups == g].mean() for g in np.unique(groups)]
    return max(rates) - min(rates)


class ScoreColumn(BaseEstimator):
    """The scores as a fitted "model", to call Fairlearn's own ThresholdOptimizer for comparison."""

    def fit(self, X, y=None):
        return self

    def predict_proba(self, X):
        return np.column_stack([1 - X[:, 0], X[:, 0]])

    def __sklearn_is_fitted__(self):
        return True


def test_demographic_parity_thresholds_cut_the_gap_on_held_out_data():
    scores, y_true, groups = synthetic_scores(seed=1)
    rule = fit_thresholds(scores, y_true, groups, "demographic_parity", positive_label="yes")
    held_scores, held_true, held_groups = synthetic_scores(seed=2)
    truth = held_true == "yes"
    before, after = held_scores > 0.5, apply_thresholds(rule, held_scores, held_groups)
    assert dp_difference(after, held_groups) <= 0.3 * dp_difference(before, held_groups)
    assert np.mean(after == truth) >= np.mean(before == truth) - 0.05
    assert rule["constraint"] == "demographic_parity" and rule["positive_label"] == "yes"
    assert set(rule["groups"]) == {"a", "b"}
    assert rule["validation"]["demographic_parity_difference"] < 0.05


@pytest.mark.parametrize("constraint", ["demographic_parity", "equalized_odds"])
def test_applied_rule_equals_fairlearn_predict_after_json_round_trip(constraint):
    scores, y_true, groups = synthetic_scores(seed=4, rows=1500)
    rule = json.loads(json.dumps(fit_thresholds(scores, y_true, groups, constraint, "yes"), allow_nan=False))
    optimizer = ThresholdOptimizer(
        estimator=ScoreColumn(), constraints=constraint, prefit=True, predict_method="predict_proba"
    ).fit(scores[:, None], (y_true == "yes").astype(int), sensitive_features=groups)
    for seed in (0, 5):
        expected = optimizer.predict(scores[:, None], sensitive_features=groups, random_state=seed).astype(bool)
        assert np.array_equal(apply_thresholds(rule, scores, groups, seed=seed), expected)
    for group, entry in rule["groups"].items():
        if entry["p0"] in (0.0, 1.0) and "p_ignore" not in entry:  # deterministic: no draw involved
            rows = groups == group
            assert np.array_equal(apply_thresholds(rule, scores[rows], groups[rows], seed=9), expected[rows])
    assert np.array_equal(
        apply_thresholds(rule, scores, groups, seed=3), apply_thresholds(rule, scores, groups, seed=3)
    )


def test_unseen_group_gets_the_default_threshold():
    scores, y_true, groups = synthetic_scores(seed=5, rows=1000)
    rule = fit_thresholds(scores, y_true, groups, "demographic_parity", "yes")
    threshold = rule["default"]["operation0"]["threshold"]
    assert rule["default"]["p0"] == 1.0
    decisions = apply_thresholds(rule, scores, ["new group"] * len(scores))
    assert np.array_equal(decisions, scores > threshold)
    pooled_accuracy = np.mean((scores > threshold) == (y_true == "yes"))
    assert pooled_accuracy >= np.mean((scores > 0.5) == (y_true == "yes"))  # the best single threshold


def test_numeric_column_is_binned_and_the_cuts_travel_with_the_rule():
    rng = np.random.default_rng(6)
    ages = rng.integers(18, 80, 3000)
    truth = rng.random(3000) < 0.4
    scores = 1 / (1 + np.exp(-(4.0 * (truth - 0.5) + rng.normal(0, 1.5, 3000) + (ages - 50) / 15)))
    rule = json.loads(
        json.dumps(fit_thresholds(scores, np.where(truth, "yes", "no"), ages, "demographic_parity", "yes"))
    )
    assert rule["bins"]["cuts"] == sorted(rule["bins"]["cuts"]) and len(rule["bins"]["labels"]) == 4
    assert set(rule["groups"]) == set(rule["bins"]["labels"])
    youngest = rule["bins"]["labels"][0]
    assert youngest.startswith("18–")
    as_numbers = apply_thresholds(rule, scores[:50], ages[:50], seed=1)
    as_text = apply_thresholds(rule, scores[:50], [str(a) for a in ages[:50]], seed=1)  # e.g. from a JSON request
    assert np.array_equal(as_numbers, as_text)
    assert rule["validation"]["demographic_parity_difference"] < 0.05


def test_apply_thresholds_refuses_something_that_is_not_a_rule():
    with pytest.raises(ArtifactError, match="not a fairness threshold rule"):
        apply_thresholds({"groups": {}}, [0.5], ["a"])


def test_fit_thresholds_names_a_group_with_one_outcome():
    with pytest.raises(DataError, match="group 'b' has no 'yes' rows"):
        fit_thresholds([0.9, 0.2, 0.4, 0.3], ["yes", "no", "no", "no"], ["a", "a", "b", "b"], "equalized_odds", "yes")
    with pytest.raises(ValueError, match="constraint must be one of"):
        fit_thresholds([0.9, 0.2], ["yes", "no"], ["a", "a"], "parity", "yes")


# --- counterfactual identity swaps ----------------------------------------------------------------


def suspicious_of_muslims(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """A deliberately biased toy model: negative whenever the text mentions Muslims."""
    negative = np.array(["muslim" in text.lower() for text in texts])
    return ["negative" if n else "positive" for n in negative], np.where(negative, 0.1, 0.9)


TEXTS = [
    "He is a Christian man and he prays every day.",
    "My sister said the Jewish bakery is wonderful.",
    "Her Muslim neighbours are lovely.",
    "The film was long and dull.",
]


def test_counterfactual_flips_detect_religion_bias_but_not_gender():
    report = counterfactual_flips(TEXTS, suspicious_of_muslims, positive_label="positive")
    religion, gender = report["dimensions"]["religion"], report["dimensions"]["gender"]
    assert religion["flip_rate"] > 0 and religion["texts"] == 3
    assert religion["terms"]["muslim"]["flip_rate"] == 1.0  # christian/jewish -> muslim always flips
    assert religion["terms"]["muslim"]["mean_abs_shift"] == pytest.approx(0.8)
    assert religion["max_abs_shift"] == pytest.approx(0.8)
    assert gender["flip_rate"] == 0.0 and gender["variants"] > 0 and gender["mean_abs_shift"] == 0.0
    assert report["dimensions"]["disability"]["flip_rate"] is None  # no disability terms in the texts
    assert_json_clean(report)


def test_counterfactual_variants_keep_case_and_whole_words():
    seen: list[str] = []

    def recorder(texts: list[str]) -> tuple[list[str], np.ndarray]:
        seen.extend(texts)
        return ["positive"] * len(texts), np.full(len(texts), 0.5)

    terms = {"gender": [["he", "she"]], "race": [["african american", "native american"]]}
    texts = ["He said HE would go; he went.", "Theory and hero stay.", "An African American author."]
    report = counterfactual_flips(texts, recorder, "positive", terms=terms, max_examples=1)
    assert "She said SHE would go; she went." in seen
    assert not any("Theory" in t for t in seen)  # no swap inside "Theory"/"hero", so never scored
    assert "An Native American author." in seen
    assert report["dimensions"]["gender"]["texts"] == 1 and report["dimensions"]["gender"]["variants"] == 1


def test_swap_term_gives_both_texts_of_a_pair_the_same_substitution():
    assert swap_term("He said he would.", "he", "she") == "She said she would."
    assert swap_term(("He went home.", "he is tired"), "he", "she") == ("She went home.", "she is tired")
    assert swap_term(("The doctor left.", "HE stayed"), "he", "she") == ("The doctor left.", "SHE stayed")


def test_counterfactual_pairs_count_either_text_and_shift_the_predicted_class():
    seen: list[tuple[str, str]] = []

    def wary_of_women(pairs: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
        """Three classes; 'contradiction' as soon as either text says "she"."""
        seen.extend(pairs)
        her = np.array([any("she" in text.lower().split() for text in pair) for pair in pairs])
        probabilities = np.where(her[:, None], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1])
        return ["contradiction" if h else "entailment" for h in her], probabilities

    pairs = [("He is a doctor.", "he is tired"), ("The doctor arrived.", "He left."), ("A film.", "It was long.")]
    terms = {"gender": [["he", "she"]], "religion": [["christian", "muslim"]]}
    report = counterfactual_flips(pairs, wary_of_women, terms=terms)
    assert ("She is a doctor.", "she is tired") in seen and ("The doctor arrived.", "She left.") in seen
    assert not any(pair in seen for pair in [("She is a doctor.", "he is tired"), ("He is a doctor.", "she is tired")])
    assert ("A film.", "It was long.") not in seen  # no identity term in either text: never scored
    gender = report["dimensions"]["gender"]
    assert report["pairs"] is True and gender["texts"] == 2 and gender["variants"] == 2
    assert gender["flip_rate"] == 1.0
    # Shift in the probability of the class first predicted ('entailment': 0.6 -> 0.1), not of one class.
    assert gender["mean_abs_shift"] == pytest.approx(0.5) and "predicted class" in report["shift_in"]
    assert gender["largest_shifts"][0]["text"] in (
        ["He is a doctor.", "he is tired"],
        ["The doctor arrived.", "He left."],
    )
    assert report["dimensions"]["religion"]["flip_rate"] is None
    assert_json_clean(report)


def test_shipped_identity_terms_cover_the_dimensions():
    terms = fairness.load_identity_terms()
    assert set(terms) >= {
        "gender",
        "religion",
        "nationality",
        "race_ethnicity",
        "disability",
        "sexual_orientation",
        "age",
    }
    flat = {dimension: {t for term_set in sets for t in term_set} for dimension, sets in terms.items()}
    assert {"he", "she", "man", "woman", "father", "mother"} <= flat["gender"]
    assert {"christian", "muslim", "jewish", "hindu", "buddhist"} <= flat["religion"]
    assert {"american", "mexican", "chinese", "indian", "nigerian", "german"} <= flat["nationality"]
    assert all(len(term_set) >= 2 for sets in terms.values() for term_set in sets)


# --- plots ----------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1024


def test_plots_are_written_as_png(tmp_path: Path):
    y_true, y_pred, groups = crafted()
    ages = list(range(20, 40))
    report = group_report(y_true, y_pred, {"group": groups, "age band": ages}, "approved", bootstrap=10)
    paths = plot_group_metrics(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["fairness_group.png", "fairness_age_band.png"]
    for path in paths:
        assert_png(path)
    flips = counterfactual_flips(TEXTS, suspicious_of_muslims, "positive")
    assert_png(plot_counterfactual(flips, tmp_path / "plots" / "counterfactual.png"))
    unlabelled = group_report(None, y_pred, {"group": groups}, "approved", bootstrap=0, scores=[0.5] * len(y_pred))
    assert_png(plot_group_metrics(unlabelled, tmp_path / "unlabelled")[0])
    assert not list((tmp_path / "plots").glob(".*.tmp"))  # atomic writes leave no temp files
