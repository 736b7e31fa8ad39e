"""`make demo`: the main job end to end on the embedded defaults.

Generates users of the synthetic classification and rating tasks, builds the
tiny base if it is missing, fits one adapter per user through the Ray Train
fit job (a local Ray, banked packs, adapters published to a local store), and
prints how those per-user adapters, read back from the store as serving reads
them, compare with the base model and with one global adapter (the pooled fit)
on each user's held-out test examples: three rows of the quality benchmark
(`peftu.quality`). It ends by starting the serving app on that store and asking
it the same input as three users over HTTP.

    python -m jobs.demo [--users 120] [--store DIR] [--tasks synth-cls synth-rating]
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from peftu.config import FitJobConfig, LoraHParams
from peftu.data.io import save_task
from peftu.data.synthetic import TASKS, generate
from peftu.evaluation.metrics import better
from peftu.fitting.job import run_fit_job
from peftu.logs import setup_logging
from peftu.model.build import ensure_base
from peftu.paths import peftu_home
from peftu.quality.context import QualityContext
from peftu.quality.report import render_table
from peftu.quality.run import run_quality
from peftu.serving.local import ask_users
from peftu.store import AdapterStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=150, help="users per task")
    parser.add_argument("--tasks", nargs="+", default=["synth-cls", "synth-rating"], choices=sorted(TASKS))
    parser.add_argument("--store", default=str(peftu_home() / "demo-store"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    args = parser.parse_args()
    setup_logging()

    console = Console()
    start = time.monotonic()
    base_path = str(ensure_base(log=console.print))
    store = AdapterStore.open(args.store)
    hp = LoraHParams()
    methods = ["base", "global", "stored"]  # the stored adapters are the ones the fit job just published
    served = None
    for task in args.tasks:
        spec, users, report = generate(task, args.users, seed=args.seed)
        console.print(f"[bold]{task}[/]: {report}")
        data = peftu_home() / "demo-data" / task
        save_task(data, spec, users)
        run = run_fit_job(FitJobConfig(data=str(data), store=args.store, base=base_path,
                                       hparams=hp, workers=args.workers))
        console.print(f"[{task}] fit run {run.run_id}: {len(run.summary.fitted)} fitted, "
                      f"{len(run.summary.skipped)} already current, {run.users_per_hour:.0f} users/hour")
        result = run_quality(QualityContext(spec, users, base_path, store, hp, store_uri=args.store,
                                            log=console.print), methods)
        console.print(render_table(result.full()))
        base, glob, own = (result.value(m) for m in methods)
        verdict = "beat" if all(better(spec.metric, own, x) for x in (base, glob)) else "did NOT beat"
        console.print(f"{spec.name}: per-user adapters {verdict} the base and the global adapter "
                      f"({spec.metric} {own:.3f} vs {base:.3f} / {glob:.3f})")
        served = served or (spec, users)
    spec, users = served
    console.print(f"[bold]serving[/]: the same {spec.name} input for several users, over HTTP "
                  "(of up to 8 inputs, the first that three of 12 users answer differently)")
    ask_users(base_path, args.store, spec, [u.user_id for u in users[:12]], [u.test[0].input for u in users[:8]],
              log=console.print)
    console.print(f"adapters are in {args.store}; done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
