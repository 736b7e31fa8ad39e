"""`peftu bench quality | fit | serve`: methods side by side, users per hour, requests per second."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peftu.cli.common import (
    add_base,
    add_hparams,
    add_outputs,
    add_store,
    base_path,
    comma_list,
    hparams,
    open_store,
    store_uri,
)
from peftu.data.synthetic import TASKS
from peftu.errors import PeftuError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmarks")
    sub = parser.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("quality", help="personalization methods side by side on one task "
                       "(base, global, majority, retrieval, profile, OPPU, IA3, prompt and prefix tuning, PPlug)")
    p.add_argument("--task", default="synth-cls",
                   help=f"{', '.join(sorted(TASKS))} (generated) or tweeteval (default %(default)s)")
    p.add_argument("--data", help="a data set saved by `peftu data` (generated or imported: its own task, "
                   "whatever --task says); with --task tweeteval, the annotations CSV (default "
                   "../shared/data/peft-u/tweeteval/annotations_g3.csv)")
    p.add_argument("--lamp", help="a LaMP questions JSON (instead of --task)")
    p.add_argument("--lamp-outputs", help="the LaMP outputs JSON with its golds (names the LaMP task)")
    p.add_argument("--methods", help="comma-separated methods (default: all but `stored`, which scores "
                   "the users' own adapters a fit put in the store)")
    p.add_argument("--users", type=int, help="at most N users (generated tasks: N users, default 100)")
    p.add_argument("--k", type=int, default=4, help="history items retrieved into a prompt (default %(default)s)")
    p.add_argument("--pplug-steps", type=int, default=300,
                   help="the fewest steps PPlug's plug is fitted for (its min_steps; default %(default)s)")
    p.add_argument("--out", help="write the full results JSON here (default: a record in the store)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--report", nargs="+", metavar="RESULTS",
                   help="run nothing: tabulate and plot results files of earlier runs (--out), "
                        "one task's runs with different --methods merged into one table")
    add_outputs(p, plot="write a bar chart of the methods here (PNG)")
    add_base(p)
    add_store(p)
    add_hparams(p)

    p = sub.add_parser("fit", help="users per hour: per-user PEFT loop vs banked fit vs one pooled adapter")
    p.add_argument("--task", choices=sorted(TASKS), default="synth-cls")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--pack-size", type=int, default=16, help="users per bank in the banked fit")
    p.add_argument("--sweep", type=comma_list(int), default=[],
                   help="more pack sizes to time the banked fit with, e.g. 1,4,32 (for the plot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated users and of the fits")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=1, help="run every fit this many times, keep the fastest")
    add_outputs(p)
    add_base(p)

    p = sub.add_parser("serve", help="throughput and latency: continuous vs static scheduling, base vs users' "
                       "adapters, closed loop and Poisson arrivals, mixed output lengths")
    p.add_argument("--users", type=int, default=1000, help="users with a (random) adapter in the store")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the closed loop")
    p.add_argument("--requests", type=int, default=400, help="requests per closed-loop phase (all rounds)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of closed-loop phases, the apps taking turns in each (each round its own users)")
    p.add_argument("--open-requests", type=int, default=100, help="requests per rate of the open-loop sweep")
    p.add_argument("--warmup", type=int, default=64,
                   help="requests to the base before each app's phases, not measured (0: none)")
    p.add_argument("--rates", type=comma_list(float), default=[0.5, 1.0, 1.5],
                   help="open-loop arrival rates as multiples of the continuous app's closed-loop requests/s "
                        "(default 0.5,1,1.5; empty: no open loop)")
    p.add_argument("--max-tokens", type=int, default=64, help="each request's max_tokens is drawn from 1..N")
    p.add_argument("--cache-size", type=int, default=0, help="adapters held per replica (default: all users)")
    p.add_argument("--no-split", action="store_true", help="skip the static app with one user per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--port", type=int, default=0, help="HTTP port of the app under test (default: a free one)")
    add_outputs(p)
    add_base(p)

    p = sub.add_parser("store", help="the store at N users: publish, plan (which users are current), list, "
                       "index size; on moto's S3 server (started on loopback) and a local folder")
    p.add_argument("--users", type=comma_list(int), default=[1000], help="users, e.g. 1000,10000 (default 1000)")
    p.add_argument("--backend", choices=["s3", "local", "both"], default="both")
    p.add_argument("--publish", type=int, default=500,
                   help="users published for real (the rest go into the index in bulk; default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="publishers at once (default %(default)s)")
    add_outputs(p)
    return parser


def run(args: argparse.Namespace) -> None:
    {"quality": quality, "fit": fit, "serve": serve, "store": store}[args.bench_command](args)


def quality(args: argparse.Namespace) -> None:
    import logging

    from rich.console import Console

    from peftu.logs import setup_logging
    from peftu.quality.context import QualityContext
    from peftu.quality.methods import parse_methods
    from peftu.quality.report import merge_reports, plot_results, render_markdown, render_table
    from peftu.quality.run import load_quality_data, run_quality
    from peftu.store.kinds import QUALITY_RESULTS

    setup_logging(logging.WARNING)
    console = Console(width=160)
    if args.report:
        reports = [_read_report(path) for path in args.report]
        by_task: dict[str, list[dict]] = {}
        for report in reports:
            by_task.setdefault(report["task"], []).append(report)
        merged = [merge_reports(group) for group in by_task.values()]
    else:
        names = parse_methods(args.methods)  # a wrong name fails now, not after an hour of fits
        hp = hparams(args)
        spec, users, report = load_quality_data(args.task, users=args.users, seed=hp.seed, data=args.data,
                                                lamp=args.lamp, lamp_outputs=args.lamp_outputs,
                                                endpoint_url=args.endpoint_url)
        console.print(f"{spec.name}: {report}")
        ctx = QualityContext(spec, users, base_path(args), open_store(args), hp, store_uri=store_uri(args),
                             endpoint_url=args.endpoint_url, k=args.k, pplug_steps=args.pplug_steps,
                             log=console.print)
        merged = [run_quality(ctx, names).full()]
        record = QUALITY_RESULTS.of(spec.name, time.strftime('%Y%m%d-%H%M%S'))
        if args.out:
            Path(args.out).write_text(json.dumps(merged[0], indent=2))
        else:
            ctx.store.put_record(record, merged[0])
        console.print(f"full results (per bucket, per user) in {args.out or 'the store under ' + record.key}")
    for report in merged:
        console.print(render_table(report))
        if args.markdown:
            print(render_markdown(report) + "\n")
    if args.plot:
        plot_results(merged, args.plot)
    if args.json:
        print(json.dumps({k: merged[-1][k] for k in ("task", "users", "metric", "methods")}))


def _read_report(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PeftuError(f"cannot read results {path}: {e}") from None


def fit(args: argparse.Namespace) -> None:
    from rich.console import Console

    from peftu.bench.fit import bench_fit, plot_fit, render_fit_table

    result = bench_fit(base_path(args), args.task, args.users, args.epochs, args.pack_size, args.seed,
                       args.sweep, args.threads, args.repeat)
    Console().print(render_fit_table(result))
    if args.plot:
        plot_fit(result, args.plot)
    if args.json:
        print(json.dumps(result.summary()))


def serve(args: argparse.Namespace) -> None:
    from rich.console import Console

    from peftu.bench.serve import bench_serve, plot_serve, render_serve_markdown, render_serve_table

    result = bench_serve(base_path(args), users=args.users, clients=args.clients, requests=args.requests,
                         open_requests=args.open_requests, rates=tuple(args.rates), max_tokens=args.max_tokens,
                         cache_size=args.cache_size, split=not args.no_split, seed=args.seed, port=args.port,
                         warmup=args.warmup, rounds=args.rounds)
    Console(width=200).print(render_serve_table(result))
    if args.markdown:
        print(render_serve_markdown(result))
    if args.plot:
        plot_serve(result, args.plot)
    if args.json:
        print(json.dumps(result.summary()))


def store(args: argparse.Namespace) -> None:
    from rich.console import Console

    from peftu.bench.store import bench_store, plot_store, render_store_table

    backends = ["s3", "local"] if args.backend == "both" else [args.backend]
    results = [bench_store(n, b, publish=args.publish, concurrency=args.concurrency)
               for n in args.users for b in backends]
    Console(width=160).print(render_store_table(results))
    if args.plot:
        plot_store(results, args.plot)
    if args.json:
        for r in results:
            print(json.dumps(r.summary()))
