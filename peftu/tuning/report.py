"""What a search found: its trials and best configs, as saved to the store, read back and shown.

`peftu tune` saves a `TuneRun` under `records/tune/<task>/<run id>` and, when a
trial finished, also under `.../best`; `load_tuned` is how `peftu fit --config`
reads the best configs back (one per activity bucket, or "all").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peftu.config import LoraHParams
from peftu.data.schema import LOWER_IS_BETTER
from peftu.errors import NotFoundError, PeftuError
from peftu.store.kinds import BEST, TUNE_RESULTS

if TYPE_CHECKING:
    from rich.table import Table

    from peftu.store import AdapterStore

ALL = "all"
"""The bucket name of a search over every sampled user."""


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
    """`LoraHParams` fields (the record is plain JSON)."""
    best_metric: float | None


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


def load_tuned(store: AdapterStore, task: str, name: str = BEST) -> dict[str, LoraHParams]:
    """The tuned configs of a search, by bucket ("all", or few / some / many)."""
    try:
        record = store.get_record(TUNE_RESULTS.of(task, name))
    except NotFoundError:
        raise PeftuError(f"no tuning results {name!r} for task {task!r} in the store; "
                         f"run `peftu tune` first (or name a run id)") from None
    if not record.get("best"):
        raise PeftuError(f"tuning run {name!r} of task {task!r} has no finished trial to take a config from")
    try:
        return {bucket: LoraHParams.model_validate(config) for bucket, config in record["best"].items()}
    except ValueError as e:
        raise PeftuError(f"tuning run {name!r} of task {task!r} holds a config peftu cannot use: {e}") from None


def render_trials(result: BucketResult, metric: str) -> Table:
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


def render_best(run: TuneRun) -> Table:
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
