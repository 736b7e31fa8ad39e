"""Start and stop a local multi-node Ray cluster: one head and N worker nodes on this machine.

Each node is its own `ray start --block` process (its own raylet, resources, ports and
agents), so jobs meet real node boundaries without a second machine. Worker i carries
the custom resource `node:worker-i`, which pins work to it. /tmp/peftu-ray/<dashboard
port>/ holds the cluster's state file, the `ray start` logs, with token auth on the token
file, and one Ray temp dir per node.

    python -m cluster.local start --workers 2     # prints the address and a `ray job submit` line
    python -m cluster.local status
    python -m cluster.local stop

Token auth (Ray 2.60): RAY_AUTH_MODE=token on every node and client, and the token from
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
A plain `ray start --head` turns auth on when RAY_AUTH_MODE is unset but a token exists;
`auth=None` here does the same. Worker nodes and HTTP clients never turn it on by
themselves, so every process we start gets RAY_AUTH_MODE (and RAY_AUTH_TOKEN_PATH)
explicitly, and `ClusterInfo.env` carries them for clients.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8265
HEAD_RESOURCE = "node:head"
BIN_DIR = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` jobs run with
RAY_BIN = str(BIN_DIR / "ray") if (BIN_DIR / "ray").exists() else (shutil.which("ray") or "ray")


class ClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped; the message says which and why."""


def worker_resource(index: int) -> str:
    """The custom resource naming worker node `index` (1-based): request a little of it to run there."""
    return f"node:worker-{index}"


@dataclass(frozen=True)
class ClusterInfo:
    """What a client needs to use a running local cluster."""

    address: str  # GCS address, for ray.init(address=...) and `ray start --address`
    dashboard_url: str  # Jobs API and state API
    auth_token: str | None  # None when token auth is off
    token_path: str | None  # the file holding auth_token (clients get it as RAY_AUTH_TOKEN_PATH)
    workers: int
    cpus_per_node: int
    head_cpus: int
    state_dir: str

    @property
    def dashboard_port(self) -> int:
        return int(self.dashboard_url.rsplit(":", 1)[1])

    @property
    def worker_resources(self) -> list[str]:
        return [worker_resource(i) for i in range(1, self.workers + 1)]

    @property
    def auth_env(self) -> dict[str, str]:
        """The auth variables every Ray process and client of this cluster must share."""
        if self.token_path is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    @property
    def env(self) -> dict[str, str]:
        """Variables for a client process: `ray.init()` and `ray job submit` find the cluster and its token."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url, **self.auth_env}

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard (JobSubmissionClient(headers=...), state API)."""
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def job_submit_command(self, entrypoint: str = "python -m jobs.fit --help") -> str:
        """The exact `ray job submit` line (run from the repo root) for this cluster."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.auth_env.items())
        return f"{env} {RAY_BIN} job submit --address {self.dashboard_url} --working-dir . -- {entrypoint}"


# ---------------------------------------------------------------- auth


def find_token() -> str | None:
    """The token Ray itself would load: RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH's file, else ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named) if named else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def resolve_auth(auth: bool | None, token: str | None = None) -> str | None:
    """The token a new cluster uses, or None for auth off.

    auth=None decides like a plain `ray start --head` in Ray 2.60: RAY_AUTH_MODE if set,
    otherwise on exactly when a token already exists. With auth on, the token is `token`,
    else the existing one, else a new random one (kept in the cluster's state dir, so
    ~/.ray/auth_token, which other local Ray sessions use, is left alone).
    """
    if auth is None:
        mode = os.environ.get("RAY_AUTH_MODE")
        auth = mode.strip().lower() == "token" if mode else bool(token or find_token())
    if not auth:
        return None
    return token or find_token() or secrets.token_hex(32)


# ---------------------------------------------------------------- start


def start_cluster(workers: int = 2, cpus_per_node: int = 1, *, head_cpus: int = 0,
                  dashboard_port: int = DEFAULT_DASHBOARD_PORT, auth: bool | None = None,
                  token: str | None = None, object_store_mb: int = 256, base_dir: Path | None = None,
                  timeout_s: float = 180.0) -> ClusterInfo:
    """Start a head and `workers` worker nodes; return once all of them are alive in the state API.

    The head gets `head_cpus` (0 by default: it coordinates, the workers compute) and each
    worker `cpus_per_node`. On any failure, whatever was started is stopped again.
    """
    state_dir = _state_dir(dashboard_port, base_dir)
    if status(dashboard_port, base_dir=base_dir) is not None:
        raise ClusterError(f"a cluster already runs with its dashboard on port {dashboard_port}; "
                           f"stop it first: python -m cluster.local stop --port {dashboard_port}")
    stop_cluster(dashboard_port, base_dir=base_dir)  # what is left of one whose head died: its workers
    shutil.rmtree(state_dir, ignore_errors=True)  # and the logs of a failed start
    if not _port_free(dashboard_port):
        raise ClusterError(f"port {dashboard_port} on {HOST} is taken (another Ray dashboard?); pick another port")
    token = resolve_auth(auth, token)
    (state_dir / "logs").mkdir(parents=True)
    token_path = None
    if token:
        token_path = state_dir / "auth_token"
        token_path.touch(mode=0o600)
        token_path.write_text(token)
    gcs_port = _free_port()
    info = ClusterInfo(address=f"{HOST}:{gcs_port}", dashboard_url=f"http://{HOST}:{dashboard_port}",
                       auth_token=token, token_path=str(token_path) if token_path else None,
                       workers=workers, cpus_per_node=cpus_per_node, head_cpus=head_cpus,
                       state_dir=str(state_dir))
    # Several raylets share this host: the OS picks their worker and agent ports.
    common = ["--object-store-memory", str(object_store_mb * 2**20), "--min-worker-port", "0",
              "--max-worker-port", "0", "--dashboard-agent-listen-port", "0", "--disable-usage-stats"]
    head_args = ["--head", "--port", str(gcs_port), "--num-cpus", str(head_cpus),
                 "--resources", json.dumps({HEAD_RESOURCE: 1}), "--include-dashboard", "true",
                 "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
                 "--ray-client-server-port", str(_free_port()), *_temp_dir(state_dir, "head"), *common]
    env = _node_env(info)
    deadline = time.monotonic() + timeout_s
    nodes: list[tuple[str, subprocess.Popen]] = []
    try:
        nodes.append(("head", _launch("head", head_args, env, state_dir)))
        _write_state(info, nodes)
        # One node at a time: on a small machine, a node started while another is still coming up
        # can miss Ray's 30 s registration timeout, and two `ray start`s at once may pick the same port.
        _wait(lambda: _all_alive(info, workers=0), nodes, deadline, f"the head at {info.dashboard_url}", state_dir)
        for i in range(1, workers + 1):
            args = ["--address", info.address, "--num-cpus", str(cpus_per_node), "--resources",
                    json.dumps({worker_resource(i): 1}), *_temp_dir(state_dir, f"worker-{i}"), *common]
            nodes.append((f"worker-{i}", _launch(f"worker-{i}", args, env, state_dir)))
            _write_state(info, nodes)
            _wait(lambda i=i: _all_alive(info, workers=i), nodes, deadline, f"worker-{i} at {info.dashboard_url}",
                  state_dir)
    except BaseException:
        _terminate(_node_records(nodes))
        (state_dir / "cluster.json").unlink(missing_ok=True)  # logs stay for a look; the next start clears them
        raise
    return info


def _state_dir(dashboard_port: int, base_dir: Path | None) -> Path:
    # Short on purpose: Ray's unix sockets live below it and their paths must stay under 108 bytes.
    return (base_dir or Path(tempfile.gettempdir()) / "peftu-ray") / str(dashboard_port)


def _temp_dir(state_dir: Path, node: str) -> list[str]:
    """`--temp-dir` of the node's own.

    Nodes sharing one would share `runtime_resources`, where each node's runtime env agent
    deletes and re-extracts a job's working_dir, even while a job runs in it.
    """
    return ["--temp-dir", str(state_dir / node)]


def _port_free(port: int) -> bool:
    """Nothing listens on the port (connections lingering in TIME_WAIT do not count, as for the dashboard)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _node_env(info: ClusterInfo) -> dict[str, str]:
    """The caller's environment, minus any other cluster's address, plus this cluster's auth."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(info.auth_env)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _launch(name: str, args: list[str], env: dict[str, str], state_dir: Path) -> subprocess.Popen:
    """One node: `ray start --block` in its own session, so the node's processes stay ours to stop."""
    with open(state_dir / "logs" / f"{name}.log", "ab") as log:
        return subprocess.Popen([RAY_BIN, "start", "--block", *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(ready: Callable[[], bool], nodes: list[tuple[str, subprocess.Popen]], deadline: float,
          what: str, state_dir: Path) -> None:
    """Poll `ready` until it holds; fail early if a node's `ray start` exits, or at the deadline."""
    while not ready():
        for name, proc in nodes:
            if proc.poll() is not None:
                lines = (state_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
                tail = "\n".join(lines[-15:])
                raise ClusterError(f"`ray start` of {name} exited with code {proc.returncode} "
                                   f"while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}; see the logs in {state_dir / 'logs'}")
        time.sleep(0.5)


def list_alive_nodes(dashboard_url: str, headers: dict[str, str] | None = None) -> list[dict]:
    """Alive nodes from the state API (node_id, is_head_node, resources_total, ...)."""
    r = requests.get(f"{dashboard_url}/api/v0/nodes", params={"limit": 1000, "detail": "false"},
                     headers=headers or {}, timeout=10)
    if r.status_code in (401, 403):
        raise ClusterError(f"{dashboard_url}: auth rejected (HTTP {r.status_code}: {r.text.strip()})")
    r.raise_for_status()
    return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _all_alive(info: ClusterInfo, workers: int | None = None) -> bool:
    """The head and the first `workers` workers (all by default) are alive; False while the dashboard starts."""
    try:
        nodes = list_alive_nodes(info.dashboard_url, info.headers)
    except (requests.RequestException, KeyError, ValueError):
        return False
    named = {r for n in nodes for r in n["resources_total"]}
    wanted = info.worker_resources[:workers]
    return any(n["is_head_node"] for n in nodes) and set(wanted) <= named


# ---------------------------------------------------------------- state, status, stop


def _node_records(nodes: list[tuple[str, subprocess.Popen]]) -> list[dict]:
    records = []
    for name, proc in nodes:
        try:
            records.append({"name": name, "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time()})
        except psutil.NoSuchProcess:
            pass
    return records


def _write_state(info: ClusterInfo, nodes: list[tuple[str, subprocess.Popen]]) -> None:
    """Record the cluster and its `ray start` processes, so another process can stop it."""
    path = Path(info.state_dir) / "cluster.json"
    path.write_text(json.dumps({"info": asdict(info), "nodes": _node_records(nodes)}, indent=2))


def _read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return None


def _alive(record: dict) -> psutil.Process | None:
    """The recorded process if it still runs (same pid and start time: not a reused pid)."""
    try:
        proc = psutil.Process(record["pid"])
        return proc if proc.create_time() == record["create_time"] and proc.is_running() else None
    except psutil.NoSuchProcess:
        return None


def status(dashboard_port: int = DEFAULT_DASHBOARD_PORT, *, base_dir: Path | None = None) -> ClusterInfo | None:
    """The cluster started on this dashboard port, if its head still runs."""
    state = _read_state(_state_dir(dashboard_port, base_dir))
    if state is None or not state["nodes"] or _alive(state["nodes"][0]) is None:
        return None
    return ClusterInfo(**state["info"])


def processes(dashboard_port: int = DEFAULT_DASHBOARD_PORT, *,
              base_dir: Path | None = None) -> list[psutil.Process]:
    """Every running process of the cluster started on this dashboard port (empty when there is none)."""
    state = _read_state(_state_dir(dashboard_port, base_dir))
    return _processes(state["nodes"]) if state else []


def node_processes(dashboard_port: int, node: str, *, base_dir: Path | None = None) -> list[psutil.Process]:
    """Every running process of one node ("head", "worker-1", ...) of the cluster on this dashboard port."""
    state = _read_state(_state_dir(dashboard_port, base_dir))
    return _processes([r for r in state["nodes"] if r["name"] == node]) if state else []


def _processes(records: list[dict]) -> list[psutil.Process]:
    """Every process of these nodes: the `ray start` processes, their descendants, and their process groups."""
    found: dict[int, psutil.Process] = {}
    groups = set()
    for record in records:
        if (proc := _alive(record)) is None:
            continue
        groups.add(proc.pid)  # start_new_session: the pid is the group id
        for p in [proc, *proc.children(recursive=True)]:
            found[p.pid] = p
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                found.setdefault(p.pid, p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return list(found.values())


def _terminate(records: list[dict], timeout_s: float = 20.0) -> None:
    """SIGTERM each node's `ray start --block`; SIGKILL whatever of the nodes is left after `timeout_s`.

    `ray start --block` stops its node's processes in Ray's order. Signalling every Ray
    process at once instead leaves the GCS and raylets waiting on each other until the SIGKILL.
    """
    procs = _processes(records)
    for record in records:
        if (proc := _alive(record)) is not None:
            proc.terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout_s)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(left, timeout=5)
    if left:
        raise ClusterError(f"processes {[p.pid for p in left]} survived SIGKILL")


def stop_cluster(dashboard_port: int = DEFAULT_DASHBOARD_PORT, *, base_dir: Path | None = None,
                 timeout_s: float = 20.0) -> bool:
    """Stop the cluster started on this dashboard port and remove its state dir; False if there was none.

    Only our own processes are signalled (never `ray stop`, which would also end other
    people's local Ray sessions on this machine).
    """
    state_dir = _state_dir(dashboard_port, base_dir)
    state = _read_state(state_dir)
    if state is None:
        return False
    _terminate(state["nodes"], timeout_s)
    shutil.rmtree(state_dir, ignore_errors=True)
    return True


# ---------------------------------------------------------------- CLI


def describe(info: ClusterInfo) -> str:
    """How to reach the cluster: address, dashboard, client environment and a job submit line."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in info.env.items())
    auth = f"token (in {info.token_path})" if info.auth_token else "off"
    token_file = f" --token-file {shlex.quote(info.token_path)}" if info.token_path else ""
    return "\n".join([
        f"head + {info.workers} worker node(s): head {info.head_cpus} CPU, workers {info.cpus_per_node} CPU each",
        f"address:   {info.address}",
        f"dashboard: {info.dashboard_url}",
        f"auth:      {auth}",
        f"client env: export {exports}",
        "submit a job (from the repo root):",
        f"  {info.job_submit_command()}",
        f"  python -m cluster.submit --address {info.dashboard_url}{token_file} -- python -m jobs.fit --help",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head and N worker nodes")
    start.add_argument("--workers", type=int, default=2)
    start.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each worker node")
    start.add_argument("--head-cpus", type=int, default=0, help="0: the head only coordinates")
    start.add_argument("--auth", choices=["auto", "on", "off"], default="auto",
                       help="token auth; auto does what a plain `ray start --head` does")
    start.add_argument("--object-store-mb", type=int, default=256, help="per node")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the nodes")
    for p in (start, sub.add_parser("stop", help="stop the cluster"),
              sub.add_parser("status", help="print how to reach the cluster")):
        p.add_argument("--port", type=int, default=DEFAULT_DASHBOARD_PORT, help="dashboard port")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            auth = {"auto": None, "on": True, "off": False}[args.auth]
            info = start_cluster(args.workers, args.cpus_per_node, head_cpus=args.head_cpus,
                                 dashboard_port=args.port, auth=auth, object_store_mb=args.object_store_mb,
                                 timeout_s=args.timeout)
            print(describe(info))
        elif args.command == "stop":
            print("stopped" if stop_cluster(args.port) else f"no cluster on dashboard port {args.port}")
        else:
            info = status(args.port)
            if info is None:
                print(f"no cluster on dashboard port {args.port}", file=sys.stderr)
                return 1
            print(describe(info))
            print(f"alive nodes: {len(list_alive_nodes(info.dashboard_url, info.headers))}, "
                  f"processes: {len(processes(args.port))}")
    except (ClusterError, requests.RequestException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
