"""`peftu tune`: search LoRA rank, learning rate, alpha and epochs with Ray Tune (ASHA)."""

from __future__ import annotations

import argparse
import json

from peftu.cli.common import add_base, add_fields, add_outputs, add_store, base_path, settings, store_uri
from peftu.config import LoraHParams, SearchSpace, TuneOptions

OPTIONS = ["trials", "users", "by_activity", "search", "cpus_per_trial", "gpus_per_trial", "max_concurrent",
           "grace_period", "reduction_factor", "seed"]
"""`TuneOptions` fields that are flags."""
FIXED = ["batch_size", "max_len", "target_modules"]
"""`LoraHParams` fields that are flags, fixed for every trial (the seed is `TuneOptions.seed`)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="search LoRA rank, learning rate, alpha and epochs with Ray Tune (ASHA)")
    p.add_argument("--data", required=True, help="a data set saved by `peftu data`")
    add_fields(p, TuneOptions, OPTIONS)
    add_fields(p.add_argument_group("the search space"), SearchSpace)
    add_fields(p.add_argument_group("fixed for every trial"), LoraHParams, FIXED, optional=True)
    add_outputs(p, plot="write validation metric vs rank and learning rate here (PNG)")
    add_base(p)
    add_store(p)
    return p


def run(args: argparse.Namespace) -> None:
    from rich.console import Console

    from peftu.data.io import load_spec
    from peftu.logs import setup_logging
    from peftu.tuning.report import plot_search, render_best, render_trials
    from peftu.tuning.search import run_tune

    setup_logging()
    space = settings(SearchSpace, **{name: getattr(args, name) for name in SearchSpace.model_fields})
    fixed = {name: getattr(args, name) for name in FIXED if getattr(args, name) is not None} | {"seed": args.seed}
    opts = settings(TuneOptions, **{name: getattr(args, name) for name in OPTIONS}, fixed=fixed)
    load_spec(args.data, endpoint_url=args.endpoint_url)  # a bad search or --data fails now, not after building a base
    result = run_tune(args.data, base_path(args), store_uri(args), space, opts, endpoint_url=args.endpoint_url)
    console = Console()
    for bucket in result.buckets.values():
        console.print(render_trials(bucket, result.metric))
    console.print(render_best(result))
    print(f"saved to the store under records/tune/{result.task}/{result.run_id} (and .../best); "
          f"apply with: peftu fit --config best")
    if args.plot:
        plot_search(result, args.plot)
    if args.json:
        print(json.dumps(result.summary()))
