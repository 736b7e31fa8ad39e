"""A benchmark run: a task's users read or generated, every named method run on them, the results kept."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from peftu.data.schema import TaskSpec, UserRecord
from peftu.errors import PeftuError
from peftu.evaluation.metrics import macro_average
from peftu.quality.context import PerUser, QualityContext
from peftu.quality.methods import METHODS

TWEETEVAL = "../shared/data/peft-u/tweeteval/annotations_g3.csv"
"""PEFT-U's tweeteval annotations (20 annotators as users), relative to the repository root."""


def load_quality_data(task: str | None, *, users: int | None = None, seed: int = 0, data: str | None = None,
                      lamp: str | None = None, lamp_outputs: str | None = None, endpoint_url: str | None = None
                      ) -> tuple[TaskSpec, list[UserRecord], str]:
    """The task's spec and users (at most `users`), and a line saying what was read.

    `data` a data set saved by `peftu data` (a folder or s3:// at `endpoint_url`):
    its task and users, whatever `task` says. Else `task` is a generated task,
    `tweeteval` (`data`: PEFT-U's annotations CSV) or none with `lamp` (a LaMP
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
    elif data and not (task == "tweeteval" and Path(data).suffix == ".csv"):
        spec, records = load_task(data, endpoint_url=endpoint_url)
        report = f"{len(records)} users of {spec.name} ({spec.kind}) from {data}"
    elif task == "tweeteval":
        path = Path(data or TWEETEVAL)
        if not path.is_file():
            raise PeftuError(f"tweeteval data not found at {path}; pass --data PATH to PEFT-U's annotations_g3.csv")
        spec, records, report = loaders.load_peftu_annotations(path, task_name="tweeteval", seed=seed)
    elif task in TASKS:
        spec, records, report = generate(task, users or 100, seed=seed)
    else:
        raise PeftuError(f"unknown task {task!r}; choose one of {', '.join([*sorted(TASKS), 'tweeteval'])}, "
                         "give a saved data set with --data, or LaMP files with --lamp and --lamp-outputs")
    return spec, records[:users] if users else records, str(report)


@dataclass
class QualityResult:
    """Each method's per-user test metrics on one task, and what it took."""

    spec: TaskSpec
    users: list[UserRecord]
    settings: dict
    per_user: dict[str, PerUser] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

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
            "per_user": self.per_user, "seconds": self.seconds, **self.notes}


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
    result.notes = ctx.notes
    return result
