"""`peftu serve` (the serving app on this machine's Ray) and `peftu serve token` (a user's token)."""

from __future__ import annotations

import argparse
import json
import signal
import socket

from peftu.cli.common import add_base, add_store, base_path, field_flag
from peftu.config import ServeConfig
from peftu.errors import PeftuError

FLAGS = ("base", "store", "endpoint_url", "task", "batching")
"""`ServeConfig` fields that are flags of their own; --set reaches every other one."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the serving app on a local Ray (OpenAI-compatible HTTP API)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for name in ("task", "batching"):
        p.add_argument(f"--{name}", **field_flag(ServeConfig.model_fields[name], optional=True))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any serving option (peftu.config.ServeConfig), e.g. --set max_adapters=512")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, how long running requests may take to finish (default %(default)s)")
    add_base(p)
    add_store(p)
    sub = p.add_subparsers(dest="serve_command")
    t = sub.add_parser("token", help="print a user's token (a JWT signed with the server's first HS256 key)")
    t.add_argument("user")
    t.add_argument("--ttl", default="1h", help="how long it is valid: 3600, 90s, 15m, 1h, 7d (default %(default)s)")
    t.add_argument("--model-name", help="its audience: the served model name (default: the --base folder's name, "
                   "as the server names it)")
    t.add_argument("--secret-env", default=ServeConfig.model_fields["token_secret_env"].default,
                   help="variable holding the server's keys (default %(default)s)")
    return p


def run(args: argparse.Namespace) -> None:
    if args.serve_command == "token":
        token(args)
    else:
        run_app(args)


def serve_options(args: argparse.Namespace) -> dict:
    """ServeConfig fields from the flags and --set KEY=VALUE (a value is JSON if it parses)."""
    config = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise PeftuError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            config[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            config[key.replace("-", "_")] = value
    return config


def run_app(args: argparse.Namespace) -> None:
    """The serving app on this machine's Ray (RAY_ADDRESS's cluster if set), until SIGINT or SIGTERM.

    Then it stops gracefully: the app is deleted first, so Serve routes nothing new to its
    replicas while each finishes its running requests (at most `--grace-s`; the proxies stay up
    to deliver them), then Serve and Ray shut down and the command returns (exit 0).
    """
    import ray
    from pydantic import ValidationError
    from ray import serve

    from peftu.serving.server import PeftuServer

    options = serve_options(args)
    options.setdefault("base", base_path(args))  # a replica never builds the tiny base: it is built here
    try:
        config = ServeConfig.model_validate(options).model_dump()
    except ValidationError as e:
        raise PeftuError(f"invalid serving option: {e}") from None
    app = PeftuServer.options(graceful_shutdown_timeout_s=args.grace_s).bind(config)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    stop = _StopSignals()  # after ray.init, whose own SIGTERM handler would abort with a stack dump
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="peftu", route_prefix="/", blocking=False)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops)", flush=True)
    sig = stop.wait()
    print(f"{sig.name}: stopping; running requests may take {args.grace_s:g} s to finish", flush=True)
    serve.delete("peftu")
    serve.shutdown()
    ray.shutdown()
    print("stopped", flush=True)


class _StopSignals:
    """SIGINT and SIGTERM, caught from now on, whichever of Ray's threads the OS hands them to.

    The handlers do nothing themselves: the C-level handler writes the signal's number to the
    wakeup socket, from any thread, and that wakes `wait`. They stay: a second signal does not
    cut the drain, which --grace-s bounds.
    """

    WANTED = {signal.SIGINT, signal.SIGTERM}

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        for sig in self.WANTED:
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(self._writer.fileno())

    def wait(self) -> signal.Signals:
        """Block until one came (or return the one that came already)."""
        try:
            while True:
                for number in self._reader.recv(64):
                    if number in self.WANTED:
                        return signal.Signals(number)
        finally:
            signal.set_wakeup_fd(-1)
            self._reader.close()
            self._writer.close()


def token(args: argparse.Namespace) -> None:
    """Print a JWT for one user, signed with the first key of the secret variable."""
    import os
    from pathlib import Path

    from peftu.serving.auth import make_token, parse_duration, parse_secrets

    secret = os.environ.get(args.secret_env)
    if not secret:
        raise PeftuError(f"set ${args.secret_env} to the server's token secret")
    audience = args.model_name
    if not audience:
        from peftu.model.base import default_base_dir

        audience = Path((args.base or str(default_base_dir())).rstrip("/")).name
    try:
        kid, key = next(iter(parse_secrets(secret, f"${args.secret_env}").items()))
        print(make_token(key, args.user, audience, ttl_s=parse_duration(args.ttl), kid=kid))
    except ValueError as e:
        raise PeftuError(str(e)) from None
