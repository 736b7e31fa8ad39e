"""`peftu bench quality`: every way of personalizing a task, on the same users and split.

A method is a function from the run's context to per-user metrics on the test
split; `METHODS` maps names to them, so a new row (PPlug) is one
`@method("name")` away. Every row is the per-user macro average, overall and
per activity bucket (`peftu.eval.macro_average`), as PEFT-U and LaMP report.

What each row is:

- `base`: the base model alone. `global`: one LoRA on every user's training
  data pooled (`peftu.fit.fit_global`).
- `majority`: no model. Classification: the user's most frequent training
  label (ties: the label first in the task's label list). Rating: the user's
  mean training rating (the MAE of a constant is also what a rating model
  must beat). Generation: the training output of the user's history item
  nearest the test input under BM25 (the user's own most similar past answer;
  a most frequent output is useless where no two outputs are the same).
- `retrieval`, `profile`: the user's BM25 top-k history or profile in the
  prompt (`peftu.personalize`), answered by the task adapter OPPU fits first,
  trained on all users' augmented prompts. The tiny base is no instruction
  follower, so augmented prompts only mean something to a model trained on
  them; this is LaMP's fine-tuned-with-retrieval setting.
- `oppu`, `oppu+retrieval`, `oppu+profile`: a LoRA per user (the banked fit)
  on top of the merged task adapter, trained and scored on plain, retrieval-
  or profile-augmented prompts.
- `ia3`, `prompt-tuning`, `prefix-tuning`: one module per user through plain
  PEFT (`peftu.peft_methods`).
- `pplug`: PPlug's plug (`peftu.pplug`, fitted once on all training users with
  Ray Train, its own defaults and one epoch) giving the frozen base personal
  soft tokens; `pplug+oppu`: the same plug over each user's OPPU adapter.

Adapters of a run go to the store under task names of their own
(`quality.<task>...`), so a benchmark never replaces a user's real adapters;
a re-run with the same data and settings reuses them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from peftu.config import LoraHParams
from peftu.data.schema import LOWER_IS_BETTER, TaskSpec, UserRecord
from peftu.errors import PeftuError
from peftu.evaluation.evaluate import evaluate_users
from peftu.evaluation.metrics import better, macro_average, task_metrics
from peftu.fitting.reference import fit_global, release
from peftu.store import AdapterStore

PerUser = dict[str, dict[str, float]]
BUCKETS = ("all", "few", "some", "many")


@dataclass
class QualityContext:
    """What every method gets: the task, its users, the base, a store and the settings."""

    spec: TaskSpec
    users: list[UserRecord]
    base_path: str
    store: AdapterStore
    hp: LoraHParams
    store_uri: str = ""
    """The store's URI, for Ray Train workers (PPlug's fit) that open it themselves."""
    endpoint_url: str | None = None
    k: int = 4
    pplug_steps: int = 300
    """PPlug's `min_steps`: the fewest steps its plug is fitted for."""
    progress: bool = True
    log: Callable[[str], None] = print
    _base: tuple | None = field(default=None, repr=False)

    def base(self) -> tuple[torch.nn.Module, object]:
        """The plain base and its tokenizer, loaded once (methods hand it back unchanged)."""
        if self._base is None:
            from peftu.model.base import load_base

            self._base = load_base(self.base_path)
        return self._base

    def store_spec(self, spec: TaskSpec, stage: str = "") -> TaskSpec:
        """`spec` under the benchmark's own store name, so real adapters of the task are never touched."""
        return spec.model_copy(update={"name": f"quality.{spec.name}{'.' + stage if stage else ''}"})


Method = Callable[[QualityContext], PerUser]
METHODS: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    """Register a row of the benchmark."""
    def register(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return register


# --- no personalization ----------------------------------------------------------------


@method("base")
def _base(ctx: QualityContext) -> PerUser:
    model, tokenizer = ctx.base()
    return evaluate_users(model, tokenizer, ctx.spec, ctx.users)


@method("global")
def _global(ctx: QualityContext) -> PerUser:
    from peftu.compare import global_hparams

    model, tokenizer = ctx.base()
    fitted = fit_global(model, tokenizer, ctx.spec, ctx.users, global_hparams(ctx.hp))
    try:
        return evaluate_users(fitted, tokenizer, ctx.spec, ctx.users)
    finally:
        release(fitted)


# --- the trivial personal baseline -----------------------------------------------------


def majority_answer(spec: TaskSpec, user: UserRecord, query: str) -> str:
    """The user's own baseline answer to `query` from their history (see the module doc)."""
    from peftu.personalize import bm25_top_k

    answered = [h.output for h in user.history if h.output.strip()]
    if spec.kind == "classification":
        counts = Counter(answered)
        order = {lab: i for i, lab in enumerate(spec.labels)}
        return min(counts, key=lambda lab: (-counts[lab], order.get(lab, len(order)), lab)) if counts else spec.labels[0]
    if spec.kind == "rating":
        values = [float(a) for a in answered]
        return f"{sum(values) / len(values):.4f}" if values else spec.labels[len(spec.labels) // 2]
    nearest = bm25_top_k(user.history, query, 1)
    return nearest[0].output if nearest else ""


@method("majority")
def _majority(ctx: QualityContext) -> PerUser:
    return {u.user_id: task_metrics(ctx.spec, [majority_answer(ctx.spec, u, e.input) for e in u.test],
                                    [e.output for e in u.test])
            for u in ctx.users if u.test}


# --- augmented prompts and OPPU ------------------------------------------------------


def _task_adapter(ctx: QualityContext, how: str | None) -> tuple[TaskSpec, list[UserRecord], TaskSpec]:
    """The (augmented) task and users, fitted a task adapter; returns them and the store spec of the task."""
    from peftu.fitting.oppu import ensure_task_adapter
    from peftu.personalize import augment_users

    spec, users = augment_users(ctx.spec, ctx.users, how, ctx.k) if how else (ctx.spec, ctx.users)
    stored = ctx.store_spec(spec)
    ensure_task_adapter(ctx.base_path, stored, users, ctx.hp, ctx.store)
    return spec, users, stored


def augmented_task_adapter_scores(ctx: QualityContext, how: str) -> PerUser:
    """The task adapter trained on augmented prompts, scored on the users' augmented test prompts."""
    from peftu.model.bases import load_merged_base

    spec, users, stored = _task_adapter(ctx, how)
    model, tokenizer, _ = load_merged_base(ctx.base_path, ctx.store, stored.name)
    return evaluate_users(model, tokenizer, spec, users)


def oppu_scores(ctx: QualityContext, how: str | None) -> PerUser:
    """OPPU: per-user LoRAs (banked fit) on the merged task adapter, with plain or augmented prompts.

    Users whose adapter is already current are not refitted; their test
    metrics come from their manifest, where the fit recorded them.
    """
    from tqdm import tqdm

    from peftu.fitting.banked import fit_users_banked
    from peftu.model.bases import load_merged_base

    spec, users, stored = _task_adapter(ctx, how)
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


for _how in ("retrieval", "profile"):
    method(_how)(lambda ctx, how=_how: augmented_task_adapter_scores(ctx, how))
    method(f"oppu+{_how}")(lambda ctx, how=_how: oppu_scores(ctx, how))
method("oppu")(lambda ctx: oppu_scores(ctx, None))


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
    from peftu.pplug import HistoryEncoder, load_plug, run_pplug_job

    cfg = PPlugConfig(seed=ctx.hp.seed, max_len=ctx.hp.max_len, min_steps=ctx.pplug_steps)
    run_pplug_job(PPlugJobConfig(store=ctx.store_uri, base=ctx.base_path, plug=cfg.model_dump(),
                                 endpoint_url=ctx.endpoint_url), spec, ctx.users)
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
    """The plug's soft tokens on the merged task adapter with each user's OPPU adapter (fitted if missing)."""
    from peftu.model.bases import load_merged_base
    from peftu.pplug.evaluate import evaluate_pplug

    spec = ctx.store_spec(ctx.spec)
    plug, encoder = _fitted_plug(ctx, spec)
    oppu_scores(ctx, None)
    model, tokenizer, merged_fp = load_merged_base(ctx.base_path, ctx.store, spec.name)
    return evaluate_pplug(model, tokenizer, spec, ctx.users, plug, encoder, ctx.store, progress=ctx.progress,
                          adapters_task=ctx.store_spec(ctx.spec, "oppu").name, base_fp=merged_fp)

ORDER = ["base", "global", "majority", "retrieval", "profile", "oppu", "oppu+retrieval", "oppu+profile",
         "ia3", "prompt-tuning", "prefix-tuning", "pplug", "pplug+oppu"]
"""The table's rows, in the order they read best; methods registered later follow."""


def method_names() -> list[str]:
    return [m for m in ORDER if m in METHODS] + sorted(set(METHODS) - set(ORDER))


def parse_methods(text: str | None) -> list[str]:
    """`--methods a,b,c` as a list; unknown names are one clear error naming them."""
    if not text:
        return method_names()
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise PeftuError(f"unknown method(s) {', '.join(unknown) or repr(text)}; "
                         f"choose from {', '.join(method_names())}")
    return list(dict.fromkeys(names))


# --- the data ------------------------------------------------------------------------

TWEETEVAL = "../shared/data/peft-u/tweeteval/annotations_g3.csv"
"""PEFT-U's tweeteval annotations (20 annotators as users), relative to the repository root."""


def load_quality_data(task: str | None, *, users: int | None = None, seed: int = 0, data: str | None = None,
                      lamp: str | None = None, lamp_outputs: str | None = None, endpoint_url: str | None = None
                      ) -> tuple[TaskSpec, list[UserRecord], str]:
    """The task's spec and users (at most `users`), and a line saying what was read.

    `task` is a generated task (`data`: a saved data set of it instead),
    `tweeteval` (`data`: the annotations CSV) or none with `lamp` (a LaMP
    questions file, the task named by `lamp_outputs`).
    """
    from pathlib import Path

    from peftu.data import loaders
    from peftu.data.io import load_task
    from peftu.data.synthetic import TASKS, generate

    if lamp:
        if not lamp_outputs:
            raise PeftuError("--lamp needs --lamp-outputs (the golds to score against)")
        spec, records, report = loaders.load_lamp(lamp, lamp_outputs)
    elif task == "tweeteval":
        path = Path(data or TWEETEVAL)
        if not path.is_file():
            raise PeftuError(f"tweeteval data not found at {path}; pass --data PATH to PEFT-U's annotations_g3.csv")
        spec, records, report = loaders.load_peftu_annotations(path, task_name="tweeteval", seed=seed)
    elif task in TASKS and data:
        spec, records = load_task(data, endpoint_url=endpoint_url)
        report = f"{len(records)} users from {data}"
    elif task in TASKS:
        spec, records, report = generate(task, users or 100, seed=seed)
    else:
        raise PeftuError(f"unknown task {task!r}; choose one of {', '.join([*sorted(TASKS), 'tweeteval'])}, "
                         "or give LaMP files with --lamp and --lamp-outputs")
    return spec, records[:users] if users else records, str(report)


# --- the run and its report --------------------------------------------------------------


@dataclass
class QualityResult:
    spec: TaskSpec
    users: list[UserRecord]
    settings: dict
    per_user: dict[str, PerUser] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def buckets(self, name: str) -> dict[str, dict[str, float]]:
        return macro_average(self.per_user[name], self.users)

    def value(self, name: str, bucket: str = "all") -> float | None:
        row = self.buckets(name).get(bucket)
        return row[self.spec.metric] if row else None

    @property
    def n_users(self) -> int:
        return len([u for u in self.users if u.test])

    def summary(self) -> dict:
        """The one-line JSON of `--json`."""
        return {"task": self.spec.name, "users": self.n_users, "metric": self.spec.metric,
                "methods": {name: self.value(name) for name in self.per_user}}

    def full(self) -> dict:
        """Everything: settings, example counts, per-bucket averages, per-user metrics, seconds."""
        return self.summary() | {
            "kind": self.spec.kind, "settings": self.settings,
            "examples": {s: sum(len(getattr(u, s)) for u in self.users) for s in ("train", "val", "test")},
            "buckets": {name: self.buckets(name) for name in self.per_user},
            "per_user": self.per_user, "seconds": self.seconds}


def run_quality(ctx: QualityContext, names: list[str]) -> QualityResult:
    """Run every named method on the context's users; each one's per-user test metrics."""
    if not any(u.test for u in ctx.users):
        raise PeftuError(f"no user of {ctx.spec.name} has test examples to score")
    result = QualityResult(ctx.spec, ctx.users, settings={
        "k": ctx.k, "pplug_steps": ctx.pplug_steps, "hparams": ctx.hp.model_dump(), "methods": names})
    for name in names:
        ctx.log(f"[{ctx.spec.name}] {name}")
        start = time.perf_counter()
        result.per_user[name] = METHODS[name](ctx)
        result.seconds[name] = round(time.perf_counter() - start, 1)
    return result


def merge_reports(reports: list[dict]) -> dict:
    """Reports of runs of one task on the same users with different `--methods`, as one.

    Long runs can be split by method (in parallel, sharing one store) and
    put together here; a method in several reports keeps its last result.
    """
    first = reports[0]
    for other in reports[1:]:
        if (other["task"], sorted(next(iter(other["per_user"].values())))) != \
                (first["task"], sorted(next(iter(first["per_user"].values())))):
            raise PeftuError(f"cannot merge results of {other['task']!r} with {first['task']!r}: "
                             "not the same task and users")
    merged = {**first, **{key: {} for key in ("methods", "buckets", "per_user", "seconds")}}
    for key in ("methods", "buckets", "per_user", "seconds"):
        for report in reports:
            merged[key] |= report[key]
    order = method_names()
    for key in ("methods", "buckets", "per_user", "seconds"):
        merged[key] = dict(sorted(merged[key].items(), key=lambda kv: order.index(kv[0])
                                  if kv[0] in order else len(order)))
    merged["settings"] = {**first["settings"], "methods": list(merged["methods"])}
    return merged


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: one row per method, one column per activity bucket."""
    any_method = next(iter(report["buckets"].values()))
    present = [b for b in BUCKETS if b in any_method]
    header = ["method", *[f"{b} ({any_method[b]['n']} users)" for b in present], "vs majority", "seconds"]
    metric = report["metric"]
    reference = report["methods"].get("majority")
    rows = []
    for name, buckets in report["buckets"].items():
        cells = [f"{buckets[b][metric]:.3f}" if b in buckets else "-" for b in present]
        value = report["methods"][name]
        if reference is None or name == "majority" or value is None:
            verdict = ""
        else:
            verdict = "beats" if better(metric, value, reference) else "does not beat"
        rows.append([name, *cells, verdict, f"{report['seconds'][name]:.0f}"])
    return header, rows


def render_table(report: dict):
    """The rich table printed at the end of a run."""
    from rich.table import Table

    header, rows = _rows(report)
    table = Table(title=f"{report['task']}: per-user macro {report['metric']} on the test split")
    for col in header:
        table.add_column(col, justify="left" if col in ("method", "vs majority") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def render_markdown(report: dict) -> str:
    """The same table as Markdown, with what it was run on (for docs/results.md)."""
    header, rows = _rows(report)
    ex, hp = report["examples"], report["settings"]["hparams"]
    lines = [f"**{report['task']}** ({report['kind']}, per-user macro {report['metric']}, "
             f"{'lower' if report['metric'] in LOWER_IS_BETTER else 'higher'} is better): "
             f"{report['users']} users, {ex['train']} train / {ex['val']} val / {ex['test']} test examples, "
             f"seed {hp['seed']}, {hp['epochs']} epoch(s) per user, max_len {hp['max_len']}, "
             f"k={report['settings']['k']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_results(reports: list[dict], path: str) -> None:
    """One panel per task: each method's overall score as a bar, the majority baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.2), squeeze=False)
    for ax, report in zip(axes[0], reports):
        names = [n for n, v in report["methods"].items() if v is not None]
        ax.bar(range(len(names)), [report["methods"][n] for n in names], color="tab:blue")
        if report["methods"].get("majority") is not None:
            ax.axhline(report["methods"]["majority"], color="tab:red", linestyle="--", label="per-user majority")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        arrow = "lower is better" if report["metric"] in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{report['task']} ({report['users']} users)")
        ax.set_ylabel(f"per-user macro {report['metric']} ({arrow})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
