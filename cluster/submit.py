"""Submit a job to a Ray head through the Jobs API, follow its logs, and wait for it to end.

    python -m cluster.submit --address http://127.0.0.1:8265 -- python -m jobs.fit --data ... --store ...

The job runs with this repository as its working_dir (minus the venv, git, caches and
large files), so the head runs the code you have here. With token auth on, the token
comes from --token-file, else (when RAY_AUTH_MODE=token) from where Ray itself looks:
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. Exit code: 0 when the job
SUCCEEDED, 1 when it FAILED or was STOPPED, 2 when it could not be submitted or followed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.local import DEFAULT_DASHBOARD_PORT, HOST, find_token

REPO_ROOT = Path(__file__).resolve().parent.parent
# Ray also honours .gitignore; these hold even if it changes. Patterns are gitignore-style.
EXCLUDES = [".venv/", "venv/", ".git/", "__pycache__/", ".pytest_cache/", ".hypothesis/", "*.egg-info/",
            "build/", "out/", "*.safetensors"]
LARGE_FILE_BYTES = 10 * 2**20  # Ray warns from this size on; such files are data, not code


class SubmitError(RuntimeError):
    """The job could not be submitted or followed; the message names the address or job and the reason."""


@dataclass(frozen=True)
class JobResult:
    """A finished job: its terminal status, Ray's message about it, and its whole log."""

    job_id: str
    status: JobStatus
    message: str
    logs: str

    @property
    def succeeded(self) -> bool:
        return self.status == JobStatus.SUCCEEDED


def large_files(root: Path, limit: int = LARGE_FILE_BYTES) -> list[str]:
    """Files of at least `limit` bytes under `root` (outside the excluded dirs), as anchored patterns."""
    skip = {p.rstrip("/") for p in EXCLUDES if p.endswith("/") and "*" not in p}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= limit:
                found.append("/" + path.relative_to(root).as_posix())
    return found


def runtime_env(working_dir: Path = REPO_ROOT, env_vars: dict[str, str] | None = None) -> dict:
    """The job's runtime env: `working_dir` uploaded without venv, git, caches and large files."""
    env: dict = {"working_dir": str(working_dir), "excludes": [*EXCLUDES, *large_files(working_dir)]}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


@contextmanager
def _explained(where: str) -> Iterator[None]:
    """Turn the Jobs API's failures into one SubmitError line naming `where` and the reason."""
    try:
        yield
    except AuthenticationError as e:
        reason = "the token is wrong" if "Authentication failed" in str(e) else "no token was sent"
        raise SubmitError(f"{where}: auth rejected: {reason} (the head runs with RAY_AUTH_MODE=token)") from e
    except (ConnectionError, requests.ConnectionError, requests.Timeout) as e:
        raise SubmitError(f"{where}: head unreachable ({type(e).__name__})") from e
    except RuntimeError as e:  # the SDK's "Request failed with status code ...: <body>"
        raise SubmitError(f"{where}: {str(e).strip().splitlines()[0]}") from e


def connect(address: str, token: str | None = None) -> JobSubmissionClient:
    """A Jobs API client; with `token`, it is sent as a bearer token whatever this process's RAY_AUTH_MODE."""
    # Ray's SDK silently replaces `address` with RAY_API_SERVER_ADDRESS (else RAY_ADDRESS) from the
    # environment; refuse rather than submit to another cluster than the one named.
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if value := os.environ.get(name):
            if "://" in value and value.rstrip("/") != address.rstrip("/"):
                raise SubmitError(f"{address}: {name}={value} in the environment would override this address; "
                                  "unset it or pass the same address")
            break
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _explained(address):
        return JobSubmissionClient(address, headers=headers)


def submit(address: str, entrypoint: str, *, token: str | None = None, working_dir: Path = REPO_ROOT,
           env_vars: dict[str, str] | None = None, timeout_s: float = 3600.0, poll_s: float = 1.0,
           out: TextIO | None = sys.stdout) -> JobResult:
    """Submit `entrypoint`, write its new log lines to `out` while it runs, and return how it ended.

    A job still running after `timeout_s` is stopped and reported as a SubmitError.
    """
    client = connect(address, token)
    deadline = time.monotonic() + timeout_s
    env = runtime_env(working_dir, env_vars)
    while True:
        try:
            with _explained(address):
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
            break
        except SubmitError as e:  # a head that has just started has no job agent for a few seconds
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(poll_s)
    return wait(client, job_id, deadline=deadline, poll_s=poll_s, out=out)


def wait(client: JobSubmissionClient, job_id: str, *, deadline: float, poll_s: float = 1.0,
         out: TextIO | None = sys.stdout) -> JobResult:
    """Poll the job's status until it is terminal (or `deadline`, a time.monotonic() value), echoing its logs."""
    where = f"job {job_id} on {client.get_address()}"
    shown = 0
    while True:
        with _explained(where):
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)  # read after the status, so a terminal status has its full log
        if out is not None and len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
        shown = len(logs)
        if status.is_terminal():
            break
        if time.monotonic() > deadline:
            with _explained(where):
                client.stop_job(job_id)
            raise SubmitError(f"{where}: still {status} at the timeout; stopped it")
        time.sleep(poll_s)
    with _explained(where):
        message = client.get_job_info(job_id).message or ""
    return JobResult(job_id=job_id, status=status, message=message, logs=logs)


def _token(token_file: str | None) -> str | None:
    """The token to send: --token-file's, else Ray's own when this environment says RAY_AUTH_MODE=token."""
    if token_file:
        return Path(token_file).read_text().strip()
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token":
        return find_token()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.getLogger("ray").setLevel(logging.WARNING)  # keep the job's own logs readable
    # EXCLUDES already leaves out what Ray 2.60 excludes by default; this only drops its warnings.
    os.environ.setdefault("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1:]
    env_address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    default = env_address if "://" in env_address else f"http://{HOST}:{DEFAULT_DASHBOARD_PORT}"
    parser = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- COMMAND [ARGS...]")
    parser.add_argument("--address", default=default, help=f"the head's dashboard URL (default {default})")
    parser.add_argument("--token-file", help="file holding the cluster's auth token")
    parser.add_argument("--working-dir", type=Path, default=REPO_ROOT)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="job env var (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is stopped")
    args = parser.parse_args(own)
    if not command:
        parser.error("give the job's command after --, e.g. -- python -m jobs.fit --help")
    if not args.address.startswith(("http://", "https://")):
        parser.error(f"--address takes the dashboard's URL, like http://{HOST}:{DEFAULT_DASHBOARD_PORT}")
    if bad := [item for item in args.env if "=" not in item]:
        parser.error(f"--env needs NAME=VALUE, got {bad[0]!r}")
    env_vars = dict(item.split("=", 1) for item in args.env)

    try:
        token = _token(args.token_file)
    except OSError as e:
        print(f"error: cannot read the token file: {e}", file=sys.stderr)
        return 2
    try:
        result = submit(args.address, shlex.join(command), token=token, working_dir=args.working_dir,
                        env_vars=env_vars, timeout_s=args.timeout)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = f"job {result.job_id} on {args.address}: {result.status}"
    if not result.succeeded:
        # Ray's message goes on with ", last available logs ...:" and the log tail, echoed above already.
        first = result.message.strip().split(", last available logs")[0].splitlines()
        reason = first[0] if first else "no reason given"
        print(f"error: {line}: {reason}", file=sys.stderr)
        return 1
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
