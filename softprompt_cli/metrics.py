"""Metrics by name: through `evaluate` when the metric can be loaded, else computed here.

`evaluate.load` fetches metric scripts from the Hub; offline it fails after ~10 s, so it is only
tried when the Hub is reachable. The local definitions give scikit-learn's values (binary averaging
for two labels, macro averaging over the labels that occur otherwise, 0 where a ratio is undefined;
tested against scikit-learn), without importing scikit-learn and SciPy into the training process
(about 140 MB of resident memory).

F1, precision and recall are for one class, `positive` (a label id: the recipe's task.positive_label),
when it is given: scikit-learn's `pos_label` for two labels, that class against the rest for more.
Without it: label 1 of two labels, macro averages with more.
"""

from __future__ import annotations

import functools
import math

from softprompt_cli.hub import hub_reachable

KNOWN_METRICS = ("accuracy", "f1", "precision", "recall", "matthews_correlation", "exact_match")


def _average(num_labels: int) -> str:
    return "binary" if num_labels == 2 else "macro"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _per_label(name: str, predictions: list[int], references: list[int], label: int) -> float:
    true_positives = sum(p == label and r == label for p, r in zip(predictions, references))
    predicted = sum(p == label for p in predictions)
    actual = sum(r == label for r in references)
    precision, recall = _ratio(true_positives, predicted), _ratio(true_positives, actual)
    return {"precision": precision, "recall": recall,
            "f1": _ratio(2 * true_positives, predicted + actual)}[name]


def _matthews(predictions: list[int], references: list[int]) -> float:
    labels = sorted(set(predictions) | set(references))
    samples = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    true_counts = [references.count(label) for label in labels]
    predicted_counts = [predictions.count(label) for label in labels]
    covariance = correct * samples - sum(t * p for t, p in zip(true_counts, predicted_counts))
    spread_predicted = samples ** 2 - sum(p * p for p in predicted_counts)
    spread_true = samples ** 2 - sum(t * t for t in true_counts)
    return _ratio(covariance, math.sqrt(spread_true * spread_predicted))


def local_metric(name: str, predictions: list[int], references: list[int], num_labels: int,
                 positive: int | None = None) -> float:
    if name == "accuracy":
        return _ratio(sum(p == r for p, r in zip(predictions, references)), len(references))
    if name == "matthews_correlation":
        return _matthews(predictions, references)
    if positive is not None or _average(num_labels) == "binary":
        return _per_label(name, predictions, references, 1 if positive is None else positive)
    labels = sorted(set(predictions) | set(references))
    return sum(_per_label(name, predictions, references, label) for label in labels) / len(labels)


@functools.cache
def _evaluate_module(name: str):
    if not hub_reachable():
        return None
    try:
        import evaluate

        return evaluate.load(name)
    except Exception:  # any failure to fetch or build the metric script means: compute it here
        return None


def _averaging(num_labels: int, positive: int | None) -> dict:
    """scikit-learn's (and `evaluate`'s) arguments for F1, precision and recall."""
    if positive is None:
        return {"average": _average(num_labels)}
    if num_labels == 2:
        return {"average": "binary", "pos_label": positive}
    return {"average": "micro", "labels": [positive]}  # one class against the rest


def compute(names: list[str], predictions: list, references: list, num_labels: int,
            positive: int | None = None) -> dict[str, float]:
    """Label metrics from label ids; exact_match from texts (compared without surrounding whitespace).
    `positive`: the label id F1, precision and recall are for (default: label 1 of two, macro with more)."""
    results = {}
    for name in names:
        if name == "exact_match":
            matches = [p.strip() == r.strip() for p, r in zip(predictions, references)]
            results[name] = sum(matches) / max(len(matches), 1)
            continue
        module = _evaluate_module(name)
        if module is None:
            results[name] = local_metric(name, predictions, references, num_labels, positive)
            continue
        kwargs = _averaging(num_labels, positive) if name in ("f1", "precision", "recall") else {}
        results[name] = float(module.compute(predictions=predictions, references=references, **kwargs)[name])
    return results
