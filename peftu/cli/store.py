"""`peftu store sweep | gc | delete`: look after the adapter store."""

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
    p = sub.add_parser("delete", help="delete a user for good: every version of their adapter, their PPlug "
                       "history, their neighbours and their selection entry; with --server, through the app, "
                       "which answers once every replica has evicted them")
    p.add_argument("user")
    p.add_argument("--task", help="the task whose adapter goes (without --server; the app knows its own)")
    p.add_argument("--server", metavar="URL", help="the serving app (http://host:8000): it deletes and evicts")
    p.add_argument("--admin-key-env", default="PEFTU_ADMIN_KEY", help="variable holding the app's admin key")
    add_store(p)
    return parser


def run(args: argparse.Namespace) -> None:
    from peftu.store.kinds import KINDS

    if args.store_command == "delete":
        delete(args)
        return
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


def delete(args: argparse.Namespace) -> None:
    """Through the app when --server is given (so no replica keeps the user), else in the store alone."""
    import os

    from peftu.errors import PeftuError
    from peftu.store import validate_id

    user = validate_id(args.user)
    if args.server:
        import requests

        key = os.environ.get(args.admin_key_env)
        try:
            r = requests.delete(f"{args.server.rstrip('/')}/admin/users/{user}", timeout=120,
                                headers={"x-api-key": key} if key else {})
        except requests.RequestException as e:
            raise PeftuError(f"cannot reach {args.server}: {e}") from None
        if r.status_code != 200:
            raise PeftuError(f"{args.server} refused the delete ({r.status_code}): {r.text}")
        done = r.json()
        replicas = done["replicas"]
        print(f"deleted {done['deleted_versions']} version(s) of user {user}; evicted on {replicas['applied']} of "
              f"{replicas['replicas']} replica(s)" + (f", not confirmed: {', '.join(replicas['missing'])}"
                                                     if replicas["missing"] else ""))
        return
    if not args.task:
        raise PeftuError("--task is needed without --server")
    from peftu.store.users import delete_user_data

    removed = delete_user_data(open_store(args), args.task, user)
    print(f"deleted {removed} version(s) of user {user} from the store; running replicas drop it at their next "
          "version check (version_ttl_s): use --server to evict it everywhere before this returns")
