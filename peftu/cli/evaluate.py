"""`peftu eval`: users' adapters from the store against the base, per user, macro-averaged."""

from __future__ import annotations

import argparse
import json

from peftu.cli.common import add_base, add_store, base_path, first_users, open_store


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="score users' adapters from the store against the base")
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, help="only the first N users")
    p.add_argument("--split", choices=["val", "test"], default="test")
    add_base(p)
    add_store(p)
    return p


def run(args: argparse.Namespace) -> None:
    from peftu.data.io import load_task
    from peftu.evaluation.evaluate import evaluate_task

    spec, users = load_task(args.data, endpoint_url=args.endpoint_url)
    users = first_users(users, args.users)
    print(json.dumps(evaluate_task(base_path(args), open_store(args), spec, users, split=args.split), indent=2))
