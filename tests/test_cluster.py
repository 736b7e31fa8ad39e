"""The local multi-node Ray cluster and the job launcher, for real: `ray start` processes,
the dashboard's HTTP APIs, token auth, and jobs that run this repository's code."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from cluster.local import (
    HEAD_RESOURCE,
    RAY_BIN,
    ClusterError,
    ClusterInfo,
    list_alive_nodes,
    processes,
    resolve_auth,
    start_cluster,
    status,
    stop_cluster,
)
from cluster.submit import SubmitError, connect, submit

REPO = Path(__file__).resolve().parent.parent


def _env(info: ClusterInfo | None = None) -> dict[str, str]:
    """This process's environment without any Ray address or auth setting, plus `info`'s client env."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAY_AUTH_")}
    return {**env, **(info.env if info else {})}


def _run(args: list[str] | str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(args, str))


def _python_c(code: str, *args: str) -> str:
    """The entrypoint `python -c code args...` (on our nodes, `python` is this venv's)."""
    return shlex.join(["python", "-c", code, *args])


# ---------------------------------------------------------------- auth default, no cluster


def test_auth_default_follows_plain_ray_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """auth=None: RAY_AUTH_MODE decides if set, else auth is on iff a token exists (as `ray start --head`)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_auth(None) is None

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert resolve_auth(None) == "home-token"
    named = tmp_path / "named"
    named.write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert resolve_auth(None) == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert resolve_auth(None) == "env-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert resolve_auth(None) is None
    assert resolve_auth(True, "given") == "given"

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name)
    (tmp_path / ".ray" / "auth_token").unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    first, second = resolve_auth(None), resolve_auth(True)
    assert len(first) == 64 and int(first, 16) >= 0 and first != second  # new random tokens
    assert resolve_auth(False) is None


# ---------------------------------------------------------------- the session cluster (token auth on)


def test_three_alive_nodes_with_their_resources(ray_cluster: ClusterInfo) -> None:
    nodes = list_alive_nodes(ray_cluster.dashboard_url, ray_cluster.headers)
    assert len(nodes) == 3
    assert len({n["node_id"] for n in nodes}) == 3
    heads = [n for n in nodes if n["is_head_node"]]
    assert len(heads) == 1
    assert heads[0]["resources_total"][HEAD_RESOURCE] == 1
    assert "CPU" not in heads[0]["resources_total"]  # 0 CPUs: jobs' work lands on the workers
    workers = [n for n in nodes if not n["is_head_node"]]
    assert sorted(r for n in workers for r in n["resources_total"] if r.startswith("node:worker-")) == \
        ["node:worker-1", "node:worker-2"]
    assert all(n["resources_total"]["CPU"] == 1 for n in workers)


def test_tasks_pinned_by_resource_run_on_that_node(ray_cluster: ClusterInfo) -> None:
    """A driver started with ClusterInfo.env joins the cluster; a task asking for node:worker-i runs on worker i."""
    nodes = list_alive_nodes(ray_cluster.dashboard_url, ray_cluster.headers)
    expected = {r: n["node_id"] for n in nodes for r in n["resources_total"] if r.startswith("node:worker-")}
    code = (
        "import json, ray\n"
        "ray.init()\n"
        "@ray.remote(num_cpus=1)\n"
        "def where():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        f"names = {sorted(expected)!r}\n"
        "print(json.dumps({r: ray.get(where.options(resources={r: 0.01}).remote()) for r in names}))\n"
    )
    done = _run([sys.executable, "-c", code], _env(ray_cluster))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_job_runs_the_repo_as_working_dir(ray_cluster: ClusterInfo, tmp_path: Path) -> None:
    """The driver (on the head) and its tasks (on the workers) run in uploaded copies of the repo."""
    marker, report = uuid.uuid4().hex, tmp_path / "report.json"
    code = (
        "import json, os, sys, peftu, ray\n"
        "ray.init()\n"
        "resources = ray.cluster_resources()\n"
        "@ray.remote(num_cpus=1)\n"
        "def task(name):\n"
        "    import peftu\n"
        "    print('task on', name)\n"
        "    return os.getcwd(), peftu.__file__\n"
        "names = sorted(r for r in resources if r.startswith('node:worker-'))\n"
        "tasks = ray.get([task.options(resources={r: 0.01}).remote(r) for r in names])\n"
        "json.dump({'cwd': os.getcwd(), 'peftu': peftu.__file__, 'venv': os.path.exists('.venv'),\n"
        "           'git': os.path.exists('.git'), 'cpus': resources.get('CPU'), 'tasks': tasks},\n"
        "          open(sys.argv[1], 'w'))\n"
        "print('MARKER', sys.argv[2], names)\n"
    )
    streamed = io.StringIO()
    result = submit(ray_cluster.dashboard_url, _python_c(code, str(report), marker), token=ray_cluster.auth_token,
                    timeout_s=120, poll_s=0.5, out=streamed)
    assert result.succeeded, (result.status, result.message, result.logs[-3000:])
    assert f"MARKER {marker} ['node:worker-1', 'node:worker-2']" in result.logs
    assert "task on node:worker-1" in result.logs and "task on node:worker-2" in result.logs  # workers' logs too
    assert streamed.getvalue() == result.logs  # every log line was echoed while it ran
    seen = json.loads(report.read_text())
    assert seen["cwd"] != str(REPO) and (Path(seen["cwd"]) / "pyproject.toml").is_file()
    assert seen["peftu"].startswith(seen["cwd"])  # the uploaded copy, not the editable install
    assert not seen["venv"] and not seen["git"]
    assert seen["cpus"] == 2
    task_dirs = [cwd for cwd, _ in seen["tasks"]]
    assert len(set(task_dirs + [seen["cwd"]])) == 3  # each node its own copy (see cluster.local._temp_dir)
    assert all(file.startswith(cwd) for cwd, file in seen["tasks"])


def test_failing_job_reports_failed(ray_cluster: ClusterInfo) -> None:
    code = "import sys; print('about to fail'); sys.exit(1)"
    result = submit(ray_cluster.dashboard_url, _python_c(code), token=ray_cluster.auth_token, timeout_s=120,
                    poll_s=0.5, out=None)
    assert result.status == "FAILED" and not result.succeeded
    assert "exit code 1" in result.message
    assert "about to fail" in result.logs


def test_submit_cli_exit_codes_and_one_line_errors(ray_cluster: ClusterInfo, free_tcp_port: int) -> None:
    url = ray_cluster.dashboard_url
    failed = _run([sys.executable, "-m", "cluster.submit", "--address", url, "--", "python", "-c",
                   "import sys; sys.exit(3)"], _env(ray_cluster))
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: job raysubmit_") and f"on {url}: FAILED: " in last and "exit code 3" in last

    dead = f"http://127.0.0.1:{free_tcp_port}"
    unreachable = _run([sys.executable, "-m", "cluster.submit", "--address", dead, "--", "true"], _env())
    assert unreachable.returncode == 2
    assert unreachable.stderr.strip().splitlines()[-1] == f"error: {dead}: head unreachable (ConnectionError)"

    no_token = _run([sys.executable, "-m", "cluster.submit", "--address", url, "--", "true"], _env())
    assert no_token.returncode == 2
    assert no_token.stderr.strip().splitlines()[-1].startswith(f"error: {url}: auth rejected: no token was sent")


def test_client_without_the_token_is_rejected(ray_cluster: ClusterInfo) -> None:
    url = ray_cluster.dashboard_url
    assert requests.get(f"{url}/api/authentication_mode", timeout=10).json() == {"authentication_mode": "token"}
    assert requests.get(f"{url}/api/version", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/version", headers=ray_cluster.headers, timeout=10).status_code == 200
    with pytest.raises(SubmitError, match=f"^{url}: auth rejected"):
        connect(url)
    with pytest.raises(SubmitError, match="auth rejected: the token is wrong"):
        connect(url, token="0" * 64)
    assert isinstance(connect(url, token=ray_cluster.auth_token).list_jobs(), list)


@pytest.mark.slow  # 16 s; jobs through our own submit client stay in `make test` (above)
def test_ray_job_submit_cli_with_the_cluster_env(ray_cluster: ClusterInfo) -> None:
    """The real `ray job submit`: the line `ClusterInfo.job_submit_command` prints, with `ClusterInfo.env`,
    and without the token."""
    marker = uuid.uuid4().hex
    command = ray_cluster.job_submit_command(_python_c(f"print('cli', {marker!r})"))
    assert f"{RAY_BIN} job submit --address {ray_cluster.dashboard_url} " in command
    done = _run(command, _env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"cli {marker}" in done.stdout
    assert "succeeded" in done.stdout + done.stderr

    with_env = _run([RAY_BIN, "job", "submit", "--address", ray_cluster.dashboard_url, "--", "echo", marker],
                    _env(ray_cluster))
    assert with_env.returncode == 0, with_env.stdout[-2000:] + with_env.stderr[-2000:]
    assert marker in with_env.stdout

    refused = _run([RAY_BIN, "job", "submit", "--address", ray_cluster.dashboard_url, "--", "true"], _env())
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr


def test_local_cli_status_prints_how_to_submit(ray_cluster: ClusterInfo) -> None:
    port = str(ray_cluster.dashboard_port)
    done = _run([sys.executable, "-m", "cluster.local", "status", "--port", port], _env())
    assert done.returncode == 0, done.stderr
    assert f"address:   {ray_cluster.address}" in done.stdout
    assert f"ray job submit --address {ray_cluster.dashboard_url} --working-dir . -- " in done.stdout
    assert f"RAY_AUTH_TOKEN_PATH={ray_cluster.token_path}" in done.stdout
    assert "alive nodes: 3" in done.stdout


# ---------------------------------------------------------------- a head of its own (auth off), and stop


@pytest.mark.slow  # 9 s: a second cluster of its own, auth off, started and stopped
def test_head_without_auth_then_stop_leaves_no_process(free_tcp_port: int) -> None:
    port = free_tcp_port
    info = start_cluster(workers=0, dashboard_port=port, auth=False)
    ours = []
    try:
        assert info.auth_token is None and info.env["RAY_AUTH_MODE"] == "disabled" and info.headers == {}
        mode = requests.get(f"{info.dashboard_url}/api/authentication_mode", timeout=10).json()
        assert mode == {"authentication_mode": "disabled"}
        assert requests.get(f"{info.dashboard_url}/api/version", timeout=10).status_code == 200
        [head] = list_alive_nodes(info.dashboard_url)
        assert head["is_head_node"]
        assert isinstance(connect(info.dashboard_url).list_jobs(), list)
        assert status(port) == info
        with pytest.raises(ClusterError, match="already runs"):
            start_cluster(workers=0, dashboard_port=port, auth=False)
        ours = processes(port)
        assert {"gcs_server", "raylet"} <= {p.name() for p in ours}
    finally:
        assert stop_cluster(port)
    assert not [p.pid for p in ours if p.is_running() and p.status() != "zombie"]
    assert processes(port) == [] and status(port) is None and not Path(info.state_dir).exists()
    assert not stop_cluster(port)
