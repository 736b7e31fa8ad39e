"""The benchmark's methods: every way of personalizing a task, one row each.

A method is a function from the run's context to per-user metrics on the test
split; `METHODS` maps names to them, so a new row is one `@method("name")`
away. Every row is the per-user macro average, overall and per activity
bucket (`peftu.evaluation.metrics.macro_average`), as PEFT-U and LaMP report.

What each row is:

- `base`: the base model alone.
- `global`: the one pooled fit, a LoRA on every user's training data
  (`peftu.fitting.oppu.ensure_task_adapter`, OPPU's task adapter), merged
  into the base: the non-personal baseline.
- `stored`: each user's own adapter from the store, under the task's real
  name (what `peftu fit` or the fit job published), on the base it was fitted
  on, loaded as serving loads it; a user without one is answered by that base.
  Only run when named (`--methods`), since another job fits those adapters.
- `majority`: no model. Classification: the user's most frequent training
  label (ties: the label first in the task's label list). Rating: the level
  nearest the user's mean training rating (an answer is a level, as a model's
  is; PEFT-U's per-user mean-rating baseline). Generation: the training output of the user's history item
  nearest the test input under BM25 (the user's own most similar past answer;
  a most frequent output is useless where no two outputs are the same).
- `neighbors` (label tasks): no LLM. The labels the user gave their training
  texts most similar to the test text under the real sentence encoder
  (`peftu.neighbors`), weighted by similarity.
- `retrieval`, `profile`: the user's BM25 top-k history or profile in the
  prompt (`peftu.quality.personalize`), answered by the pooled fit trained on
  all users' augmented prompts. The tiny base is no instruction follower, so
  augmented prompts only mean something to a model trained on them; this is
  LaMP's fine-tuned-with-retrieval setting.
- `oppu`, `oppu+retrieval`, `oppu+profile`: a LoRA per user (the banked fit)
  on top of the merged pooled fit, trained and scored on plain, retrieval- or
  profile-augmented prompts.
- `ia3`, `prompt-tuning`, `prefix-tuning`: one module per user through plain
  PEFT (`peftu.fitting.peft_methods`).
- `pplug`: PPlug's plug (`peftu.pplug`, fitted once on all training users with
  Ray Train, its own defaults and one epoch) giving the frozen base personal
  soft tokens; `pplug+oppu`: the same plug over each user's OPPU adapter.

- `selected`: each user answered by the candidate that won on their own
  validation split (`peftu.fitting.selection`): `majority`, `base`, `global`,
  `oppu`, on label tasks `neighbors`, `pplug` where the run's `pplug` row fitted the
  plug, and on label tasks each model with the user's label prior added.

What a run fits goes to the store under task names of its own
(`kinds.quality_task`: `quality.<task>...`), so a benchmark never replaces a
task's real adapters; a re-run with the same data and settings reuses them.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

from peftu.data.schema import TaskSpec, UserRecord
from peftu.errors import PeftuError
from peftu.evaluation.evaluate import evaluate_adapters, evaluate_users
from peftu.evaluation.metrics import task_metrics
from peftu.fitting.selection import majority_answer
from peftu.quality.context import PerUser, QualityContext
from peftu.quality.personalize import AUGMENTATIONS, augment_users

Method = Callable[[QualityContext], PerUser]
METHODS: dict[str, Method] = {}
ON_REQUEST: set[str] = set()
"""Methods run only when named: they score what another job put in the store."""


def method(name: str, *, on_request: bool = False) -> Callable[[Method], Method]:
    """Register a row of the benchmark."""
    def register(fn: Method) -> Method:
        METHODS[name] = fn
        if on_request:
            ON_REQUEST.add(name)
        return fn
    return register


# --- no personalization, and the users' own adapters -----------------------------------


@method("base")
def _base(ctx: QualityContext) -> PerUser:
    model, tokenizer = ctx.base()
    return evaluate_users(model, tokenizer, ctx.spec, ctx.users)


@method("stored", on_request=True)
def _stored(ctx: QualityContext) -> PerUser:
    from peftu.model.bases import load_users_base

    model, tokenizer, base_fp = load_users_base(ctx.base_path, ctx.store, ctx.spec.name)
    per_user, without = evaluate_adapters(model, tokenizer, ctx.spec, ctx.users, ctx.store, base_fp=base_fp,
                                          progress=ctx.progress)
    if without:
        ctx.log(f"[{ctx.spec.name}] {len(without)} users have no adapter and are answered by the base")
    return per_user


# --- the trivial personal baseline -----------------------------------------------------


@method("majority")
def _majority(ctx: QualityContext) -> PerUser:
    return {u.user_id: task_metrics(ctx.spec, [majority_answer(ctx.spec, u, e.input) for e in u.test],
                                    [e.golds for e in u.test])
            for u in ctx.users if u.test}


@method("neighbors")
def _neighbors(ctx: QualityContext) -> PerUser:
    """Label tasks: the user's labels on their training texts nearest each test text (`peftu.neighbors`)."""
    from peftu.fitting.selection import own_neighbors, uses_prior

    if not uses_prior(ctx.spec):
        ctx.log(f"[{ctx.spec.name}] neighbors answers label tasks only: no row")
        return {}
    labels, answers = ctx.spec.labels, own_neighbors(ctx.spec, ctx.store, ctx.store_spec(ctx.spec).name)
    out = {}
    for user in (u for u in ctx.users if u.test):
        found = answers(user)
        if found is not None:
            preds = [labels[max(range(len(s)), key=s.__getitem__)] for s in found[1]]
            out[user.user_id] = task_metrics(ctx.spec, preds, [e.golds for e in user.test])
    return out


# --- the pooled fit (global, retrieval, profile) and OPPU on top of it -------------------


def pooled_fit(ctx: QualityContext, how: str | None) -> tuple[TaskSpec, list[UserRecord], TaskSpec]:
    """The (augmented) task and users, and the store spec under which their pooled fit now is current."""
    from peftu.fitting.oppu import ensure_task_adapter

    spec, users = augment_users(ctx.spec, ctx.users, how, ctx.k) if how else (ctx.spec, ctx.users)
    stored = ctx.store_spec(spec)
    ensure_task_adapter(ctx.base_path, stored, users, ctx.hp, ctx.store)
    return spec, users, stored


def pooled_scores(ctx: QualityContext, how: str | None) -> PerUser:
    """The pooled fit merged into the base, scored on the users' plain or augmented test prompts."""
    from peftu.model.bases import load_merged_base

    spec, users, stored = pooled_fit(ctx, how)
    model, tokenizer, _ = load_merged_base(ctx.base_path, ctx.store, stored.name)
    return evaluate_users(model, tokenizer, spec, users)


def oppu_scores(ctx: QualityContext, how: str | None) -> PerUser:
    """OPPU: per-user LoRAs (banked fit) on the merged pooled fit, with plain or augmented prompts.

    Users whose adapter is already current are not refitted; their test
    metrics come from their manifest, where the fit recorded them.
    """
    from tqdm import tqdm

    from peftu.fitting.banked import fit_users_banked
    from peftu.model.bases import load_merged_base

    spec, users, stored = pooled_fit(ctx, how)
    model, tokenizer, merged_fp = load_merged_base(ctx.base_path, ctx.store, stored.name)
    per_user_spec = ctx.store_spec(spec, "oppu")
    with tqdm(total=len(users), desc=f"oppu{'+' + how if how else ''} per user", unit="user",
              disable=not ctx.progress) as bar:
        summary = fit_users_banked(model, tokenizer, per_user_spec, users, ctx.hp, ctx.store, base_fp=merged_fp,
                                   on_progress=lambda done: bar.update(len(done.fitted)))
    if summary.failed:
        ctx.log(f"oppu: {len(summary.failed)} users could not be fitted: {sorted(summary.failed)}")
    for uid in summary.skipped:
        summary.metrics[uid] = ctx.store.manifest(per_user_spec.name, uid).metrics
    return {uid: {k.removeprefix("test_"): v for k, v in m.items() if k.startswith("test_")}
            for uid, m in summary.metrics.items()}


method("global")(lambda ctx: pooled_scores(ctx, None))
method("oppu")(lambda ctx: oppu_scores(ctx, None))
for _how in AUGMENTATIONS:
    method(_how)(lambda ctx, how=_how: pooled_scores(ctx, how))
    method(f"oppu+{_how}")(lambda ctx, how=_how: oppu_scores(ctx, how))


# --- PEFT-U's other per-user methods ----------------------------------------------------


def _peft_method(name: str) -> Method:
    def run(ctx: QualityContext) -> PerUser:
        from peftu.fitting.peft_methods import fit_and_score_users

        model, tokenizer = ctx.base()
        return fit_and_score_users(model, tokenizer, ctx.spec, ctx.users, ctx.hp, name, progress=ctx.progress)
    return run


for _name in ("ia3", "prompt-tuning", "prefix-tuning"):
    method(_name)(_peft_method(_name))


# --- PPlug ------------------------------------------------------------------------------------


def _fitted_plug(ctx: QualityContext, spec: TaskSpec):
    """The benchmark's plug of the task, fitted once on all training users with Ray Train (reused when current)."""
    from peftu.config import PPlugConfig, PPlugJobConfig
    from peftu.model.base import base_fingerprint
    from peftu.pplug.encoder import HistoryEncoder
    from peftu.pplug.model import load_plug
    from peftu.pplug.train import run_pplug_job

    cfg = PPlugConfig(seed=ctx.hp.seed, max_len=ctx.hp.max_len, min_steps=ctx.pplug_steps)
    run_pplug_job(PPlugJobConfig(store=ctx.store_uri, base=ctx.base_path, plug=cfg, endpoint_url=ctx.endpoint_url),
                  spec, ctx.users)
    encoder = HistoryEncoder()
    plug, _ = load_plug(ctx.store, spec.name, base_fp=base_fingerprint(ctx.base_path),
                        encoder_fp=encoder.fingerprint)
    return plug, encoder


@method("pplug")
def _pplug(ctx: QualityContext) -> PerUser:
    from peftu.pplug.evaluate import evaluate_pplug

    spec = ctx.store_spec(ctx.spec)
    plug, encoder = _fitted_plug(ctx, spec)
    model, tokenizer = ctx.base()
    return evaluate_pplug(model, tokenizer, spec, ctx.users, plug, encoder, ctx.store, progress=ctx.progress)


@method("pplug+oppu")
def _pplug_oppu(ctx: QualityContext) -> PerUser:
    """The plug's soft tokens on the merged pooled fit with each user's OPPU adapter (fitted if missing)."""
    from peftu.model.bases import load_merged_base
    from peftu.pplug.evaluate import evaluate_pplug

    spec = ctx.store_spec(ctx.spec)
    plug, encoder = _fitted_plug(ctx, spec)
    oppu_scores(ctx, None)
    model, tokenizer, merged_fp = load_merged_base(ctx.base_path, ctx.store, spec.name)
    return evaluate_pplug(model, tokenizer, spec, ctx.users, plug, encoder, ctx.store, progress=ctx.progress,
                          adapters_task=ctx.store_spec(ctx.spec, "oppu").name, base_fp=merged_fp)


# --- never worse: each user's validation winner ------------------------------------------------


@method("selected")
def _selected(ctx: QualityContext) -> PerUser:
    """Each user answered by the candidate that won on their validation split (`peftu.fitting.selection`):
    `majority`, the base, the pooled fit (`global`), their OPPU adapter, (label tasks) their
    `neighbors` and that adapter reading their profile or nearest labelled texts (`profile+oppu`,
    `retrieval+oppu`) and, where the bench's store
    holds the task's plug (the `pplug` row fits it: name it before `selected`), `pplug` on the base;
    each model also `+prior` on label tasks. Who won goes into the results (`choices`). The rows
    fitted on augmented prompts (`oppu+retrieval`, `oppu+profile`), IA3, prompt and prefix tuning are
    not candidates: each would add its own fit to every run."""
    from peftu.fitting.selection import candidates, choose_users, model_answers, own_adapter
    from peftu.model.base import base_fingerprint
    from peftu.model.bases import load_merged_base

    spec = ctx.spec
    base, tokenizer = ctx.base()
    _, _, stored = pooled_fit(ctx, None)
    oppu_scores(ctx, None)  # the users' OPPU adapters, fitted where not current
    merged, merged_tok, merged_fp = load_merged_base(ctx.base_path, ctx.store, stored.name)
    models = {"base": model_answers(spec, base, tokenizer), "global": model_answers(spec, merged, merged_tok)}
    own = functools.partial(own_adapter, spec, merged, merged_tok, ctx.store, ctx.store_spec(spec, "oppu").name,
                            merged_fp)
    personal = candidates(spec, ctx.store, ctx.store_spec(spec).name, own, "oppu",
                          plug_on=(base, tokenizer, base_fingerprint(ctx.base_path)))
    chosen, ctx.notes["strength"] = choose_users(spec, ctx.users, models, personal, progress=ctx.progress)
    ctx.notes["choices"] = {uid: choice.record() | {"test": {n: j.test[spec.metric] for n, j in scores.items()}}
                            for uid, (choice, scores) in chosen.items()}  # test: what each candidate would have got
    ctx.log(f"[{spec.name}] selected (strength {ctx.notes['strength']:g}): "
            f"{dict(Counter(c.method for c, _ in chosen.values()).most_common())}")
    return {uid: scores[choice.method].test for uid, (choice, scores) in chosen.items()}


# --- names ---------------------------------------------------------------------------------

ORDER = ["base", "global", "stored", "majority", "neighbors", "retrieval", "profile", "oppu", "oppu+retrieval",
         "oppu+profile", "ia3", "prompt-tuning", "prefix-tuning", "pplug", "pplug+oppu", "selected"]
"""The table's rows, in the order they read best; methods registered later follow."""


def method_names() -> list[str]:
    """Every method, in table order."""
    return [m for m in ORDER if m in METHODS] + sorted(set(METHODS) - set(ORDER))


def default_methods() -> list[str]:
    """What a run without `--methods` runs: every method but those run only when named."""
    return [m for m in method_names() if m not in ON_REQUEST]


def parse_methods(text: str | None) -> list[str]:
    """`--methods a,b,c` as a list (none: the default methods); unknown names are one clear error naming them."""
    if not text:
        return default_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise PeftuError(f"unknown method(s) {', '.join(unknown) or repr(text)}; "
                         f"choose from {', '.join(method_names())}")
    return list(dict.fromkeys(names))
