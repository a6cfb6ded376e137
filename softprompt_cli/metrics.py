"""Metrics by name: through `evaluate` when the metric can be loaded, else identical scikit-learn values.

`evaluate.load` fetches metric scripts from the Hub; offline it fails after ~10 s, so it is only
tried when the Hub is reachable.
"""

from __future__ import annotations

import functools

from sklearn import metrics as sk

from softprompt_cli.hub import hub_reachable


def _average(num_labels: int) -> str:
    return "binary" if num_labels == 2 else "macro"


def _sklearn(name: str, predictions: list[int], references: list[int], num_labels: int) -> float:
    if name == "accuracy":
        return float(sk.accuracy_score(references, predictions))
    if name == "matthews_correlation":
        return float(sk.matthews_corrcoef(references, predictions))
    scorer = {"f1": sk.f1_score, "precision": sk.precision_score, "recall": sk.recall_score}[name]
    return float(scorer(references, predictions, average=_average(num_labels), zero_division=0))


@functools.cache
def _evaluate_module(name: str):
    if not hub_reachable():
        return None
    try:
        import evaluate

        return evaluate.load(name)
    except Exception:  # any failure to fetch or build the metric script means: use scikit-learn
        return None


def compute(names: list[str], predictions: list, references: list, num_labels: int) -> dict[str, float]:
    """Label metrics from label ids; exact_match from texts (compared without surrounding whitespace)."""
    results = {}
    for name in names:
        if name == "exact_match":
            matches = [p.strip() == r.strip() for p, r in zip(predictions, references)]
            results[name] = sum(matches) / max(len(matches), 1)
            continue
        module = _evaluate_module(name)
        if module is None:
            results[name] = _sklearn(name, predictions, references, num_labels)
            continue
        kwargs = {"average": _average(num_labels)} if name in ("f1", "precision", "recall") else {}
        results[name] = float(module.compute(predictions=predictions, references=references, **kwargs)[name])
    return results
