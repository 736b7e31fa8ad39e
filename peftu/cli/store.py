"""`peftu store sweep | gc`: look after the adapter store."""

from __future__ import annotations

import argparse
import time

from peftu.cli.common import add_store, open_store


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("store", help="look after the adapter store")
    sub = parser.add_subparsers(dest="store_command", required=True)
    p = sub.add_parser("sweep", help="delete half-written versions (files, no manifest) that publishers "
                       "killed mid-write left; readers never see them, they only take space")
    p.add_argument("--task", required=True)
    p.add_argument("--older-than", type=float, default=60.0, metavar="MINUTES",
                   help="only versions started this long ago, so no live publisher loses its files "
                        "(default %(default)s; a fit job sweeps its own users when it ends)")
    add_store(p)
    p = sub.add_parser("gc", help="delete old versions: keep at most --keep per artifact (the newest), "
                       "never the one its pointer names; then fold the task's index changes into its snapshot")
    p.add_argument("--task", required=True)
    p.add_argument("--keep", type=int, default=3, help="versions kept per artifact (default %(default)s, at least 1)")
    add_store(p)
    return parser


def run(args: argparse.Namespace) -> None:
    from peftu.store.kinds import KINDS

    store = open_store(args)
    if args.store_command == "gc":
        removed = [key for kind in KINDS for key in store.gc_versions(args.task, keep=args.keep, kind=kind)]
        for kind in KINDS:
            if kind.owner:
                store.compact_index(kind, args.task)
        for key in removed:
            print(key)
        print(f"removed {len(removed)} old version(s) of {args.task}, kept at most {args.keep} per artifact")
        return
    before_ns = time.time_ns() - int(args.older_than * 60e9)
    swept = [key for kind in KINDS for key in store.sweep_partial(args.task, before_ns=before_ns, kind=kind)]
    for key in swept:
        print(key)
    print(f"removed {len(swept)} half-written version(s) of {args.task} started over {args.older_than:g} min ago")
