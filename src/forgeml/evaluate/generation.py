"""Scores of a generated answer against a reference answer (instruction tuning's `evaluate.generation`)."""

from __future__ import annotations

GENERATION_METRICS = ("exact_match", "contains", "rouge_l")


def normalize(text: str) -> str:
    """Trimmed, case-folded, inner whitespace collapsed: ' Positive\\n' and 'positive' are the same answer."""
    return " ".join(text.split()).casefold()


def score_answer(answer: str, reference: str, metric: str) -> float:
    """1.0 / 0.0 for exact_match and contains (on normalized text); ROUGE-L F1 over words in [0, 1]."""
    answer, reference = normalize(answer), normalize(reference)
    if metric == "exact_match":
        return float(answer == reference)
    if metric == "contains":
        return float(reference in answer)
    if metric == "rouge_l":
        return rouge_l(answer.split(), reference.split())
    raise ValueError(f"metric: {metric!r} is not one of {', '.join(GENERATION_METRICS)}")


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 (Lin 2004, with beta 1): precision and recall of the longest common subsequence of words."""
    if not candidate or not reference:
        return float(candidate == reference)
    previous = [0] * (len(reference) + 1)
    for word in candidate:  # the classic O(n * m) dynamic programme, one row at a time
        current = [0]
        for j, other in enumerate(reference):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)
