"""`make test-slow`: a worker node of a local multi-node cluster dies in the middle of a fit.

A cluster of its own (head + 3 one-CPU worker nodes; the session's `ray_cluster`
stays whole for the other tests). The fit runs 2 Ray Train workers from a driver
on this host; once users are being published, every process of a node that hosts
a training worker gets SIGKILL (a machine lost, not a clean `ray stop`). Ray Train
restarts the group on the two nodes left; the job finishes with every user
published exactly once, each version whole.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import psutil
import pytest

from cluster.local import node_processes, start_cluster, stop_cluster
from peftu.data.io import save_task
from peftu.data.synthetic import generate
from peftu.model.base import base_fingerprint
from peftu.store import AdapterStore
from tests.faults import assert_store_whole, wait_for


def _titles(port: int, node: str) -> list[str]:
    """The command lines (Ray's process titles) of one node's processes."""
    titles = []
    for proc in node_processes(port, node):
        try:
            titles.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return titles


def _training_node(port: int, workers: int) -> str | None:
    """A worker node running a Ray Train worker and none of the run's controllers."""
    for i in range(1, workers + 1):
        titles = _titles(port, f"worker-{i}")
        if any("RayTrainWorker" in t for t in titles) and not any("Controller" in t for t in titles):
            return f"worker-{i}"
    return None


@pytest.mark.slow
def test_a_worker_node_dies_mid_fit_and_nothing_is_lost_or_doubled(tiny_base, tmp_path, free_tcp_port):
    spec, users, _ = generate("synth-cls", 16, seed=31)
    save_task(tmp_path / "data", spec, users)
    store_uri = str(tmp_path / "store")
    info = start_cluster(workers=3, cpus_per_node=1, head_cpus=0, dashboard_port=free_tcp_port, auth=True,
                         token=secrets.token_hex(32))
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.fit", "--data", str(tmp_path / "data"), "--store", store_uri,
             "--base", tiny_base, "--workers", "2", "--pack-size", "2", "--epochs", "1", "--max-failures", "3"],
            env={**os.environ, **info.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        store = AdapterStore.open(store_uri)
        wait_for(lambda: store.list_users("synth-cls") or driver.poll() is not None, "a first published adapter",
                 deadline_s=600)
        node = wait_for(lambda: _training_node(info.dashboard_port, 3), "a node with a training worker")
        # The run's progress actor lives on the head, never on a worker node that may die.
        assert any("FitProgress" in t for t in _titles(info.dashboard_port, "head"))
        killed = node_processes(info.dashboard_port, node)
        for proc in killed:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        published_at_kill = len(store.list_users("synth-cls"))
        out, _ = driver.communicate(timeout=1200)
    finally:
        stop_cluster(free_tcp_port)
    assert driver.returncode == 0, out[-3000:]  # 0: no user failed (`peftu fit` exits 1 if one did)
    assert killed and published_at_kill < 16, "the node died after the fit: the test tested nothing"
    users_ids = sorted(u.user_id for u in users)
    assert store.list_users("synth-cls") == users_ids, out[-4000:]
    try:
        assert_store_whole(store, "synth-cls", users_ids, base_fingerprint(tiny_base))
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- the driver's log:\n{out[-6000:]}") from None
    print(f"node {node} killed with {published_at_kill}/16 users published; the job finished: "
          f"{[line for line in out.splitlines() if line.startswith('fitted')]}")
