"""The `selected` row: each user answered by the candidate that won on their own validation split.

The candidates (`peftu.fitting.selection`): `majority`, the plain base, the
pooled fit (`global`, OPPU's task adapter) and the user's OPPU adapter, each
alone and, on label tasks, with the user's label prior added at the weight
their validation split picks (`+prior`). A user without a validation split
is judged on their training split instead (in-sample: it favours the fitted
candidates; LaMP's files have no validation split). Who won is kept in the
run's results (`choices`: per user, `Choice.record`), as a fit records it for
serving. The retrieval and profile variants, IA3, prompt and prefix tuning
and PPlug are not candidates here: each would add its own fit to every run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from peftu.data.schema import TaskSpec, UserRecord
from peftu.evaluation.metrics import task_metrics
from peftu.fitting.selection import PRIOR, Choice, best_prior_weight, choose, log_prior, uses_prior, with_prior
from peftu.quality.context import PerUser, QualityContext
from peftu.quality.methods import majority_answer, method, oppu_scores, pooled_fit

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


def _shared_model(spec: TaskSpec, model, tokenizer) -> Answers:
    from peftu.inference.predict import label_logprobs, predict

    answer = label_logprobs if uses_prior(spec) else predict
    return lambda inputs, **slot: answer(model, tokenizer, spec, inputs, **slot)


def candidates(ctx: QualityContext, users: list[UserRecord]) -> dict[str, dict[str, Judged]]:
    """Every candidate's metrics for every (judged) user: `{user_id: {candidate: Judged}}`."""
    from peftu.evaluation.evaluate import with_user_adapter
    from peftu.model.bases import load_merged_base

    spec = ctx.spec
    out = {u.user_id: {"majority": _majority(spec, u)} for u in users}
    base, tokenizer = ctx.base()
    _, _, stored = pooled_fit(ctx, None)
    oppu_scores(ctx, None)  # the users' OPPU adapters, fitted where not current
    merged, merged_tok, merged_fp = load_merged_base(ctx.base_path, ctx.store, stored.name)
    oppu_task = ctx.store_spec(spec, "oppu").name
    shared = {"base": _shared_model(spec, base, tokenizer), "global": _shared_model(spec, merged, merged_tok)}
    for user in users:
        for name, fn in shared.items():
            out[user.user_id] |= judge(spec, name, user, *_answers(fn, spec, user))
        own = _shared_model(spec, merged, merged_tok)
        (val_out, test_out), had = with_user_adapter(merged, ctx.store, oppu_task, user.user_id,
                                                     lambda **slot: _answers(own, spec, user, **slot),
                                                     base_fp=merged_fp)
        if had:
            out[user.user_id] |= judge(spec, "oppu", user, val_out, test_out)
    return out


@method("selected")
def _selected(ctx: QualityContext) -> PerUser:
    users = [u for u in judged_users(ctx.users) if u.test]
    judged = candidates(ctx, users)
    per_user, choices = {}, {}
    for user in users:
        scores = judged[user.user_id]
        winner = choose(ctx.spec.metric, {name: j.val[ctx.spec.metric] for name, j in scores.items() if j.val})
        choice = Choice(winner, {name: j.val[ctx.spec.metric] for name, j in scores.items() if j.val},
                        scores[winner].prior_weight, log_prior(ctx.spec, user) if winner.endswith(PRIOR) else {})
        choices[user.user_id] = choice.record()
        per_user[user.user_id] = scores[winner].test
    ctx.notes["choices"] = choices
    ctx.log(f"[{ctx.spec.name}] selected: {dict(Counter(c['method'] for c in choices.values()).most_common())}")
    return per_user
