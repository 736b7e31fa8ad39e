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
reads it (`Choice.record`; the record's schema is `peftu.store.selection`):
``{"method": name, "val": {candidate: metric}, "prior_weight": w,
"log_prior": {label: log p}, "answer": label}``; `prior_weight` and
`log_prior` only where the winner uses the prior, so a server scoring the
user's labels adds ``w * log_prior[label]`` to each label's log-likelihood
before taking the best (`calibrated`); `answer` (and `log_prior`, what a
server scores the labels with) only where `majority` won a label task: the
one label that user is answered with.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from peftu.data.schema import TaskSpec, UserRecord
from peftu.errors import NotFoundError
from peftu.evaluation.metrics import Golds, better, task_metrics
from peftu.quality.personalize import bm25_top_k
from peftu.store.kinds import SELECTION
from peftu.store.selection import MAJORITY, PRIOR, calibrated

SIMPLEST_FIRST = ("majority", "base", "global", "base+prior", "global+prior", "adapter", "adapter+prior",
                  "oppu", "oppu+prior",
                  "oppu+retrieval", "oppu+profile", "ia3", "prompt-tuning", "prefix-tuning", "pplug", "pplug+oppu")
"""Candidates from the simplest (no model) to the most personal: ties go to the first."""

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
    def best(s: list[float]) -> str:
        total = calibrated(spec.labels, s, prior, weight)
        return spec.labels[max(range(len(total)), key=total.__getitem__)]
    return [best(s) for s in scores]


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
    answer: str | None = None
    """The one answer `majority` gives on a label task (what serving answers such a user)."""

    def record(self) -> dict:
        """The JSON a fit and the benchmark write and serving reads (see the module doc)."""
        out = {"method": self.method, "val": self.val}
        if self.method == MAJORITY and self.answer is not None:
            out |= {"answer": self.answer, "log_prior": self.log_prior}
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


def majority_answer(spec: TaskSpec, user: UserRecord, query: str) -> str:
    """The user's own baseline answer to `query` from their history (see the module doc)."""
    answered = [h.output for h in user.history if h.output.strip()]
    if spec.kind == "classification":
        counts = Counter(answered)
        order = {lab: i for i, lab in enumerate(spec.labels)}
        return min(counts, key=lambda lab: (-counts[lab], order.get(lab, len(order)), lab)) if counts else spec.labels[0]
    if spec.kind == "rating":
        scale = spec.level_values()
        values = [scale[a] for a in answered if a in scale]
        return spec.nearest_level(sum(values) / len(values)) if values else spec.labels[len(spec.labels) // 2]
    nearest = bm25_top_k(user.history, query, 1)
    return nearest[0].output if nearest else ""


Answers = Callable[..., list]
"""answer(inputs, **slot) -> per input, label scores (label tasks) or the answer text."""


@dataclass
class Judged:
    """One candidate's metrics for one user: on the split it is judged by, and on test."""

    val: dict[str, float]
    test: dict[str, float]
    prior_weight: float | None = None


def judged_users(users: list[UserRecord]) -> list[UserRecord]:
    """Users with the split they are judged by as `val`: their own, or their training split if they have none."""
    return [u if u.val else replace(u, val=u.train) for u in users]


def _answers(fn: Answers, spec: TaskSpec, user: UserRecord, **slot) -> tuple[list, list]:
    """A candidate's outputs on the user's judged and test inputs, in one call."""
    inputs = [e.input for e in user.val] + [e.input for e in user.test]
    out = fn(inputs, **slot)
    return out[:len(user.val)], out[len(user.val):]


def judge(spec: TaskSpec, name: str, user: UserRecord, val_out: list, test_out: list) -> dict[str, Judged]:
    """A model candidate's metrics for a user, and on label tasks its `+prior` twin's at the weight val picks."""
    val_golds, test_golds = [e.golds for e in user.val], [e.golds for e in user.test]
    if not uses_prior(spec):
        return {name: Judged(task_metrics(spec, val_out, val_golds), task_metrics(spec, test_out, test_golds))}
    prior = log_prior(spec, user)
    weight, val_metrics = best_prior_weight(spec, val_out, val_golds, prior)

    def at(w: float, outs: list, golds: list) -> dict[str, float]:
        return task_metrics(spec, with_prior(spec, outs, prior, w), golds)

    return {name: Judged(at(0.0, val_out, val_golds), at(0.0, test_out, test_golds)),
            name + PRIOR: Judged(val_metrics, at(weight, test_out, test_golds), weight)}


def _majority(spec: TaskSpec, user: UserRecord) -> Judged:
    def answers(split: str) -> list[str]:
        return [majority_answer(spec, user, e.input) for e in getattr(user, split)]

    return Judged(task_metrics(spec, answers("val"), [e.golds for e in user.val]),
                  task_metrics(spec, answers("test"), [e.golds for e in user.test]))


def model_answers(spec: TaskSpec, model, tokenizer) -> Answers:
    """A model as a candidate: label scores on label tasks (so the prior can be added), else answer texts."""
    from peftu.inference.predict import label_logprobs, predict

    answer = label_logprobs if uses_prior(spec) else predict
    return lambda inputs, **slot: answer(model, tokenizer, spec, inputs, **slot)


def own_adapter(spec: TaskSpec, base, tokenizer, store, task: str, base_fp: str
                ) -> Callable[[UserRecord], tuple[list, list] | None]:
    """A user's own adapter of `task` from the store (on `base`, as a replica holds it) as a candidate."""
    from peftu.evaluation.evaluate import with_user_adapter

    answers = model_answers(spec, base, tokenizer)

    def own(user: UserRecord) -> tuple[list, list] | None:
        outs, had = with_user_adapter(base, store, task, user.user_id,
                                      lambda **slot: _answers(answers, spec, user, **slot), base_fp=base_fp)
        return outs if had else None
    return own


def choose_users(spec: TaskSpec, users: list[UserRecord], models: dict[str, Answers],
                 own: Callable[[UserRecord], tuple[list, list] | None], own_name: str
                 ) -> dict[str, tuple[Choice, dict[str, Judged]]]:
    """Every user's choice among `majority`, the shared `models` and their own adapter (`own`: its
    outputs on the user's judged and test inputs, None if they have none), and every candidate's metrics.

    A user without a validation split is judged on their training split (`judged_users`)."""
    out = {}
    for user in judged_users([u for u in users if u.test]):
        scores = {"majority": _majority(spec, user)}
        for name, fn in models.items():
            scores |= judge(spec, name, user, *_answers(fn, spec, user))
        mine = own(user)
        if mine is not None:
            scores |= judge(spec, own_name, user, *mine)
        val = {name: j.val[spec.metric] for name, j in scores.items() if j.val}
        winner = choose(spec.metric, val)
        label_answer = uses_prior(spec) and (winner.endswith(PRIOR) or winner == MAJORITY)
        out[user.user_id] = (Choice(winner, val, scores[winner].prior_weight,
                                    log_prior(spec, user) if label_answer else {},
                                    majority_answer(spec, user, "") if uses_prior(spec) else None), scores)
    return out


def select_fitted(base_path: str, store, spec: TaskSpec, users: list[UserRecord], *,
                  refit: set[str] | None = None) -> dict[str, dict]:
    """After a fit: each user's choice among `majority`, the plain base, the base their adapters were
    fitted on (`global`: OPPU's merged task adapter, where they were) and their own adapter (`oppu`, or
    `adapter` without OPPU), each `+prior` on label tasks; published as the task's selection record
    (`kinds.SELECTION`, schema in `peftu.store.selection`), which serving reads. Returns every entry.

    `refit`: the users whose adapters this run changed. Every other user keeps their entry of the
    task's last record if it was chosen for the same users' base (nothing else their choice depends
    on changed: new data or hyper-parameters refit them), so a re-run that skips everyone loads no
    model and writes nothing. None: choose for every user again."""
    from peftu.model.base import base_fingerprint, load_base
    from peftu.model.bases import load_users_base

    last = _last_selection(store, spec.name, base_path) if refit is not None else {}
    todo = [u for u in users if u.test and (u.user_id in (refit or ()) or u.user_id not in last)]
    if not todo:
        return last
    users_base, tokenizer, users_fp = load_users_base(base_path, store, spec.name)
    oppu = users_fp != base_fingerprint(base_path)
    plain = load_base(base_path) if oppu else (users_base, tokenizer)
    models = {"base": model_answers(spec, *plain)}
    if oppu:
        models["global"] = model_answers(spec, users_base, tokenizer)
    own = own_adapter(spec, users_base, tokenizer, store, spec.name, users_fp)
    chosen = last | {uid: choice.record() for uid, (choice, _) in
                     choose_users(spec, todo, models, own, "oppu" if oppu else "adapter").items()}
    store.put_record(SELECTION.of(spec.name), {"task": spec.name, "users_base": users_fp, "users": chosen})
    return chosen


def _last_selection(store, task: str, base_path: str) -> dict[str, dict]:
    """The users of the task's latest selection record if it was chosen for the base the task's users'
    adapters belong to now (found from the store without loading a model); else {}."""
    from peftu.model.base import base_fingerprint
    from peftu.model.bases import merged_fingerprint, users_task_adapter

    try:
        record = store.get_record(SELECTION.of(task))
    except NotFoundError:
        return {}
    base_fp = base_fingerprint(base_path)
    task_adapter = users_task_adapter(store, task, base_fp)
    users_fp = base_fp if task_adapter is None else merged_fingerprint(base_fp, task_adapter)
    return record.get("users", {}) if record.get("users_base") == users_fp else {}


def selected_counts(choices: dict[str, dict]) -> dict[str, int]:
    """How many users each method answers: the `selected` line of a run summary."""
    return dict(Counter(c["method"] for c in choices.values()).most_common())
