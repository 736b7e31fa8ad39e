"""`peftu fit`: fit, evaluate and publish one adapter per user: banked on Ray Train, or the plain loop."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from peftu.cli.common import (
    add_base,
    add_fields,
    add_hparams,
    add_store,
    base_path,
    field_flag,
    first_users,
    hparams,
    open_store,
    settings,
    store_uri,
)
from peftu.config import FitJobConfig
from peftu.errors import PeftuError

if TYPE_CHECKING:
    from peftu.config import LoraHParams
    from peftu.fitting.reference import FitSummary

JOB_FIELDS = ["workers", "cpus_per_worker", "pack_size", "token_budget", "max_failures", "deepspeed", "group_size",
              "offload", "oppu", "task_epochs"]
"""`FitJobConfig` fields that are flags of the same name (--gpu and --users are use_gpu and users_limit)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fit", help="fit, evaluate and publish one adapter per user (banked, on Ray)")
    p.add_argument("--data", required=True, help="a data set saved by `peftu data`")
    p.add_argument("--users", **field_flag(FitJobConfig.model_fields["users_limit"]))
    p.add_argument("--gpu", **field_flag(FitJobConfig.model_fields["use_gpu"]))
    add_fields(p, FitJobConfig, JOB_FIELDS)
    p.add_argument("--no-select", dest="select", action="store_false",
                   help="skip choosing each user's method on validation after the fits (the selection "
                   "record serving answers by; about three forwards over each refitted user's val and test "
                   "examples, on one worker's CPUs)")
    p.add_argument("--reference", action="store_true",
                   help="the plain PEFT loop, one user after another, no Ray (the baseline)")
    p.add_argument("--config", help="hyper-parameters from `peftu tune`: best (the latest search) or a tune "
                   "run id; by-activity results fit each bucket with its own; flags given here win")
    add_base(p)
    add_store(p)
    add_hparams(p)
    return p


def run(args: argparse.Namespace) -> None:
    summary = _fit_reference(args) if args.reference else _fit_on_ray(args)
    print(f"fitted {len(summary.fitted)}, skipped {len(summary.skipped)} (already current), "
          f"failed {len(summary.failed)}")
    for uid, reason in summary.failed.items():
        print(f"  {uid}: {reason}")
    if summary.failed:
        sys.exit(1)


def _tuned(args: argparse.Namespace) -> dict[str, LoraHParams]:
    """`--config NAME`: the tuned configs by activity bucket ({} without --config)."""
    if not args.config:
        return {}
    from peftu.data.io import load_spec
    from peftu.tuning.report import ALL, load_tuned

    tuned = load_tuned(open_store(args), load_spec(args.data, endpoint_url=args.endpoint_url).name, args.config)
    if args.reference and set(tuned) != {ALL}:
        raise PeftuError("--reference takes one tuned config; this one is by activity bucket (drop --reference)")
    return tuned


def _fit_reference(args: argparse.Namespace) -> FitSummary:
    """The plain PEFT loop, one user after another in this process (the baseline)."""
    from peftu.data.io import load_task
    from peftu.fitting.oppu import ensure_task_adapter
    from peftu.fitting.reference import fit_users
    from peftu.model.bases import load_users_base
    from peftu.tuning.report import ALL

    hp = hparams(args, _tuned(args).get(ALL))
    spec, users = load_task(args.data, endpoint_url=args.endpoint_url)
    users = first_users(users, args.users)
    base, store = base_path(args), open_store(args)
    if args.oppu:
        ensure_task_adapter(base, spec, users, hp, store, epochs=args.task_epochs)
    model, tokenizer, base_fp = load_users_base(base, store, spec.name, oppu=args.oppu)
    return fit_users(model, tokenizer, spec, users, hp, store, base_fp=base_fp)


def _fit_on_ray(args: argparse.Namespace) -> FitSummary:
    """The banked fit on Ray Train workers: the cluster of RAY_ADDRESS or of `ray start`, else a local Ray."""
    from peftu.data.io import load_spec
    from peftu.fitting.job import counts_line, run_fit_job
    from peftu.logs import setup_logging
    from peftu.tuning.report import ALL

    setup_logging()
    load_spec(args.data, endpoint_url=args.endpoint_url)  # a wrong --data fails now, not after building a base
    tuned = _tuned(args)  # so does a missing --config
    hp = hparams(args, tuned.get(ALL))  # and a bad hyper-parameter
    by_bucket = {bucket: hparams(args, config) for bucket, config in tuned.items() if bucket != ALL}
    job = settings(FitJobConfig, **{name: getattr(args, name) for name in JOB_FIELDS},
                   data=args.data, store=store_uri(args), base=base_path(args), endpoint_url=args.endpoint_url,
                   use_gpu=args.gpu, users_limit=args.users, hparams=hp, bucket_hparams=by_bucket,
                   select=args.select)
    result = run_fit_job(job)
    print(f"run {result.run_id}: {result.users_per_hour:.0f} users/hour over {result.seconds:.0f} s; "
          f"selected: {counts_line(result.selected)}")
    return result.summary
