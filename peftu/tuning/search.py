"""Searching LoRA rank, learning rate, alpha and epochs with Ray Tune.

A trial is one banked fit (`peftu.bank.fit_pack`) of a fixed sample of users
with the trial's hyper-parameters, exactly as `peftu fit` would fit them: a
trial with `epochs=E` decays its learning rate over E epochs, and after each
of its epochs every user's adapter answers the user's own validation examples.
The trial reports the macro average of the task's metric over the sampled
users once all of them finished that epoch, so ASHA can stop a poor trial
after any epoch. Trials run as many at a time as the cluster has CPUs (or
GPUs) for them.

A trial that fails (a rank the model cannot use, a loss gone NaN, out of
memory) ends in error with its reason in the trial table; the search goes on.
The best config is the best final metric among trials that ran all their
epochs: only those were measured the way the fit job will run them.

With `by_activity`, each activity bucket (few / some / many history items)
gets its own search on its own users. The record saved to the store holds
the best config of each bucket ("all" without buckets); `peftu fit --config`
applies it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from peftu.config import LoraHParams, SearchSpace, TuneOptions
from peftu.data.schema import ACTIVITY_BUCKETS, LOWER_IS_BETTER, TaskSpec, UserRecord
from peftu.errors import PeftuError
from peftu.evaluation.evaluate import evaluate_examples
from peftu.evaluation.metrics import better, macro_average
from peftu.fitting.reference import FitResult

log = logging.getLogger("peftu.tune")

ALL = "all"
"""The bucket name of a search over every sampled user."""


def trial_hparams(config: dict, fixed: dict) -> LoraHParams:
    """A trial's full hyper-parameters: the drawn values over the fixed ones."""
    return LoraHParams(**fixed | {"r": config["r"], "alpha": config["alpha_ratio"] * config["r"],
                                  "lr": config["lr"], "epochs": config["epochs"]})


def check_rank(model, hp: LoraHParams) -> None:
    """Refuse a rank above the smallest target layer's width: the update could not use it."""
    import torch

    widths = {name: min(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in hp.target_modules}
    if not widths:
        raise ValueError(f"no layer of the model is named like the target modules {hp.target_modules}")
    name = min(widths, key=widths.get)
    if hp.r > widths[name]:
        raise ValueError(f"rank {hp.r} is larger than the model allows: {name} has only "
                         f"{widths[name]} dimensions")


class EpochScorer:
    """The `on_epoch_end` hook of a trial: scores each user after each epoch, reports whole epochs.

    A user's validation metric is taken with their slot of the bank answering,
    the moment their epoch ends; once every user has that epoch, its macro
    average goes to Tune.
    """

    def __init__(self, model, tokenizer, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams, bank, report):
        self.model, self.tokenizer, self.spec, self.users, self.hp = model, tokenizer, spec, users, hp
        self.bank, self.report = bank, report
        self.scores: dict[int, dict[str, dict[str, float]]] = {}

    def __call__(self, slot: int, epoch: int, result: FitResult) -> None:
        user = self.users[slot]
        bad = [loss for loss in result.losses if not math.isfinite(loss)]
        if bad:
            raise FloatingPointError(f"the loss of user {user.user_id!r} became {bad[0]} by epoch {epoch} "
                                     f"(lr {self.hp.lr:.3g} too high for rank {self.hp.r}?)")
        self.model.eval()
        with self.bank.rows(slot):
            scores = self.scores.setdefault(epoch, {})
            scores[user.user_id] = evaluate_examples(self.model, self.tokenizer, self.spec, user.val)
        if len(scores) == len(self.users):
            macro = macro_average(scores, self.users)["all"]
            self.report({self.spec.metric: macro[self.spec.metric], "epoch": epoch})


def _trial(config: dict, *, base: str, spec: dict, users: list[dict], fixed: dict) -> None:
    """One Tune trial: a banked fit of the sampled users, scored after every epoch."""
    from ray import tune

    from peftu.bank.model import peft_initial_state
    from peftu.fitting.banked import PackTrainer, fit_pack
    from peftu.model.base import load_base

    spec_, users_ = TaskSpec(**spec), [UserRecord.from_row(u) for u in users]
    hp = trial_hparams(config, fixed)
    model, tokenizer = load_base(base)
    check_rank(model, hp)
    init_state = peft_initial_state(model, hp.lora_config(), hp.seed)  # before the bank replaces the layers
    trainer = PackTrainer(model, len(users_), hp)
    scorer = EpochScorer(model, tokenizer, spec_, users_, hp, trainer.bank, tune.report)
    fit_pack(model, tokenizer, spec_, users_, hp, init_state, trainer, on_epoch_end=scorer)


@dataclass
class TrialRow:
    """One trial of the table: what it drew, how far it got, what it scored or why it failed."""

    trial_id: str
    r: int
    alpha: float
    lr: float
    epochs: int
    status: str
    """done (all its epochs), stopped (by ASHA), error."""
    epochs_run: int
    metric: float | None
    """The last reported value (after `epochs_run` epochs)."""
    history: list[float]
    error: str = ""


@dataclass
class BucketResult:
    """One search: its users, every trial, and the best finished trial's config."""

    bucket: str
    users: list[str]
    trials: list[TrialRow]
    best_config: dict | None
    best_metric: float | None


def _reason(error: BaseException, limit: int = 160) -> str:
    """The failure's own type and the start of its message, without Ray's wrapping and traceback."""
    cause = getattr(error, "cause", None) or error
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _rows(grid, metric: str) -> list[TrialRow]:
    rows = []
    for result in grid:
        cfg, history = result.config, []
        if result.metrics_dataframe is not None and metric in result.metrics_dataframe:
            history = [float(v) for v in result.metrics_dataframe[metric].dropna()]
        if result.error:
            status = "error"
        else:
            status = "done" if len(history) >= cfg["epochs"] else "stopped"
        rows.append(TrialRow(
            trial_id=(result.metrics or {}).get("trial_id") or Path(result.path).name,
            r=cfg["r"], alpha=cfg["alpha_ratio"] * cfg["r"], lr=cfg["lr"], epochs=cfg["epochs"],
            status=status, epochs_run=len(history), metric=history[-1] if history else None, history=history,
            error=_reason(result.error) if result.error else ""))
    return rows


def best_trial(rows: list[TrialRow], metric: str) -> TrialRow | None:
    """The finished trial with the best final metric; of equals, the cheapest (fewest epochs, then lowest rank)."""
    best = None
    for row in sorted(rows, key=lambda t: (t.epochs, t.r)):
        if row.status == "done" and (best is None or better(metric, row.metric, best.metric)):
            best = row
    return best


def sample_users(users: list[UserRecord], n: int, seed: int, bucket: str = ALL) -> list[UserRecord]:
    """`n` users (of one activity bucket) that have training and validation examples, seeded."""
    usable = [u for u in users if u.train and u.val and bucket in (ALL, u.activity)]
    return random.Random(seed).sample(usable, min(n, len(usable)))


def _search_alg(opts: TuneOptions, space: SearchSpace, metric: str):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if opts.search == "random":
        return BasicVariantGenerator(points_to_evaluate=opts.points_to_evaluate or None,
                                     random_state=opts.seed, max_concurrent=opts.max_concurrent)
    if opts.search != "optuna":
        raise PeftuError(f"unknown search {opts.search!r}: choose random or optuna")
    try:
        import optuna  # noqa: F401 (OptunaSearch needs it)
    except ImportError:
        raise PeftuError("--search optuna needs the optuna package: pip install 'peftu[tune]'") from None
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    alg = OptunaSearch(points_to_evaluate=opts.points_to_evaluate or None, seed=opts.seed)
    return ConcurrencyLimiter(alg, opts.max_concurrent) if opts.max_concurrent else alg


def _trial_logger(metric: str):
    """A Tune callback that logs each trial as it ends (Tune's own console output is off)."""
    from ray import tune

    class LogTrials(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            res = trial.last_result or {}
            log.info("trial %s (r=%s lr=%.3g epochs=%s): %s %.4f after %s epoch(s)", trial.trial_id,
                     trial.config["r"], trial.config["lr"], trial.config["epochs"], metric,
                     res.get(metric, float("nan")), res.get("epoch", 0))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.info("trial %s (r=%s lr=%.3g) failed", trial.trial_id, trial.config["r"], trial.config["lr"])

    return LogTrials()


def search_bucket(spec: TaskSpec, users: list[UserRecord], base: str, space: SearchSpace, opts: TuneOptions,
                  name: str, bucket: str = ALL) -> BucketResult:
    """One Tune search over `users` (already sampled); returns every trial and the best."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from peftu.paths import peftu_home

    metric = spec.metric
    trainable = tune.with_parameters(_trial, base=str(Path(base).resolve()) if Path(base).exists() else base,
                                     spec=spec.model_dump(), users=[u.to_row() for u in users], fixed=opts.fixed)
    resources = {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=metric, mode="min" if metric in LOWER_IS_BETTER else "max", num_samples=opts.trials,
            scheduler=ASHAScheduler(max_t=max(space.epochs), grace_period=opts.grace_period,
                                    reduction_factor=opts.reduction_factor),
            search_alg=_search_alg(opts, space, metric), reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(peftu_home() / "ray-runs"), verbose=0,
                                  callbacks=[_trial_logger(metric)]),
    )
    log.info("searching %s%s: %d trials on %d users", spec.name, "" if bucket == ALL else f" ({bucket})",
             opts.trials, len(users))
    rows = _rows(tuner.fit(), metric)
    best = best_trial(rows, metric)
    return BucketResult(bucket=bucket, users=[u.user_id for u in users], trials=rows,
                        best_config=trial_hparams({"r": best.r, "alpha_ratio": best.alpha / best.r, "lr": best.lr,
                                                   "epochs": best.epochs}, opts.fixed).model_dump() if best else None,
                        best_metric=best.metric if best else None)


@dataclass
class TuneRun:
    run_id: str
    task: str
    metric: str
    by_activity: bool
    space: dict
    buckets: dict[str, BucketResult]
    seconds: float

    def record(self) -> dict:
        """What goes to the store: every trial, and the best config of each bucket under `best`."""
        return {"run_id": self.run_id, "task": self.task, "metric": self.metric, "by_activity": self.by_activity,
                "space": self.space, "seconds": self.seconds,
                "buckets": {b: asdict(r) for b, r in self.buckets.items()},
                "best": {b: r.best_config for b, r in self.buckets.items() if r.best_config}}

    def summary(self) -> dict:
        """The `--json` line: trials, stopped_early, best_config, best_metric, metric (per bucket with buckets)."""
        rows = [t for r in self.buckets.values() for t in r.trials]
        pick = (lambda f: {b: f(r) for b, r in self.buckets.items()}) if self.by_activity else (
            lambda f: f(self.buckets[ALL]))
        return {"run_id": self.run_id, "trials": len(rows), "stopped_early": sum(t.status == "stopped" for t in rows),
                "errors": sum(t.status == "error" for t in rows), "metric": self.metric,
                "best_config": pick(lambda r: r.best_config), "best_metric": pick(lambda r: r.best_metric)}


def tune_record_key(task: str, name: str) -> str:
    return f"tune/{task}/{name}"


def check_search(space: SearchSpace, opts: TuneOptions) -> None:
    """Refuse a bad search before anything starts (Ray, a base build, trials that would all fail)."""
    space.check()
    if opts.trials < 1 or opts.users < 1:
        raise PeftuError("--trials and --users must be at least 1")
    try:
        LoraHParams(**opts.fixed)
    except ValueError as e:
        raise PeftuError(f"bad fixed hyper-parameters: {e}") from None


def run_tune(data: str, base: str, store_uri: str, space: SearchSpace, opts: TuneOptions,
             endpoint_url: str | None = None) -> TuneRun:
    """Search the data set's task on the connected Ray cluster (or a local one); save to the store."""
    from peftu.data.io import load_task
    from peftu.fitting.job import start_run
    from peftu.store import AdapterStore

    check_search(space, opts)
    spec, users = load_task(data)
    store = AdapterStore.open(store_uri, endpoint_url=endpoint_url)
    buckets = [name for name, _ in ACTIVITY_BUCKETS] if opts.by_activity else [ALL]
    samples = {b: sample_users(users, opts.users, opts.seed, b) for b in buckets}
    samples = {b: s for b, s in samples.items() if s}
    if not samples:
        raise PeftuError(f"no user of {data} has both training and validation examples to tune on")
    run_id = start_run("tune")
    started = time.monotonic()
    # each bucket draws its own configs (seed + i): more of the space is seen across buckets
    results = {b: search_bucket(spec, s, base, space, replace(opts, seed=opts.seed + i), f"{run_id}-{b}", b)
               for i, (b, s) in enumerate(samples.items())}
    run = TuneRun(run_id=run_id, task=spec.name, metric=spec.metric, by_activity=opts.by_activity,
                  space=asdict(space), buckets=results, seconds=time.monotonic() - started)
    record = run.record()
    store.put_json(tune_record_key(spec.name, run_id), record)
    if record["best"]:
        store.put_json(tune_record_key(spec.name, "best"), record)
    return run


def load_tuned(store, task: str, name: str = "best") -> dict[str, dict]:
    """The tuned configs of a search, by bucket ("all", or few / some / many)."""
    from peftu.errors import NotFoundError

    try:
        record = store.get_json(tune_record_key(task, name))
    except NotFoundError:
        raise PeftuError(f"no tuning results {name!r} for task {task!r} in the store; "
                         f"run `peftu tune` first (or name a run id)") from None
    if not record.get("best"):
        raise PeftuError(f"tuning run {name!r} of task {task!r} has no finished trial to take a config from")
    return record["best"]


def render_trials(result: BucketResult, metric: str):
    """The trial table of one search, best first, failures with their reason."""
    from rich.table import Table

    title = f"trials ({result.bucket}, {len(result.users)} users)"
    table = Table(title=title)
    for col in ("trial", "r", "alpha", "lr", "epochs", "status", metric, "error"):
        table.add_column(col)
    key_sign = 1 if metric in LOWER_IS_BETTER else -1
    ordered = sorted(result.trials, key=lambda t: (t.status == "error", t.status != "done",
                                                   key_sign * (t.metric if t.metric is not None else 0)))
    for t in ordered:
        status = t.status if t.status != "stopped" else f"stopped ({t.epochs_run})"
        table.add_row(t.trial_id, str(t.r), f"{t.alpha:g}", f"{t.lr:.3g}", str(t.epochs), status,
                      "" if t.metric is None else f"{t.metric:.4f}", t.error)
    return table


def render_best(run: TuneRun):
    """Best config per bucket: the small table `--by-activity` is for."""
    from rich.table import Table

    table = Table(title=f"best configs of {run.run_id} ({run.metric})")
    for col in ("bucket", "users", "r", "alpha", "lr", "epochs", run.metric):
        table.add_column(col)
    for bucket, r in run.buckets.items():
        c = r.best_config or {}
        table.add_row(bucket, str(len(r.users)), *(f"{c[k]:g}" if c else "-" for k in ("r", "alpha")),
                      f"{c['lr']:.3g}" if c else "-", str(c.get("epochs", "-")),
                      "-" if r.best_metric is None else f"{r.best_metric:.4f}")
    return table


def plot_search(run: TuneRun, path: str | Path) -> None:
    """Validation metric against rank and learning rate (colour: bucket, or rank); failed trials left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_rank, by_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = [math.log2(r) for r in run.space["ranks"]]
    for i, (bucket, result) in enumerate(run.buckets.items()):
        for status, marker in (("done", "o"), ("stopped", "x")):
            rows = [t for t in result.trials if t.status == status and t.metric is not None]
            label = f"{bucket}, {status}" if run.by_activity else status
            by_rank.scatter([t.r for t in rows], [t.metric for t in rows], marker=marker, label=label,
                            color=f"C{i if run.by_activity else int(status == 'stopped')}")
            colour = {"color": f"C{i}"} if run.by_activity else {
                "c": [math.log2(t.r) for t in rows], "cmap": "viridis", "vmin": min(ranks), "vmax": max(ranks)}
            sc = by_lr.scatter([t.lr for t in rows], [t.metric for t in rows], marker=marker, label=label, **colour)
    if not run.by_activity:
        fig.colorbar(sc, ax=by_lr, label="log2 rank")
    by_rank.set_xscale("log", base=2)
    by_lr.set_xscale("log")
    by_rank.set_xlabel("LoRA rank")
    by_lr.set_xlabel("learning rate")
    for ax in (by_rank, by_lr):
        ax.set_ylabel(f"validation {run.metric} (macro over users)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{run.task}: last reported {run.metric} per trial (x: stopped early by ASHA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
