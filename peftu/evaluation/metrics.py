"""Task metrics and per-user macro averages, as PEFT-U and LaMP report them."""

from __future__ import annotations

import math
from collections import defaultdict

from peftu.data.schema import LOWER_IS_BETTER, TaskSpec, UserRecord


def accuracy(preds: list[str], golds: list[str]) -> float:
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(preds: list[str], golds: list[str], labels: list[str] | None = None) -> float:
    """F1 per label, averaged over the labels that occur in golds or predictions."""
    labels = sorted(set(golds) | set(preds)) if labels is None else [
        lab for lab in labels if lab in set(golds) | set(preds)]
    scores = []
    for lab in labels:
        tp = sum(p == lab and g == lab for p, g in zip(preds, golds, strict=True))
        fp = sum(p == lab and g != lab for p, g in zip(preds, golds, strict=True))
        fn = sum(p != lab and g == lab for p, g in zip(preds, golds, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _rating_value(pred: str, gold: float, scale: list[float]) -> float:
    """A prediction as a number; a non-number counts as the worse extreme (as LaMP does)."""
    try:
        value = float(pred.strip())
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    low, high = min(scale), max(scale)
    return low if abs(low - gold) > abs(high - gold) else high


def mae(preds: list[str], golds: list[str], scale: list[float]) -> float:
    errs = [abs(_rating_value(p, float(g), scale) - float(g)) for p, g in zip(preds, golds, strict=True)]
    return sum(errs) / len(errs)


def rmse(preds: list[str], golds: list[str], scale: list[float]) -> float:
    errs = [(_rating_value(p, float(g), scale) - float(g)) ** 2 for p, g in zip(preds, golds, strict=True)]
    return math.sqrt(sum(errs) / len(errs))


def rouge(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (stemmed), via the `rouge-score` package."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(g, p) for p, g in zip(preds, golds, strict=True)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rougeL")}


def task_metrics(spec: TaskSpec, preds: list[str], golds: list[str]) -> dict[str, float]:
    """Every metric of the task's kind, for one user's predictions."""
    if not golds:
        return {}
    if spec.kind == "classification":
        return {"accuracy": accuracy(preds, golds), "f1": macro_f1(preds, golds, spec.labels)}
    if spec.kind == "rating":
        scale = [float(x) for x in spec.labels]
        return {"mae": mae(preds, golds, scale), "rmse": rmse(preds, golds, scale)}
    return rouge(preds, golds)


def macro_average(per_user: dict[str, dict[str, float]], users: list[UserRecord]
                  ) -> dict[str, dict[str, float]]:
    """Mean of each metric over users: `{"all": {...}, "few": {...}, ...}` with `n` users."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for user in users:
        if per_user.get(user.user_id):
            groups["all"].append(per_user[user.user_id])
            groups[user.activity].append(per_user[user.user_id])
    out = {}
    for name, rows in groups.items():
        keys = rows[0].keys()
        out[name] = {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"n": len(rows)}
    return out


def better(metric: str, a: float, b: float) -> bool:
    """Is `a` a better score than `b` under `metric`?"""
    return a < b if metric in LOWER_IS_BETTER else a > b
