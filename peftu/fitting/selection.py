"""Never worse: each user is answered by the method that did best on their own validation split.

Personalizing can make a user's answers worse: their adapter may have
over-fitted a handful of examples, or the base may not read their texts at
all, so that the user's own label prior (what they usually answer) beats
every model. So every user's candidates are scored on that user's
validation split, and the winner answers them.

A validation split of one to three examples cannot tell candidates apart:
alone, it hands a user the base because it tied their adapter on two
examples. So each user's scores are shrunk toward what every candidate
scored over all the task's users (`shrunk`): a user with `n` validation
examples weighs their own score by `n / (n + SHRINK_EXAMPLES)` and the
candidate's task-wide mean by the rest. A user with few examples gets what
works for users of this task; a user with many gets what works for them. A
tie after that goes to the simpler candidate (`SIMPLEST_FIRST`). How much a
user's own split should count is the task's (`task_strength`): choosing on
one half of every user's validation split and judging on the other says
whether their own splits predict better than the task-wide means; the
strength moves from 8 only where that is clearly so.

For classification and rating tasks two candidates use the user's label
prior `prior_user(label)` (their training labels, add-one smoothed):

- `<model>+prior`: the model's label log-likelihood plus `w * log prior_user(label)`,
  a per-user calibration. Its weight `w` (`PRIOR_WEIGHTS`) is chosen on all
  the task's users' validation splits together (`task_prior_weights`; ties:
  the smaller weight): chosen on one user's few examples, it would fit them,
  and the `+prior` candidate would then look better on validation than it
  is, and win where it should not;
- `majority`: the prior alone, as the baseline row answers (the most frequent
  label; for a rating, the level nearest the user's mean rating).

On label tasks the user's own adapter is also scored with their profile
(`peftu.quality.personalize.profile_text`: how often they give each label, and
the words typical of each) on the line before the prompt, `profile+oppu`
(`profile+adapter` without OPPU), and with their nearest labelled training
texts there (`retrieval+oppu`: the 4 nearest under the sentence encoder, each
as the task asks it with the user's label, from their `neighbors` index), each
with its `+prior` twin. It is the adapter as fitted, on plain prompts (the
benchmark's `oppu+profile` and `oppu+retrieval` rows are other fits, on
augmented prompts, that serving could not answer with), so each costs one more
scoring pass and no fit. A profile winner's record carries the profile text and
a retrieval winner's index is in the store; `/v1/score` puts either in front of
the request's prompt.

One more label-task candidate reads the text, as the tiny base cannot:
`neighbors`, the user's own labels on their training texts nearest the input
under the real sentence encoder (`peftu.neighbors`; its index goes to the
store for serving). Its vote shares are label scores like a model's, so it
has a `+prior` twin too. Where the store holds the task's PPlug plug fitted for the
users' base (`peftu pplug fit`), `pplug` is one more candidate on every task:
the base reading the user's soft tokens from their history (with its
`+prior` twin on label tasks).

What a user's choice is, as the fit and the benchmark record it and serving
reads it (`Choice.record`; the record's schema is `peftu.store.selection`):
``{"method": name, "val": {candidate: metric}, "n_val": examples, "halves": {candidate: [even, odd]},
"prior_halves": {candidate: [[even, odd] at each w]},
"prior_curves": {candidate: [metric at each w]}, "prior_weights": {candidate: w},
"prior_weight": w, "log_prior": {label: log p}, "answer": label, "profile": text}``.
Everything but `method`, `val`, `n_val` and `halves` only on label tasks;
`prior_weight` only where the winner uses the prior, so a server scoring the
user's labels adds ``w * log_prior[label]`` to each label's log-likelihood
before taking the best (`calibrated`); `answer` is the one label `majority`
answers with; `profile` only where the winner is a `profile+` candidate.
The record holds all a choice depends on, so the users a run did not refit
are chosen again from it without a model.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.errors import NotFoundError
from peftu.evaluation.metrics import LOWER_IS_BETTER, better, task_metrics
from peftu.quality.personalize import bm25_top_k, profile_text
from peftu.store.kinds import PLUG, SELECTION
from peftu.store.selection import MAJORITY, PRIOR, PROFILE, RETRIEVAL, calibrated

if TYPE_CHECKING:
    from peftu.neighbors.index import LabelIndex

log = logging.getLogger("peftu.fit")

SIMPLEST_FIRST = ("majority", "base", "global", "base+prior", "global+prior", "neighbors", "neighbors+prior",
                  "adapter", "adapter+prior",
                  "oppu", "oppu+prior", "profile+adapter", "profile+adapter+prior", "profile+oppu",
                  "profile+oppu+prior", "retrieval+adapter", "retrieval+adapter+prior", "retrieval+oppu",
                  "retrieval+oppu+prior",
                  "oppu+retrieval", "oppu+profile", "ia3", "prompt-tuning", "prefix-tuning",
                  "pplug", "pplug+prior", "pplug+oppu")
"""Candidates from the simplest (no model) to the most personal: ties go to the first."""

PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The weights of the prior tried on a user's validation split (0: the model alone)."""

SHRINK_EXAMPLES = 8.0
"""How many validation examples a candidate's task-wide mean counts as in each user's choice (0: the
user's own split alone), unless the task's validation halves clearly prefer another of `STRENGTHS`
(`task_strength`). See docs/results.md for what other values gave."""

STRENGTHS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
"""The shrinkage strengths `task_strength` tries."""


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


def _simplicity(name: str) -> tuple[int, str]:
    return (SIMPLEST_FIRST.index(name) if name in SIMPLEST_FIRST else len(SIMPLEST_FIRST), name)


@dataclass
class Choice:
    """One user's winner, what every candidate scored on their validation split, and what answering
    them with any candidate needs (so that they can be chosen again without a model)."""

    method: str
    val: dict[str, float]
    n_val: int
    prior_curves: dict[str, list[float]] = field(default_factory=dict)
    """Each `+prior` candidate's validation metric at each of `PRIOR_WEIGHTS`."""
    prior_weights: dict[str, float] = field(default_factory=dict)
    """Each `+prior` candidate's weight, as the task's users' validation splits chose it."""
    log_prior: dict[str, float] = field(default_factory=dict)
    answer: str | None = None
    """The one answer `majority` gives on a label task (what serving answers such a user)."""
    profile: str | None = None
    """A `profile+` winner's profile, as that candidate put it in front of the prompt (`select_fitted`
    sets it)."""
    halves: dict[str, list[float]] = field(default_factory=dict)
    """Each candidate's metric on the two halves of the validation split (even and odd examples), for
    choosing the task's shrinkage strength (`task_strength`); `+prior` candidates at their weight."""
    prior_halves: dict[str, list[list[float]]] = field(default_factory=dict)
    """Each `+prior` candidate's `halves` at each of `PRIOR_WEIGHTS`."""

    @property
    def prior_weight(self) -> float | None:
        return self.prior_weights.get(self.method)

    def record(self) -> dict:
        """The JSON a fit and the benchmark write and serving reads (see the module doc)."""
        out = {"method": self.method, "val": self.val, "n_val": self.n_val}
        if self.halves or self.prior_halves:
            out |= {"halves": self.halves, "prior_halves": self.prior_halves}
        if self.log_prior:
            out |= {"prior_curves": self.prior_curves, "prior_weights": self.prior_weights,
                    "log_prior": self.log_prior, "answer": self.answer}
        if self.prior_weight is not None:
            out["prior_weight"] = self.prior_weight
        if self.method.startswith(PROFILE) and self.profile is not None:
            out["profile"] = self.profile
        return out

    @classmethod
    def of_record(cls, entry: dict) -> Choice:
        return cls(entry["method"], entry["val"], entry.get("n_val", 0), entry.get("prior_curves", {}),
                   entry.get("prior_weights", {}), entry.get("log_prior", {}), entry.get("answer"),
                   entry.get("profile"), entry.get("halves", {}), entry.get("prior_halves", {}))

    def at_weights(self, weights: dict[str, float]) -> Choice:
        """This user's `+prior` scores at the task's chosen weights."""
        picked = {name: weights[name] for name in self.prior_curves}
        at = {name: PRIOR_WEIGHTS.index(w) for name, w in picked.items()}
        return replace(self, prior_weights=picked,
                       val=self.val | {name: self.prior_curves[name][i] for name, i in at.items()},
                       halves=self.halves | {name: self.prior_halves[name][i] for name, i in at.items()
                                             if name in self.prior_halves})


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


def shrunk(choices: dict[str, Choice], strength: float = SHRINK_EXAMPLES) -> dict[str, dict[str, float]]:
    """Each user's validation scores pulled toward each candidate's mean over all users who have it:
    ``(n * own + strength * mean) / (n + strength)``, `n` the user's validation examples."""
    pooled: dict[str, list[float]] = {}
    for choice in choices.values():
        for name, score in choice.val.items():
            pooled.setdefault(name, []).append(score)
    means = {name: sum(scores) / len(scores) for name, scores in pooled.items()}
    return {uid: {name: (c.n_val * score + strength * means[name]) / (c.n_val + strength) if c.n_val + strength
                  else score for name, score in c.val.items()}
            for uid, c in choices.items()}


def task_prior_weights(metric: str, choices: dict[str, Choice]) -> dict[str, float]:
    """Each `+prior` candidate's weight over the users who have it: the smallest whose mean validation
    metric is within one standard error (over users) of the best weight's (the one-standard-error rule:
    a weight that only fits the validation noise is not taken; 0 is the model alone)."""
    curves: dict[str, list[list[float]]] = {}
    for choice in choices.values():
        for name, curve in choice.prior_curves.items():
            curves.setdefault(name, []).append(curve)
    return {name: PRIOR_WEIGHTS[_one_standard_error(metric, of_users)] for name, of_users in curves.items()}


def _one_standard_error(metric: str, curves: list[list[float]]) -> int:
    """The first index whose mean over `curves` is no worse than the best mean plus its standard error."""
    n = len(curves)
    means = [sum(curve[i] for curve in curves) / n for i in range(len(curves[0]))]
    best = 0
    for i in range(1, len(means)):
        if better(metric, means[i], means[best]):
            best = i
    spread = math.sqrt(sum((curve[best] - means[best]) ** 2 for curve in curves) / (n - 1)) if n > 1 else 0.0
    worse = means[best] + (spread if metric in LOWER_IS_BETTER else -spread) / math.sqrt(n)
    return next(i for i, m in enumerate(means) if not better(metric, worse, m))


def task_strength(metric: str, choices: dict[str, Choice]) -> float:
    """The shrinkage strength for a task, chosen on its users' validation halves: each user's winner
    chosen on one half at each of `STRENGTHS` is judged on the other half (and the other way round).

    How much a user's own split should count depends on the task (on generated tasks, whose users
    are alike, the task-wide means choose better; on real crowd workers, who differ, their own
    splits do), and the halves measure it out of sample. `SHRINK_EXAMPLES` stays unless another
    strength's mean over users is better by more than one standard error of the paired per-user
    differences (the halves' noise must not move it). Only users with two or more validation
    examples are judged (a half needs one); with fewer than two such users, `SHRINK_EXAMPLES`."""
    split = {uid: c for uid, c in _at_task_weights(metric, choices).items() if c.halves and c.n_val >= 2}
    if len(split) < 2:
        return SHRINK_EXAMPLES
    n_half = {uid: ((c.n_val + 1) // 2, c.n_val // 2) for uid, c in split.items()}

    def held_out(strength: float) -> list[float]:
        per_user = dict.fromkeys(split, 0.0)
        for chosen_on, judged_on in ((0, 1), (1, 0)):
            half = {uid: replace(c, val={n: h[chosen_on] for n, h in c.halves.items()}, n_val=n_half[uid][chosen_on])
                    for uid, c in split.items()}
            scores = shrunk(half, strength)
            for uid, c in split.items():
                per_user[uid] += c.halves[choose(metric, scores[uid])][judged_on] / 2
        return list(per_user.values())

    results = {strength: held_out(strength) for strength in STRENGTHS}
    default = results[SHRINK_EXAMPLES]
    best = SHRINK_EXAMPLES
    for strength, per_user in results.items():
        if better(metric, _mean(per_user), _mean(results[best])):
            best = strength
    diffs = [a - b for a, b in zip(results[best], default)]
    spread = math.sqrt(sum((d - _mean(diffs)) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return best if abs(_mean(diffs)) > spread else SHRINK_EXAMPLES


def _at_task_weights(metric: str, choices: dict[str, Choice]) -> dict[str, Choice]:
    """Every user's choice with its `+prior` scores at the weights the task's users chose."""
    weights = task_prior_weights(metric, choices)
    return {uid: c.at_weights(weights) for uid, c in choices.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def choose_all(metric: str, choices: dict[str, Choice], strength: float = SHRINK_EXAMPLES) -> dict[str, Choice]:
    """Every user's winner: the `+prior` candidates at the task's weights, then by their `shrunk`
    validation scores (ties to the simpler)."""
    choices = _at_task_weights(metric, choices)
    scores = shrunk(choices, strength)
    return {uid: replace(c, method=choose(metric, scores[uid])) for uid, c in choices.items()}


def majority_answer(spec: TaskSpec, user: UserRecord, query: str) -> str:
    """The user's own baseline answer to `query` from their history (see the module doc)."""
    answered = [h.output for h in user.history if h.output.strip()]
    if spec.kind == "classification":
        counts = Counter(answered)
        order = {lab: i for i, lab in enumerate(spec.labels)}
        first = (lambda lab: (-counts[lab], order.get(lab, len(order)), lab))
        return min(counts, key=first) if counts else spec.labels[0]
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
    halves: list[dict[str, float]] = field(default_factory=list)
    """Its metrics on the validation split's even and odd examples (none with fewer than two)."""
    by_weight: list[Judged] | None = None
    """A `+prior` candidate's metrics at each of `PRIOR_WEIGHTS` (its `val` and `test` are at 0 until one
    is chosen: `at`)."""

    def at(self, weight: float | None) -> Judged:
        return self if self.by_weight is None or weight is None else self.by_weight[PRIOR_WEIGHTS.index(weight)]


def judged_users(users: list[UserRecord]) -> list[UserRecord]:
    """Users with the split they are judged by as `val`: their own, or their training split if they have none."""
    return [u if u.val else replace(u, val=u.train) for u in users]


def _answers(fn: Answers, spec: TaskSpec, user: UserRecord, **slot) -> tuple[list, list]:
    """A candidate's outputs on the user's judged and test inputs, in one call."""
    inputs = [e.input for e in user.val] + [e.input for e in user.test]
    out = fn(inputs, **slot)
    return out[:len(user.val)], out[len(user.val):]


def _judged(spec: TaskSpec, user: UserRecord, val_out: list, test_out: list) -> Judged:
    """Answers' metrics on the user's judged split, its halves, and test."""
    val_golds = [e.golds for e in user.val]
    halves = [task_metrics(spec, val_out[i::2], val_golds[i::2]) for i in (0, 1)] if len(val_out) >= 2 else []
    return Judged(task_metrics(spec, val_out, val_golds), task_metrics(spec, test_out, [e.golds for e in user.test]),
                  halves)


def judge(spec: TaskSpec, name: str, user: UserRecord, val_out: list, test_out: list) -> dict[str, Judged]:
    """A model candidate's metrics for a user, and on label tasks its `+prior` twin's at every weight."""
    if not uses_prior(spec):
        return {name: _judged(spec, user, val_out, test_out)}
    prior = log_prior(spec, user)
    by_weight = [_judged(spec, user, with_prior(spec, val_out, prior, w), with_prior(spec, test_out, prior, w))
                 for w in PRIOR_WEIGHTS]
    alone = by_weight[PRIOR_WEIGHTS.index(0.0)]
    return {name: alone, name + PRIOR: replace(alone, by_weight=by_weight)}


def _majority(spec: TaskSpec, user: UserRecord) -> Judged:
    def answers(split: str) -> list[str]:
        return [majority_answer(spec, user, e.input) for e in getattr(user, split)]

    return _judged(spec, user, answers("val"), answers("test"))


def model_answers(spec: TaskSpec, model, tokenizer) -> Answers:
    """A model as a candidate: label scores on label tasks (so the prior can be added), else answer texts."""
    from peftu.inference.predict import label_logprobs, predict

    answer = label_logprobs if uses_prior(spec) else predict
    return lambda inputs, **slot: answer(model, tokenizer, spec, inputs, **slot)


Contexts = Callable[[UserRecord, list[str], bool], list[str]]
"""contexts(user, inputs, own_texts) -> what goes on the lines before each input's prompt
(`TaskSpec.render_with`); `own_texts`: the inputs are the user's training texts (a user judged on
their training split), which must not find themselves."""


def own_adapter(spec: TaskSpec, base, tokenizer, store, task: str, base_fp: str,
                contexts: Contexts | None = None) -> Personal:
    """A user's own adapter of `task` from the store (on `base`, as a replica holds it) as a candidate;
    `contexts`: what goes before each prompt (the user's profile, their nearest labelled texts)."""
    from peftu.evaluation.evaluate import with_user_adapter

    answers = model_answers(spec if contexts is None else spec.rendered(), base, tokenizer)

    def own(user: UserRecord) -> tuple[list, list] | None:
        asked = user if contexts is None else _with_contexts(spec, user, contexts)
        outs, had = with_user_adapter(base, store, task, user.user_id,
                                      lambda **slot: _answers(answers, spec, asked, **slot), base_fp=base_fp)
        return outs if had else None
    return own


def _with_contexts(spec: TaskSpec, user: UserRecord, contexts: Contexts) -> UserRecord:
    """The user with their judged and test inputs rendered, each with its context before it."""
    def rendered(split: str) -> list[Example]:
        examples = getattr(user, split)
        inputs = [e.input for e in examples]
        found = contexts(user, inputs, split == "val" and user.val is user.train)
        return [replace(e, input=spec.render_with(e.input, c)) for e, c in zip(examples, found, strict=True)]
    return replace(user, val=rendered("val"), test=rendered("test"))


def profiles(spec: TaskSpec) -> Contexts:
    """The user's profile (`profile_text`) before every prompt: the `profile+` candidates."""
    return lambda user, inputs, _: [profile_text(spec, user)] * len(inputs)


def retrievals(spec: TaskSpec, index_of: IndexOf, encoder: Encoder) -> Contexts:
    """The user's nearest labelled training texts with their labels before each prompt
    (`LabelIndex.retrieved`, from their `neighbors` index): the `retrieval+` candidates."""
    return lambda user, inputs, own_texts: index_of(user).retrieved(spec, encoder().encode(inputs),
                                                                    leave_self=own_texts)


Personal = Callable[[UserRecord], tuple[list, list] | None]
"""A candidate of the user's own (their adapter, their neighbours): its outputs on the user's judged and
test inputs, None if they have none."""


IndexOf = Callable[[UserRecord], "LabelIndex"]
"""index_of(user): the user's `neighbors` index (`last_index`)."""

Encoder = Callable[[], object]
"""The sentence encoder (`peftu.pplug.encoder.HistoryEncoder`), loaded at its first call."""


def _lazy_encoder() -> Encoder:
    from peftu.pplug.encoder import HistoryEncoder

    return functools.cache(HistoryEncoder)


def last_index(store, task: str, encoder: Encoder) -> IndexOf:
    """index_of(user): the user's `neighbors` index (`peftu.neighbors.index.user_index`, published to the
    store under `task` for serving), kept for the last user asked (the candidates of one user share it)."""
    from peftu.neighbors.index import user_index

    kept: dict[str, LabelIndex] = {}

    def index_of(user: UserRecord) -> LabelIndex:
        if user.user_id not in kept:
            kept.clear()
            kept[user.user_id] = user_index(store, encoder(), task, user)
        return kept[user.user_id]
    return index_of


def own_neighbors(spec: TaskSpec, store, task: str, encoder: Encoder | None = None,
                  index_of: IndexOf | None = None) -> Personal:
    """A user's labels on their training texts nearest each input (`peftu.neighbors`) as a candidate; their
    index is published to the store under `task` for serving. A user judged on their training split
    (no validation split) is scored without each text's own label. `encoder`: shared with other
    candidates (default: its own, loaded for the first user); `index_of` too (`last_index`)."""
    encoder = encoder or _lazy_encoder()
    index_of = index_of or last_index(store, task, encoder)

    def mine(user: UserRecord) -> tuple[list, list] | None:
        index = index_of(user)
        if not index.labels:
            return None
        val = index.scores(encoder().encode([e.input for e in user.val]), spec.labels,
                           leave_self=user.val is user.train)
        return val, index.scores(encoder().encode([e.input for e in user.test]), spec.labels)
    return mine


def own_plug(spec: TaskSpec, base, tokenizer, base_fp: str, store, task: str, encoder: Encoder) -> Personal | None:
    """PPlug over `base` as a candidate: the soft tokens the task's plug gives each user from their history
    (whose embeddings are cached in the store, where serving reads them). None when the store has no plug
    of `task`, or one fitted for another base (a replica of `base` could not serve it)."""
    from peftu.errors import ForeignAdapterError
    from peftu.pplug.evaluate import user_soft_tokens
    from peftu.pplug.model import load_plug

    if store.latest_artifact(PLUG.of(task)) is None:
        return None
    try:
        plug, manifest = load_plug(store, task, base_fp=base_fp, encoder_fp=encoder().fingerprint)
    except ForeignAdapterError as e:
        log.info("PPlug is no candidate for %s: %s", task, e)
        return None
    log.info("PPlug %s of %s is a candidate", manifest.version, task)
    answers = model_answers(spec, base, tokenizer)

    def plugged(user: UserRecord) -> tuple[list, list] | None:
        if not user.history:
            return None
        soft = user_soft_tokens(plug, encoder(), store, spec, task, user,
                                [e.input for e in user.val] + [e.input for e in user.test])
        return _answers(answers, spec, user, soft=soft)
    return plugged


def candidates(spec: TaskSpec, store, task: str, own: Callable[..., Personal], own_name: str,
               plug_on: tuple[object, object, str] | None = None) -> dict[str, Personal]:
    """The personal candidates of a task: the user's own adapter (`own(contexts=None)`: `own_adapter` with
    all but its contexts given); on label tasks that adapter reading the user's profile and their
    nearest labelled texts, and their neighbours' votes; PPlug where the store has the task's plug for
    `plug_on` (base, tokenizer, its fingerprint)."""
    encoder = _lazy_encoder()
    out = {own_name: own()}
    if uses_prior(spec):
        index_of = last_index(store, task, encoder)
        out[PROFILE + own_name] = own(contexts=profiles(spec))
        out[RETRIEVAL + own_name] = own(contexts=retrievals(spec, index_of, encoder))
        out["neighbors"] = own_neighbors(spec, store, task, encoder, index_of)
    plugged = own_plug(spec, *plug_on, store, task, encoder) if plug_on is not None else None
    if plugged is not None:
        out["pplug"] = plugged
    return out


def score_users(spec: TaskSpec, users: list[UserRecord], models: dict[str, Answers], personal: dict[str, Personal],
                progress: bool = False) -> dict[str, tuple[Choice, dict[str, Judged]]]:
    """Every user's scores, not yet chosen by (`choose_all`): of `majority`, the shared `models` and the
    `personal` candidates, and every candidate's metrics. A user without a validation split is judged on
    their training split (`judged_users`). `progress`: a bar over the users."""
    from tqdm import tqdm

    scored = {}
    for user in tqdm(judged_users([u for u in users if u.test]), desc="selection: users scored", unit="user",
                     disable=not progress):
        scores = {"majority": _majority(spec, user)}
        for name, fn in models.items():
            scores |= judge(spec, name, user, *_answers(fn, spec, user))
        for name, own in personal.items():
            mine = own(user)
            if mine is not None:
                scores |= judge(spec, name, user, *mine)
        val = {name: j.val[spec.metric] for name, j in scores.items() if j.val and j.by_weight is None}
        curves = {name: [at.val[spec.metric] for at in j.by_weight] for name, j in scores.items()
                  if j.val and j.by_weight}
        halves = {name: [h[spec.metric] for h in j.halves] for name, j in scores.items()
                  if j.halves and j.by_weight is None}
        prior_halves = {name: [[h[spec.metric] for h in at.halves] for at in j.by_weight]
                        for name, j in scores.items() if j.halves and j.by_weight}
        label = uses_prior(spec)
        choice = Choice(MAJORITY, val, len(user.val), curves, {}, log_prior(spec, user) if label else {},
                        majority_answer(spec, user, "") if label else None, halves=halves, prior_halves=prior_halves)
        scored[user.user_id] = (choice, scores)
    return scored


def choose_users(spec: TaskSpec, users: list[UserRecord], models: dict[str, Answers], personal: dict[str, Personal],
                 progress: bool = False) -> tuple[dict[str, tuple[Choice, dict[str, Judged]]], float]:
    """`score_users`, then every user's choice among these users (`choose_all` at the task's
    `task_strength`), with each candidate's metrics at the weights chosen; and that strength."""
    scored = score_users(spec, users, models, personal, progress)
    choices = {uid: c for uid, (c, _) in scored.items()}
    strength = task_strength(spec.metric, choices)
    chosen = choose_all(spec.metric, choices, strength)
    return {uid: (chosen[uid], {name: j.at(chosen[uid].prior_weights.get(name)) for name, j in scores.items()})
            for uid, (_, scores) in scored.items()}, strength


def select_fitted(base_path: str, store, spec: TaskSpec, users: list[UserRecord], *,
                  refit: set[str] | None = None) -> dict[str, dict]:
    """After a fit: each user's choice among `majority`, the plain base, the base their adapters were
    fitted on (`global`: OPPU's merged task adapter, where they were), their own adapter (`oppu`, or
    `adapter` without OPPU), their `neighbors` on label tasks and `pplug` where the task has a plug for
    their base, each model `+prior` on label tasks; published as the task's selection record
    (`kinds.SELECTION`, schema in `peftu.store.selection`), which serving reads. Returns every entry.

    `refit`: the users whose adapters this run changed. Every other user keeps their scores of the
    task's last record if it was chosen for the same users' base (nothing else their scores depend
    on changed: new data or hyper-parameters refit them) and is chosen again from them beside the
    new ones (the task-wide means moved), so a re-run that skips everyone loads no model and writes
    nothing. None: score every user again."""
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
    own = functools.partial(own_adapter, spec, users_base, tokenizer, store, spec.name, users_fp)
    rescored = {u.user_id for u in todo}
    kept = {uid: Choice.of_record(entry) for uid, entry in last.items() if uid not in rescored}
    personal = candidates(spec, store, spec.name, own, "oppu" if oppu else "adapter",
                          plug_on=(users_base, tokenizer, users_fp))
    new = score_users(spec, todo, models, personal)
    everyone = kept | {uid: c for uid, (c, _) in new.items()}
    strength = task_strength(spec.metric, everyone)
    again = choose_all(spec.metric, everyone, strength)  # over every user's scores
    by_id = {u.user_id: u for u in users}

    def profiled(uid: str, c: Choice) -> Choice:  # what serving puts before a profile winner's prompt
        wanted = c.method.startswith(PROFILE) and c.profile is None and uid in by_id
        return replace(c, profile=profile_text(spec, by_id[uid])) if wanted else c
    chosen = {uid: profiled(uid, c).record() for uid, c in again.items()}
    store.put_record(SELECTION.of(spec.name), {"task": spec.name, "users_base": users_fp, "strength": strength,
                                               "plug": store.latest_artifact(PLUG.of(spec.name)), "users": chosen})
    return chosen


def _last_selection(store, task: str, base_path: str) -> dict[str, dict]:
    """The users of the task's latest selection record if it was chosen for the base the task's users'
    adapters belong to now (found from the store without loading a model) and with the task's plug of
    now (a new plug is a new candidate for everyone); else {}."""
    from peftu.model.base import base_fingerprint
    from peftu.model.bases import merged_fingerprint, users_task_adapter

    try:
        record = store.get_record(SELECTION.of(task))
    except NotFoundError:
        return {}
    base_fp = base_fingerprint(base_path)
    task_adapter = users_task_adapter(store, task, base_fp)
    users_fp = base_fp if task_adapter is None else merged_fingerprint(base_fp, task_adapter)
    current = record.get("users_base") == users_fp and record.get("plug") == store.latest_artifact(PLUG.of(task))
    return record.get("users", {}) if current else {}


def selected_counts(choices: dict[str, dict]) -> dict[str, int]:
    """How many users each method answers: the `selected` line of a run summary."""
    return dict(Counter(c["method"] for c in choices.values()).most_common())
