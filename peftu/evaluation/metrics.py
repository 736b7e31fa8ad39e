"""Task metrics and per-user macro averages, as PEFT-U and LaMP report them."""

from __future__ import annotations

import contextlib
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


class Scale:
    """A rating task's levels as values: numbers as they are (LaMP-3's stars), named levels by
    position (PEFT-U's very-negative = 0 ... very-positive = 6), so errors count in steps."""

    def __init__(self, spec: TaskSpec):
        self.values, self.numeric = spec.level_values(), spec.numeric_scale
        self.low, self.high = min(self.values.values()), max(self.values.values())

    def gold(self, gold: str) -> float:
        if gold in self.values:
            return self.values[gold]
        if self.numeric:
            with contextlib.suppress(ValueError):
                return float(gold)
        raise ValueError(f"gold answer {gold!r} is not a level of the scale {list(self.values)}")

    def pred(self, pred: str, gold: float) -> float:
        """A prediction's value; one that is no level (nor, on a numeric scale, a number) counts
        as the extreme farther from the gold, as LaMP does."""
        pred = pred.strip()
        if pred in self.values:
            return self.values[pred]
        if self.numeric:
            with contextlib.suppress(ValueError):
                value = float(pred)
                if math.isfinite(value):
                    return value
        return self.low if abs(self.low - gold) > abs(self.high - gold) else self.high

    def errors(self, preds: list[str], golds: list[str]) -> list[float]:
        """Each prediction's absolute error on the scale."""
        return [abs(self.pred(p, g) - g) for p, g in zip(preds, map(self.gold, golds), strict=True)]


def mae(preds: list[str], golds: list[str], scale: Scale) -> float:
    errs = scale.errors(preds, golds)
    return sum(errs) / len(errs)


def rmse(preds: list[str], golds: list[str], scale: Scale) -> float:
    errs = scale.errors(preds, golds)
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def rouge(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (stemmed), via the `rouge-score` package."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(g, p) for p, g in zip(preds, golds, strict=True)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rougeL")}


Golds = list[str] | list[list[str]]
"""Per prediction, its gold answer, or every answer that counts as right (`Example.golds`)."""


def resolve_golds(spec: TaskSpec, preds: list[str], golds: Golds) -> list[str]:
    """One gold per prediction, as PEFT-U scores records with several labels: the prediction itself
    where it is one of them, else (rating) the one nearest it, else the first."""
    out = []
    for pred, gold in zip(preds, golds, strict=True):
        accepted = [gold] if isinstance(gold, str) else list(gold)
        if pred in accepted or len(accepted) == 1:
            out.append(pred if pred in accepted else accepted[0])
        elif spec.kind == "rating":
            out.append(min(accepted, key=lambda g: Scale(spec).errors([pred], [g])[0]))
        else:
            out.append(accepted[0])
    return out


def task_metrics(spec: TaskSpec, preds: list[str], golds: Golds) -> dict[str, float]:
    """Every metric of the task's kind, for one user's predictions (a rating task's accuracy: the exact level)."""
    if not golds:
        return {}
    golds = resolve_golds(spec, preds, golds)
    if spec.kind == "classification":
        return {"accuracy": accuracy(preds, golds), "f1": macro_f1(preds, golds, spec.labels)}
    if spec.kind == "rating":
        scale = Scale(spec)
        return {"mae": mae(preds, golds, scale), "rmse": rmse(preds, golds, scale),
                "accuracy": accuracy(preds, golds)}
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
