"""`peftu pplug fit | eval`: PPlug's one plug fitted on all users, and its personal soft tokens scored."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from peftu.cli.common import (
    add_base,
    add_fields,
    add_store,
    base_path,
    field_flag,
    first_users,
    given,
    open_store,
    settings,
    store_uri,
)
from peftu.config import PPlugConfig, PPlugJobConfig
from peftu.data.synthetic import TASKS

if TYPE_CHECKING:
    from peftu.data.schema import TaskSpec, UserRecord

JOB_FIELDS = ["workers", "cpus_per_worker"]
"""`PPlugJobConfig` fields that are flags of the same name (--gpu is use_gpu)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("pplug", help="PPlug: one plug trained on all users, personal soft tokens")
    sub = parser.add_subparsers(dest="pplug_command", required=True)
    fit = sub.add_parser("fit", help="fit the task's plug on every training user with Ray Train")
    evaluate = sub.add_parser("eval", help="base vs PPlug (vs PPlug on users' adapters) per user, macro-averaged")
    for p in (fit, evaluate):
        p.add_argument("--task", choices=sorted(TASKS), default="synth-cls", help="a generated task")
        p.add_argument("--data", help="a data set saved by `peftu data` instead of generated users")
        p.add_argument("--users", type=int, help="at most N users (generated: N users, default 100)")
        p.add_argument("--data-seed", type=int, default=0, help="seed of the generated users")
        p.add_argument("--encoder", **field_flag(PPlugJobConfig.model_fields["encoder"]))
        add_base(p)
        add_store(p)
    evaluate.add_argument("--split", choices=["val", "test"], default="test")
    add_fields(fit, PPlugJobConfig, JOB_FIELDS)
    fit.add_argument("--gpu", **field_flag(PPlugJobConfig.model_fields["use_gpu"]))
    add_fields(fit.add_argument_group("plug and training"), PPlugConfig, optional=True)
    return parser


def run(args: argparse.Namespace) -> None:
    {"fit": fit, "eval": evaluate}[args.pplug_command](args)


def _users(args: argparse.Namespace) -> tuple[TaskSpec, list[UserRecord]]:
    """The task's users: a saved data set (--data) or generated ones (--task, --users, --data-seed)."""
    from peftu.data.io import load_task
    from peftu.data.synthetic import generate

    if args.data:
        spec, users = load_task(args.data, endpoint_url=args.endpoint_url)
        return spec, first_users(users, args.users)
    spec, users, _ = generate(args.task, args.users or 100, seed=args.data_seed)
    return spec, users


def fit(args: argparse.Namespace) -> None:
    """Fit the task's plug once on every training user with Ray Train (reused when current)."""
    from peftu.logs import setup_logging
    from peftu.pplug.train import run_pplug_job

    setup_logging()
    job = settings(PPlugJobConfig, **{name: getattr(args, name) for name in JOB_FIELDS},
                   store=store_uri(args), base=base_path(args), encoder=args.encoder, use_gpu=args.gpu,
                   endpoint_url=args.endpoint_url, plug=settings(PPlugConfig, **given(args, PPlugConfig)))
    spec, users = _users(args)
    manifest, reused = run_pplug_job(job, spec, users)
    state = "current, reused" if reused else "fitted"
    print(f"PPlug of {spec.name}: version {manifest.version} ({state}); "
          + ", ".join(f"{k} {v:.4g}" for k, v in manifest.metrics.items()))


def evaluate(args: argparse.Namespace) -> None:
    """Macro metrics of the base and of PPlug (and PPlug on users' adapters, where the store has them)."""
    from peftu.evaluation.evaluate import evaluate_users
    from peftu.evaluation.metrics import macro_average
    from peftu.model.base import base_fingerprint, load_base
    from peftu.pplug.encoder import HistoryEncoder
    from peftu.pplug.evaluate import evaluate_pplug
    from peftu.pplug.model import load_plug

    spec, users = _users(args)
    path, store = base_path(args), open_store(args)
    base, tokenizer = load_base(path)
    base_fp = base_fingerprint(path)
    encoder = HistoryEncoder(args.encoder or None)
    plug, manifest = load_plug(store, spec.name, base_fp=base_fp, encoder_fp=encoder.fingerprint)
    result = {"task": spec.name, "metric": spec.metric, "split": args.split, "plug": manifest.version,
              "base": evaluate_users(base, tokenizer, spec, users, args.split),
              "pplug": evaluate_pplug(base, tokenizer, spec, users, plug, encoder, store, split=args.split)}
    if store.list_users(spec.name):
        result["pplug+adapter"] = evaluate_pplug(base, tokenizer, spec, users, plug, encoder, store,
                                                 split=args.split, adapters_task=spec.name, base_fp=base_fp)
    for name in ("base", "pplug", "pplug+adapter"):
        if name in result:
            result[name] = macro_average(result[name], users)
    print(json.dumps(result, indent=2))
