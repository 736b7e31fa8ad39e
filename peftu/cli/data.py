"""`peftu data generate | import | stats`: user-task data sets, generated or imported, and their numbers."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from peftu.cli.common import add_endpoint, comma_list
from peftu.data.synthetic import TASKS
from peftu.errors import PeftuError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("data", help="generate, import and inspect user-task data sets")
    sub = parser.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("generate", help="generate users of a synthetic task")
    p.add_argument("--task", choices=sorted(TASKS), default="synth-cls")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    add_endpoint(p)
    p = sub.add_parser("import", help="import PEFT-U or LaMP files")
    p.add_argument("format", choices=["peft-u-csv", "peft-u-json", "lamp"],
                   help="peft-u-csv: raw annotator table; peft-u-json: user_data.json; "
                   "lamp: questions JSON (+ --outputs)")
    p.add_argument("file")
    p.add_argument("--outputs", help="LaMP outputs JSON with the golds")
    p.add_argument("--task", help="task name (LaMP: e.g. LaMP_3 when no outputs file names it)")
    p.add_argument("--split", choices=["val", "test"], default="test",
                   help="LaMP: which split the questions are")
    p.add_argument("--kind", choices=["classification", "rating"], default="classification",
                   help="PEFT-U: labels as classes, or as levels of a rating scale scored by MAE over "
                        "their positions (default %(default)s)")
    p.add_argument("--levels", type=comma_list(str),
                   help="PEFT-U rating: the levels lowest first, e.g. very-negative,negative,...,very-positive "
                        "(default: the labels are numbers, in numeric order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    add_endpoint(p)
    p = sub.add_parser("stats", help="users, examples, activity and labels of a data set")
    p.add_argument("path")
    add_endpoint(p)
    return parser


def run(args: argparse.Namespace) -> None:
    {"generate": generate, "import": import_files, "stats": stats}[args.data_command](args)


def generate(args: argparse.Namespace) -> None:
    from peftu.data import synthetic
    from peftu.data.io import save_task

    spec, users, report = synthetic.generate(args.task, args.users, seed=args.seed, min_samples=args.min_samples)
    print(report)
    save_task(args.out, spec, users, endpoint_url=args.endpoint_url)
    print(f"saved {len(users)} users of {spec.name} to {args.out}")


def import_files(args: argparse.Namespace) -> None:
    from peftu.data import loaders
    from peftu.data.io import save_task

    if args.format == "peft-u-csv":
        spec, users, report = loaders.load_peftu_annotations(
            args.file, task_name=args.task, seed=args.seed, min_samples=args.min_samples,
            kind=args.kind, levels=args.levels)
    elif args.format == "peft-u-json":
        spec, users, report = loaders.load_peftu_user_data(
            args.file, task_name=args.task, min_samples=args.min_samples, kind=args.kind, levels=args.levels)
    else:
        if args.kind != "classification" or args.levels:
            raise PeftuError("--kind and --levels are for PEFT-U files; a LaMP task's kind is its own")
        spec, users, report = loaders.load_lamp(args.file, args.outputs, task=args.task, split=args.split)
    print(report)
    save_task(args.out, spec, users, endpoint_url=args.endpoint_url)
    print(f"saved {len(users)} users of {spec.name} to {args.out}")


def stats(args: argparse.Namespace) -> None:
    from peftu.data.io import load_task

    spec, users = load_task(args.path, endpoint_url=args.endpoint_url)
    sizes = sorted(len(u.history) for u in users)
    numbers = {
        "task": spec.name, "kind": spec.kind, "metric": spec.metric, "users": len(users),
        "examples": {s: sum(len(getattr(u, s)) for u in users) for s in ("train", "val", "test")},
        "history_items": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {},
        "activity": dict(Counter(u.activity for u in users)),
    }
    if spec.kind != "generation":
        numbers["labels"] = dict(Counter(e.output for u in users for e in u.train).most_common())
    print(json.dumps(numbers, indent=2))
