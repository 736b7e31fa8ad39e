"""Fitting every user's adapter across a Ray cluster with Ray Train.

The driver reads the task's user ids alone (not their histories) and hands them to a
`TorchTrainer` as a Ray Dataset; each worker takes its own disjoint shard (split with
`equal=False`, so no user is ever dropped to even out the shards) and reads its users'
rows from the saved Parquet file itself (`load_users`), so the driver's memory does not
grow with the users' data. A worker plans its shard once against the
task's index (which users are current: `plan_users`), streams the rest
through one bank (`peftu.fitting.banked.fit_users_banked`) and publishes each
user's adapter as soon as that user's fit ends. Workers exchange nothing but
progress, which they send to a small actor that the driver reads for the log
(users done / total, users per hour, and an ETA from the training examples
left, overall and per worker) and for the run summary it writes to the store
(counts, and the failures listed). After the fits, each refitted user's method
is chosen on their validation split and the task's selection record published
(`peftu.fitting.selection`; `FitJobConfig.select`), which serving answers by.

Resume is by fingerprint: a worker skips users whose adapter exists from the
same base, data and hyper-parameters. When a worker dies, `FailureConfig`
restarts the group; the restarted workers skip what was already published, so
only the users in flight are fitted again.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import ray
from ray.train import DataConfig

from peftu.config import FitJobConfig
from peftu.data.schema import ACTIVITY_BUCKETS, TaskSpec, UserRecord
from peftu.errors import PeftuError
from peftu.fitting.reference import FitSummary
from peftu.store.kinds import RUN_SUMMARY

if TYPE_CHECKING:
    from peftu.store import AdapterStore

log = logging.getLogger("peftu.fit")
T = TypeVar("T")

STATUS_RANK = {"skipped": 0, "failed": 1, "fitted": 2}


@ray.remote(num_cpus=0)
class FitProgress:
    """Where workers report their plans and finished users; the driver reads it for the log and summary.

    A user's status is the best it reached in this run: a user fitted before a
    worker restart and skipped after it counts as fitted. Each worker's plan
    says how much work (training examples) each user it will fit costs; a
    restarted worker plans again, and its rate starts over.
    """

    def __init__(self, total: int):
        self.total = total
        self.status: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.workers: dict[str, dict] = {}

    def plan(self, worker: str, work: dict[str, int]) -> None:
        self.workers[worker] = {"work": dict(work), "done": 0, "fitted": 0, "started": time.monotonic()}

    def record(self, statuses: dict[str, str], reasons: dict[str, str], worker: str | None = None) -> None:
        for user, status in statuses.items():
            if STATUS_RANK[status] >= STATUS_RANK[self.status.get(user, "skipped")]:
                self.status[user] = status
            w = self.workers.get(worker)
            if w is not None and user in w["work"]:  # skipped (pack-parallel plans late): no work done
                work = w["work"].pop(user)
                w["done"] += work if status != "skipped" else 0
                w["fitted"] += status == "fitted"
        self.reasons |= reasons

    def snapshot(self) -> dict:
        """Counts and each worker's progress: small whatever the number of users."""
        now = time.monotonic()
        workers = {}
        for name, w in sorted(self.workers.items()):
            rate = w["done"] / (now - w["started"]) if w["done"] else 0.0  # examples per second
            left = sum(w["work"].values())
            workers[name] = {"fitted": w["fitted"], "left_users": len(w["work"]), "left_examples": left,
                             "eta_s": left / rate if rate else (0.0 if not left else None)}
        statuses = list(self.status.values())
        return {"total": self.total, "done": len(statuses), "fitted": statuses.count("fitted"), "workers": workers}

    def final(self) -> tuple[dict[str, str], dict[str, str]]:
        return dict(self.status), dict(self.reasons)


class UserShards(DataConfig):
    """Split the users between workers without dropping any (Ray's default evens shards by dropping rows).

    Pack-parallel runs (`split=False`) give every worker all users instead:
    the workers of a group must see the same users.
    """

    def __init__(self, split: bool = True):
        super().__init__()
        self.split = split

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            splits = ds.streaming_split(world_size, equal=False) if self.split else [ds] * world_size
            for i, split in enumerate(splits):
                output[i][name] = split
        return output


def start_run(kind: str) -> str:
    """Connect to Ray (the cluster this process was started on, or a local one) and name a new run."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def users_trainer(loop, loop_config: dict, rows: list[dict], *, run_id: str, workers: int, use_gpu: bool,
                  cpus_per_worker: float, split: bool, max_failures: int = 0):
    """A `TorchTrainer` whose workers read `rows` (users' rows, or their ids) as a Ray Dataset
    (`UserShards(split)`), with its run kept under `$PEFTU_HOME/ray-runs/<run_id>`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from peftu.paths import peftu_home

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=run_id, storage_path=str(peftu_home() / "ray-runs"),
                             failure_config=FailureConfig(max_failures=max_failures)),
        datasets={"users": ray.data.from_items(rows)},
        dataset_config=UserShards(split=split),
    )


def _summary_statuses(summary: FitSummary) -> dict[str, str]:
    return ({u: "fitted" for u in summary.fitted} | {u: "skipped" for u in summary.skipped}
            | {u: "failed" for u in summary.failed})


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: fit and publish its shard of users, each as soon as it is done."""
    job = FitJobConfig.model_validate(config["job"])
    if job.deepspeed and not job.use_gpu:
        from peftu.fitting.zero import use_cpu_accelerator
        use_cpu_accelerator()  # before anything imports deepspeed
    import ray.train.torch
    import torch

    from peftu.fitting.banked import fit_users_banked, plan_users
    from peftu.model.bases import load_users_base
    from peftu.store import AdapterStore

    spec = TaskSpec(**config["spec"])
    progress = ray.get_actor(config["progress_actor"])
    users = shard_users(job, list(ray.train.get_dataset_shard("users").iter_rows()), config["source"])
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    store = AdapterStore.open(job.store, endpoint_url=job.endpoint_url)
    base, tokenizer, base_fp = load_users_base(job.base, store, spec.name, oppu=job.oppu)
    base.to(device)
    # Pack-parallel workers fit one stream together: their work is the world's, reported once.
    rank = ray.train.get_context().get_world_rank()
    worker = "all" if job.deepspeed else str(rank)

    def report(done: FitSummary) -> None:
        ray.get(progress.record.remote(_summary_statuses(done), done.failed, worker))

    common = dict(base_fp=base_fp, pack_size=job.pack_size, token_budget=job.token_budget,
                  on_progress=report)
    if job.deepspeed:
        from peftu.fitting.zero import fit_users_zero
        if rank == 0:
            ray.get(progress.plan.remote(worker, {u.user_id: len(u.train) for u in users}))
        summary = fit_users_zero(base, tokenizer, spec, users, job.hparams, store,
                                 config=config["deepspeed"], group_size=job.group_size, **common)
    else:
        planned = plan_users(store, spec, users, job.hparams, base_fp)  # once per shard, from the index
        ray.get(progress.plan.remote(worker, {u.user_id: len(u.train) for u in planned[1]}))
        report(planned[0])  # skipped and failed at once: they are no work left
        summary = fit_users_banked(base, tokenizer, spec, users, job.hparams, store, planned=planned, **common)
    report(FitSummary(skipped=summary.skipped, failed=summary.failed))


def _on_head_node():
    """Where the run's progress actor lives: on the head node (the cluster dies with it anyway),
    so that a worker node's death cannot take the run's bookkeeping with it. Without a head
    marker (not a Ray cluster as we know it), the driver's node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    if heads:  # hard: Ray's scheduler passes over a soft affinity to a head with no CPUs
        return NodeAffinitySchedulingStrategy(heads[0], soft=False)
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def _final_status(progress, store: AdapterStore, task: str, user_ids: list[str], started_ns: int
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """Each user's status and failure reason as the progress actor has them; if the actor was lost,
    what the store's index shows: a version published since the run started is a fit, and nothing
    else is claimed (a re-run fits or skips the rest)."""
    from peftu.store import version_started_ns
    from peftu.store.kinds import ADAPTER

    try:
        status, reasons = ray.get(progress.final.remote())
        ray.kill(progress)
        return status, reasons
    except ray.exceptions.RayActorError as e:
        log.warning("lost the run's progress actor (%s); counting the users published since the run started", e)
    entries = store.current_entries(ADAPTER, task)
    status, reasons = {}, {}
    for user in user_ids:
        entry = entries.get(user)
        if entry is not None and (version_started_ns(entry.version) or 0) >= started_ns:
            status[user] = "fitted"
        else:
            status[user] = "failed"
            reasons[user] = "unknown: the run's progress actor was lost; a re-run fits or skips this user"
    return status, reasons


def _eta(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds / 60:.1f} min"


def _progress_line(snap: dict, hours: float) -> str:
    """Users done / total, users per hour, and the ETA of the slowest worker from its examples left
    and its examples per second (users stream largest first, so users left would say too little)."""
    rate = snap["fitted"] / hours if hours > 0 else 0.0
    workers = snap["workers"]
    if not workers:
        return f"users done {snap['done']} / {snap['total']}: the workers are starting (loading the base, planning)"
    etas = [w["eta_s"] for w in workers.values()]
    eta = None if not etas or None in etas else max(etas)
    left = sum(w["left_examples"] for w in workers.values())
    per_worker = "; ".join(f"worker {name}: fitted {w['fitted']}, {w['left_users']} users / "
                           f"{w['left_examples']} examples left, ETA {_eta(w['eta_s'])}"
                           for name, w in workers.items())
    return (f"users done {snap['done']} / {snap['total']} (fitted {snap['fitted']}), {rate:.0f} users/hour, "
            f"ETA {_eta(eta)} ({left} examples left){'; ' + per_worker if per_worker else ''}")


def _log_progress(progress, started: float, stop: threading.Event, interval: float) -> None:
    """Every `interval` seconds, a `_progress_line`."""
    while not stop.wait(interval):
        try:
            snap = ray.get(progress.snapshot.remote())
        except ray.exceptions.RayActorError:
            log.warning("lost the run's progress actor: no more progress lines in this run")
            return
        log.info("%s", _progress_line(snap, (time.monotonic() - started) / 3600))


def _on_a_worker(job: FitJobConfig, what: str, fn: Callable[..., T], *args, gpu: bool) -> T:
    """`fn(store, *args)` in a Ray task on one worker's resources (the driver may sit on a head with no CPUs);
    while it runs, the driver logs `what` and the time so far every `progress_interval_s`."""
    from peftu.logs import setup_logging
    from peftu.store import AdapterStore

    def stage(*given):
        setup_logging()
        return fn(AdapterStore.open(job.store, endpoint_url=job.endpoint_url), *given)

    task = ray.remote(num_cpus=job.cpus_per_worker, num_gpus=1 if gpu and job.use_gpu else 0)(stage)
    ref, started = task.remote(*args), time.monotonic()
    while not ray.wait([ref], timeout=job.progress_interval_s)[0]:
        log.info("%s: %.0f s so far", what, time.monotonic() - started)
    return ray.get(ref)


def _task_adapter_stage(job: FitJobConfig, spec: TaskSpec, users: RunUsers) -> None:
    """OPPU's first stage."""
    from peftu.fitting.oppu import ensure_task_adapter

    def stage(store: AdapterStore, users: RunUsers) -> dict:
        return ensure_task_adapter(job.base, spec, users.read(job), job.hparams, store,
                                   epochs=job.task_epochs).model_dump()

    manifest = _on_a_worker(job, f"fitting the task adapter of {spec.name} (OPPU's first stage)", stage, users,
                            gpu=True)
    log.info("task adapter of %s: version %s (final loss %.3f)", spec.name, manifest["version"],
             manifest["metrics"].get("final_loss", float("nan")))


def _select_stage(job: FitJobConfig, spec: TaskSpec, users: RunUsers, refit: list[str]) -> dict[str, int]:
    """Each user's method chosen on validation (the refitted ones anew, the rest kept from the task's last
    record) and published; how many of this run's users each method answers. On CPU: selection scores
    a few examples per user with one model at a time."""
    from peftu.fitting.selection import select_fitted, selected_counts

    def stage(store: AdapterStore, users: RunUsers, refit: list[str]) -> dict[str, int]:
        users = users.read(job)
        chosen = select_fitted(job.base, store, spec, users, refit=set(refit))
        return selected_counts({u.user_id: chosen[u.user_id] for u in users if u.user_id in chosen})

    started = time.monotonic()
    counts = _on_a_worker(job, f"choosing each user's method on validation ({len(refit)} refitted)",
                          stage, users, refit, gpu=False)
    log.info("selected for %s in %.1f s (%d refitted): %s", spec.name, time.monotonic() - started, len(refit),
             counts_line(counts))
    return counts


def counts_line(counts: dict[str, int] | None) -> str:
    """`selected_counts` for a log line ("majority 3, oppu 7"; "off" without a selection)."""
    return "off" if counts is None else ", ".join(f"{m} {n}" for m, n in counts.items()) or "nobody"


def _deepspeed_config(job: FitJobConfig) -> dict:
    """The run's DeepSpeed config, checked before any worker starts."""
    from peftu.fitting.zero import ds_config

    if job.group_size and job.workers % job.group_size:
        raise PeftuError(f"--group-size {job.group_size} does not divide --workers {job.workers}")
    try:
        return ds_config(job.deepspeed, job.offload)
    except ValueError as e:
        raise PeftuError(str(e)) from None


@dataclass
class RunUsers:
    """A run's users as the driver holds them: always their ids; their records only where a caller
    passed them in memory. Otherwise whoever needs the records (a worker, a stage) reads its own
    from the saved data set."""

    ids: list[str]
    records: list[UserRecord] | None
    source: str
    """Where the users come from, for error messages."""

    def rows(self) -> list[dict]:
        """What the trainer's Dataset holds: whole rows, or the ids for the workers to read."""
        if self.records is not None:
            return [u.to_row() for u in self.records]
        return [{"user_id": u} for u in self.ids]

    def read(self, job: FitJobConfig) -> list[UserRecord]:
        """The records (on a worker or a stage, never needed by the driver itself)."""
        return self.records if self.records is not None else read_users(job, self.ids)


def read_users(job: FitJobConfig, ids: list[str]) -> list[UserRecord]:
    from peftu.data.io import load_users

    return load_users(job.data, ids, endpoint_url=job.endpoint_url)


def shard_users(job: FitJobConfig, rows: list[dict], source: str) -> list[UserRecord]:
    """A worker's users from its shard of the Dataset: whole rows (checked) or ids to read."""
    from peftu.data.io import checked_row

    if rows and "train" not in rows[0]:
        return read_users(job, [row["user_id"] for row in rows])
    return [checked_row(row, source) for row in rows]


@dataclass
class FitRunResult:
    run_id: str
    summary: FitSummary
    seconds: float
    selected: dict[str, int] | None = None
    """How many users each method answers after the run's selection (None: `--no-select`)."""

    @property
    def users_per_hour(self) -> float:
        return len(self.summary.fitted) / (self.seconds / 3600) if self.seconds else 0.0


def _run_by_bucket(job: FitJobConfig, spec: TaskSpec, users: list[UserRecord]) -> FitRunResult:
    """One run per activity bucket with that bucket's hyper-parameters: a bank fits one config at a time."""
    if job.oppu:
        raise PeftuError("--oppu fits one task adapter on all users; it does not take per-bucket configs")
    summary, run_ids, seconds = FitSummary(), [], 0.0
    for bucket, _ in ACTIVITY_BUCKETS:
        members = [u for u in users if u.activity == bucket]
        if not members:
            continue
        hp = job.bucket_hparams.get(bucket, job.hparams)
        log.info("activity bucket %s: %d users, r=%s lr=%s epochs=%s", bucket, len(members), hp.r, hp.lr, hp.epochs)
        done = run_fit_job(job.model_copy(update={"hparams": hp, "bucket_hparams": {}, "users_limit": None,
                                                  "select": False}), (spec, members))
        summary.merge(done.summary)
        run_ids.append(done.run_id)
        seconds += done.seconds
    selected = None
    if job.select:  # once over every bucket's users, into each bucket run's summary
        from peftu.store import AdapterStore

        selected = _select_stage(job, spec, RunUsers([u.user_id for u in users], users, spec.name), summary.fitted)
        store = AdapterStore.open(job.store, endpoint_url=job.endpoint_url)
        for run_id in run_ids:
            record = RUN_SUMMARY.of(spec.name, run_id)
            store.put_record(record, store.get_record(record) | {"selected": selected})
    return FitRunResult(run_id="+".join(run_ids), summary=summary, seconds=seconds, selected=selected)


def _sweep_partial(store: AdapterStore, task: str, user_ids: list[str]) -> None:
    """This run's workers are all done or dead: what a killed one half-wrote can go (only the users
    it was fitting can have any, so a re-run that skips everyone lists nothing)."""
    try:
        swept = store.sweep_partial(task, user_ids, before_ns=time.time_ns())
    except PeftuError as e:  # the adapters are safe either way; only the clean-up failed
        log.warning("could not sweep half-written versions of %s: %s", task, e)
        return
    if swept:
        log.info("removed %d half-written version(s) left by killed workers", len(swept))


def _compact_index(store: AdapterStore, task: str) -> None:
    """Fold this run's publishes into the task's index, so the next plan reads two objects, not them."""
    from peftu.store.kinds import ADAPTER

    try:
        store.compact_index(ADAPTER, task)
    except PeftuError as e:  # the index only saves reads: a stale one is still right
        log.warning("could not compact the index of %s: %s", task, e)


def _limited(job: FitJobConfig, users: list[T]) -> list[T]:
    """The first `users_limit` users (all without a limit)."""
    return users[: job.users_limit] if job.users_limit else users


def _users_source(job: FitJobConfig, loaded: tuple[TaskSpec, list[UserRecord]] | None
                  ) -> tuple[TaskSpec, RunUsers]:
    """The task and its users (`users_limit` applied): from the saved data set, their ids alone."""
    from peftu.data.io import USERS_FILE, load_user_ids

    if loaded:
        spec, users = loaded
        users = _limited(job, users)
        return spec, RunUsers([u.user_id for u in users], users, spec.name)
    spec, ids = load_user_ids(job.data, endpoint_url=job.endpoint_url)
    ids = _limited(job, ids)
    return spec, RunUsers(ids, None, f"{str(job.data).rstrip('/')}/{USERS_FILE}")


def _peak_rss_mib() -> float:
    """This process's peak resident memory (the driver's: it should not grow with the users' data).

    Linux's `VmHWM`, the peak of this program alone: `ru_maxrss` also keeps the peak of the process
    it was forked from before `exec` (a test runner holding 100,000 users, say)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


FAILURES_LISTED = 1000
"""A run summary lists at most this many failures (and counts them all): it stays small at any scale."""


def run_fit_job(job: FitJobConfig, loaded: tuple[TaskSpec, list[UserRecord]] | None = None) -> FitRunResult:
    """Fit every user of `job.data` (or of `loaded`) on the Ray cluster this process is connected to (or a local one)."""
    from peftu.data.io import load_task
    from peftu.paths import peftu_home
    from peftu.store import AdapterStore
    from peftu.store.task_spec import publish_task_spec

    if job.bucket_hparams:  # one run per bucket: the driver sorts the users, so it reads them
        spec, users = loaded or load_task(job.data, endpoint_url=job.endpoint_url)
        return _run_by_bucket(job, spec, _limited(job, users))
    ds = _deepspeed_config(job) if job.deepspeed else None
    run_id = start_run("fit")
    spec, users = _users_source(job, loaded)
    user_ids = users.ids
    store = AdapterStore.open(job.store, endpoint_url=job.endpoint_url)
    publish_task_spec(store, spec)  # what a replica serves the task's adapters with
    progress_name = f"peftu-progress-{run_id}"
    progress = FitProgress.options(name=progress_name, scheduling_strategy=_on_head_node()).remote(len(user_ids))
    loop_config = {"job": job.model_dump(), "spec": spec.model_dump(), "progress_actor": progress_name,
                   "source": users.source}
    if ds:
        loop_config["deepspeed"] = ds
        run_dir = peftu_home() / "ray-runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "deepspeed.json").write_text(json.dumps(ds, indent=2))
        log.info("pack-parallel with DeepSpeed %s, config in %s", job.deepspeed, run_dir / "deepspeed.json")
    if job.oppu:
        _task_adapter_stage(job, spec, users)

    trainer = users_trainer(_worker_loop, loop_config, users.rows(), run_id=run_id, workers=job.workers,
                            use_gpu=job.use_gpu, cpus_per_worker=job.cpus_per_worker, split=not job.deepspeed,
                            max_failures=job.max_failures)
    log.info("fitting %d users of %s on %d worker(s), %d at a time per bank", len(user_ids), spec.name,
             job.workers, job.pack_size)
    started, started_ns = time.monotonic(), time.time_ns()
    stop = threading.Event()
    ticker = threading.Thread(target=_log_progress, args=(progress, started, stop, job.progress_interval_s),
                              daemon=True)
    ticker.start()
    error = None
    try:
        trainer.fit()
    except Exception as e:  # the run failed past max_failures: still write what was done
        error = e
    finally:
        stop.set()
        ticker.join()
    seconds = time.monotonic() - started
    status, reasons = _final_status(progress, store, spec.name, user_ids, started_ns)
    _sweep_partial(store, spec.name, [u for u in user_ids if status.get(u) != "skipped"])
    _compact_index(store, spec.name)
    for user in user_ids:
        if user not in status:
            status[user] = "failed"
            reasons[user] = f"not fitted: the run failed ({type(error).__name__})"
    summary = FitSummary(
        fitted=sorted(u for u, s in status.items() if s == "fitted"),
        skipped=sorted(u for u, s in status.items() if s == "skipped"),
        failed={u: reasons.get(u, "unknown") for u, s in status.items() if s == "failed"})
    selected, selection_error = None, None  # the fit's error first: a failed run selects nothing
    if job.select and not error:
        try:
            selected = _select_stage(job, spec, users, summary.fitted)
        except Exception as e:  # the adapters are published either way: write the summary, then fail
            selection_error = e
    record = RUN_SUMMARY.of(spec.name, run_id)
    store.put_record(record, {
        "run_id": run_id, "task": spec.name, "users": len(user_ids), "seconds": seconds,
        "fitted": len(summary.fitted), "skipped": len(summary.skipped), "failed": len(summary.failed),
        "failures": dict(sorted(summary.failed.items())[:FAILURES_LISTED]), "selected": selected,
        "job": job.model_dump(), "error": repr(error or selection_error) if (error or selection_error) else None})
    if error:
        raise PeftuError(f"fit run {run_id} failed after {job.max_failures} restarts: {error}; "
                         f"{len(summary.fitted)} users were fitted and published, the summary is in "
                         f"the store under {record.key}") from error
    if selection_error:
        raise PeftuError(f"fit run {run_id}: the fits are published, but choosing each user's method failed: "
                         f"{selection_error}; serving keeps the last selection record") from selection_error
    log.info("run %s: fitted %d, skipped %d, failed %d in %.0f s; selected: %s; driver peak RSS %.0f MiB", run_id,
             len(summary.fitted), len(summary.skipped), len(summary.failed), seconds, counts_line(selected),
             _peak_rss_mib())
    return FitRunResult(run_id=run_id, summary=summary, seconds=seconds, selected=selected)
