"""`peftu base build`: train a tokenizer and pre-train the tiny default base."""

from __future__ import annotations

import argparse

from peftu.cli.common import add_endpoint, field_flag, settings
from peftu.config import BaseBuildConfig

FLAGS = {"minutes": "max_minutes", "steps": "max_steps"}
"""The build's flags and the `BaseBuildConfig` fields they set."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("base", help="build the tiny default base model")
    sub = parser.add_subparsers(dest="base_command", required=True)
    p = sub.add_parser("build", help="train a tokenizer and pre-train the tiny Llama on the CPU")
    p.add_argument("--out", help="folder (default: $PEFTU_HOME/base/tiny-llama)")
    for flag, name in FLAGS.items():
        p.add_argument(f"--{flag}", **field_flag(BaseBuildConfig.model_fields[name], optional=True))
    p.add_argument("--extra-data", nargs="*", default=[],
                   help="saved data sets whose training text joins the corpus")
    add_endpoint(p)
    return parser


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from peftu.data.io import load_task
    from peftu.model.base import default_base_dir
    from peftu.model.build import build_base

    cfg = settings(BaseBuildConfig, **{name: getattr(args, flag) for flag, name in FLAGS.items()
                                       if getattr(args, flag) is not None})
    out = Path(args.out) if args.out else default_base_dir()
    extra = [load_task(p, endpoint_url=args.endpoint_url) for p in args.extra_data]
    info = build_base(out, cfg, extra=extra)
    print(f"saved the base to {out} (perplexity {info['ppl_before']:.1f} -> {info['ppl_after']:.2f})")
