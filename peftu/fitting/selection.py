"""Never worse: each user is answered by the method that did best on their own validation split.

Personalizing can make a user's answers worse: their adapter may have
over-fitted a handful of examples, or the base may not read their texts at
all, so that the user's own label prior (what they usually answer) beats
every model. So every user's candidates are scored on that user's
validation split, and the winner answers them; a tie goes to the simpler
candidate (`SIMPLEST_FIRST`), since a validation split of a few examples
cannot tell equals apart.

For classification and rating tasks two candidates use the user's label
prior `prior_user(label)` (their training labels, add-one smoothed):

- `<model>+prior`: the model's label log-likelihood plus `w * log prior_user(label)`,
  a per-user calibration whose weight `w` (`PRIOR_WEIGHTS`) is chosen on the
  user's validation split (ties: the smaller weight);
- `majority`: the prior alone, as the baseline row answers (the most frequent
  label; for a rating, the level nearest the user's mean rating).

What a user's choice is, as the fit and the benchmark record it and serving
reads it (`Choice.record`): ``{"method": name, "val": {candidate: metric},
"prior_weight": w, "log_prior": {label: log p}}``; the last two only where
the winner uses the prior, so a server scoring the user's labels adds
``w * log_prior[label]`` to each label's log-likelihood before taking the best.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from peftu.data.schema import TaskSpec, UserRecord
from peftu.evaluation.metrics import Golds, better, task_metrics

SIMPLEST_FIRST = ("majority", "base", "global", "base+prior", "global+prior", "oppu", "oppu+prior",
                  "oppu+retrieval", "oppu+profile", "ia3", "prompt-tuning", "prefix-tuning", "pplug", "pplug+oppu")
"""Candidates from the simplest (no model) to the most personal: ties go to the first."""

PRIOR = "+prior"
"""The suffix of a candidate that adds the user's label prior to a model's label scores."""

PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The weights of the prior tried on a user's validation split (0: the model alone)."""


def uses_prior(spec: TaskSpec) -> bool:
    """Can answers be calibrated by a label prior (answers are labels)?"""
    return spec.kind in ("classification", "rating")


def log_prior(spec: TaskSpec, user: UserRecord, smoothing: float = 1.0) -> dict[str, float]:
    """log prior_user(label): the user's training labels counted, `smoothing` added to every label."""
    counts = Counter(e.output for e in user.train)
    total = sum(counts[lab] for lab in spec.labels) + smoothing * len(spec.labels)
    return {lab: math.log((counts[lab] + smoothing) / total) for lab in spec.labels}


def with_prior(spec: TaskSpec, scores: list[list[float]], prior: dict[str, float], weight: float) -> list[str]:
    """The best label of each input once `weight * log prior` is added to the model's label scores."""
    boost = [weight * prior[lab] for lab in spec.labels]
    return [spec.labels[max(range(len(s)), key=lambda i: s[i] + boost[i])] for s in scores]


def best_prior_weight(spec: TaskSpec, scores: list[list[float]], golds: Golds, prior: dict[str, float]
                      ) -> tuple[float, dict[str, float]]:
    """The weight of the prior that scores best on (validation) `golds`, smallest on a tie, and its metrics."""
    best: tuple[float, dict[str, float]] | None = None
    for weight in PRIOR_WEIGHTS:
        metrics = task_metrics(spec, with_prior(spec, scores, prior, weight), golds)
        if best is None or better(spec.metric, metrics[spec.metric], best[1][spec.metric]):
            best = (weight, metrics)
    return best


def _simplicity(name: str) -> tuple[int, str]:
    return (SIMPLEST_FIRST.index(name) if name in SIMPLEST_FIRST else len(SIMPLEST_FIRST), name)


@dataclass
class Choice:
    """One user's winner on their validation split, and what every candidate scored there."""

    method: str
    val: dict[str, float]
    prior_weight: float | None = None
    log_prior: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """The JSON a fit and the benchmark write and serving reads (see the module doc)."""
        out = {"method": self.method, "val": self.val}
        if self.method.endswith(PRIOR) and self.prior_weight is not None:
            out |= {"prior_weight": self.prior_weight, "log_prior": self.log_prior}
        return out


def choose(metric: str, val: dict[str, float]) -> str:
    """The candidate with the best validation `metric`; a tie goes to the simpler (`SIMPLEST_FIRST`)."""
    if not val:
        raise ValueError("no candidate has a validation score to choose by")
    order = sorted(val, key=_simplicity)
    best = order[0]
    for name in order[1:]:
        if better(metric, val[name], val[best]):
            best = name
    return best
