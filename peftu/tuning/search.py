"""Searching LoRA rank, learning rate, alpha and epochs with Ray Tune.

A trial is one banked fit (`peftu.fitting.banked.fit_pack`) of a fixed sample of users
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
applies it. The results, their record and their tables are in `peftu.tuning.report`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

from peftu.config import SEARCHED, LoraHParams, SearchPoint, SearchSpace, TuneOptions
from peftu.data.schema import ACTIVITY_BUCKETS, LOWER_IS_BETTER, TaskSpec, UserRecord
from peftu.errors import PeftuError
from peftu.evaluation.evaluate import evaluate_examples
from peftu.evaluation.metrics import better, macro_average
from peftu.fitting.reference import FitResult
from peftu.model.lora import lora_config
from peftu.store.kinds import BEST, TUNE_RESULTS
from peftu.tuning.report import ALL, BucketResult, TrialRow, TuneRun

log = logging.getLogger("peftu.tune")


def trial_hparams(config: dict, fixed: dict) -> LoraHParams:
    """A trial's full hyper-parameters: the drawn values (a `SearchPoint`) over the fixed ones."""
    point = SearchPoint.model_validate(config)
    return LoraHParams(**fixed | {"r": point.r, "alpha": point.alpha_ratio * point.r, "lr": point.lr,
                                  "epochs": point.epochs})


def param_space(space: SearchSpace) -> dict:
    """The space as Ray Tune draws it: one `SearchPoint` per trial."""
    from ray import tune

    return {"r": tune.choice(space.ranks), "lr": tune.loguniform(space.lr_min, space.lr_max),
            "alpha_ratio": tune.choice(space.alpha_ratios), "epochs": tune.choice(space.epochs)}


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
    init_state = peft_initial_state(model, lora_config(hp), hp.seed)  # before the bank replaces the layers
    trainer = PackTrainer(model, len(users_), hp)
    scorer = EpochScorer(model, tokenizer, spec_, users_, hp, trainer.bank, tune.report)
    fit_pack(model, tokenizer, spec_, users_, hp, init_state, trainer, on_epoch_end=scorer)


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


def _search_alg(opts: TuneOptions):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [p.model_dump() for p in opts.points_to_evaluate] or None
    if opts.search == "random":
        return BasicVariantGenerator(points_to_evaluate=points, random_state=opts.seed,
                                     max_concurrent=opts.max_concurrent)
    try:
        import optuna  # noqa: F401 (OptunaSearch needs it)
    except ImportError:
        raise PeftuError("--search optuna needs the optuna package: pip install 'peftu[tune]'") from None
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    alg = OptunaSearch(points_to_evaluate=points, seed=opts.seed)
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
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=metric, mode="min" if metric in LOWER_IS_BETTER else "max", num_samples=opts.trials,
            scheduler=ASHAScheduler(max_t=max(space.epochs), grace_period=opts.grace_period,
                                    reduction_factor=opts.reduction_factor),
            search_alg=_search_alg(opts), reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(peftu_home() / "ray-runs"), verbose=0,
                                  callbacks=[_trial_logger(metric)]),
    )
    log.info("searching %s%s: %d trials on %d users", spec.name, "" if bucket == ALL else f" ({bucket})",
             opts.trials, len(users))
    rows = _rows(tuner.fit(), metric)
    best = best_trial(rows, metric)
    best_config = LoraHParams(**opts.fixed | {k: getattr(best, k) for k in SEARCHED}).model_dump() if best else None
    return BucketResult(bucket=bucket, users=[u.user_id for u in users], trials=rows, best_config=best_config,
                        best_metric=best.metric if best else None)


def run_tune(data: str, base: str, store_uri: str, space: SearchSpace, opts: TuneOptions,
             endpoint_url: str | None = None) -> TuneRun:
    """Search the data set's task on the connected Ray cluster (or a local one); save to the store."""
    from peftu.data.io import load_task
    from peftu.fitting.job import start_run
    from peftu.store import AdapterStore

    spec, users = load_task(data, endpoint_url=endpoint_url)
    store = AdapterStore.open(store_uri, endpoint_url=endpoint_url)
    buckets = [name for name, _ in ACTIVITY_BUCKETS] if opts.by_activity else [ALL]
    samples = {b: sample_users(users, opts.users, opts.seed, b) for b in buckets}
    samples = {b: s for b, s in samples.items() if s}
    if not samples:
        raise PeftuError(f"no user of {data} has both training and validation examples to tune on")
    run_id = start_run("tune")
    started = time.monotonic()
    # each bucket draws its own configs (seed + i): more of the space is seen across buckets
    results = {b: search_bucket(spec, s, base, space, opts.model_copy(update={"seed": opts.seed + i}),
                                f"{run_id}-{b}", b)
               for i, (b, s) in enumerate(samples.items())}
    run = TuneRun(run_id=run_id, task=spec.name, metric=spec.metric, by_activity=opts.by_activity,
                  space=space.model_dump(), buckets=results, seconds=time.monotonic() - started)
    record = run.record()
    store.put_record(TUNE_RESULTS.of(spec.name, run_id), record)
    if record["best"]:
        store.put_record(TUNE_RESULTS.of(spec.name, BEST), record)
    return run
