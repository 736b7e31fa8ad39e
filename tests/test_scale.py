"""`make test-slow`: the fit job and the store at 10,000 and 100,000 users (docs/benchmarks.md, "Store")."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from peftu.data.io import save_task
from peftu.data.synthetic import generate
from peftu.store import AdapterStore
from peftu.store.kinds import ADAPTER, RUN_SUMMARY

pytestmark = pytest.mark.slow

TASK = "synth-cls"


def versions_per_user(store: AdapterStore) -> dict[str, int]:
    """Complete versions of each user's adapter, from one listing of the task (not one per user)."""
    counts: dict[str, int] = {}
    for key in store.backend.list(f"adapters/{TASK}"):
        parts = key.split("/")
        if len(parts) == 6 and parts[5] == "manifest.json":
            counts[parts[2]] = counts.get(parts[2], 0) + 1
    return counts


def _peak_rss(logs: str) -> str:
    """The driver's own account of its peak memory, from its last log line."""
    return [line for line in logs.splitlines() if "driver peak RSS" in line][-1].rsplit("driver peak RSS", 1)[1]


@pytest.mark.timeout(3600)
def test_ten_thousand_users_on_the_cluster_each_published_once_then_a_rerun_skips_all(ray_cluster, tiny_base,
                                                                                      tmp_path):
    from tests.test_fit_job import _submit_fit

    spec, users, _ = generate(TASK, 10_000, seed=10_000)
    save_task(tmp_path / "data", spec, users)
    data, store_uri = str(tmp_path / "data"), str(tmp_path / "store")
    first = _submit_fit(ray_cluster, data, store_uri, tiny_base, "--pack-size", "32", "--epochs", "1", "--no-select")
    assert first.succeeded, first.logs[-3000:]
    store = AdapterStore.open(store_uri)
    assert store.list_users(TASK) == sorted(u.user_id for u in users)
    assert set(versions_per_user(store).values()) == {1}
    started = time.monotonic()
    again = _submit_fit(ray_cluster, data, store_uri, tiny_base, "--pack-size", "32", "--epochs", "1", "--no-select")
    rerun_s = time.monotonic() - started
    assert again.succeeded and "fitted 0, skipped 10000" in again.logs, again.logs[-3000:]
    assert set(versions_per_user(store).values()) == {1}
    print([line for line in first.logs.splitlines() if "users/hour over" in line][-1])  # for the docs
    print(f"re-run skipping all 10,000: {rerun_s:.0f} s (submit to finish); driver peak RSS "
          f"{_peak_rss(first.logs)} (fit), {_peak_rss(again.logs)} (re-run)")


def _fit_command(data: str, store: str, base: str, users: int) -> list[str]:
    return [sys.executable, "-m", "jobs.fit", "--data", data, "--store", store, "--base", base, "--workers", "2",
            "--pack-size", "16", "--epochs", "1", "--users", str(users), "--no-select"]


@pytest.mark.timeout(3600)
def test_a_hundred_thousand_users_planned_a_slice_fitted_killed_and_resumed(tiny_base, tmp_path):
    """Plan all 100,000 users against the index, fit a slice in a driver killed once some are published,
    and resume: the resumed run fits exactly the slice's users that were not current yet."""
    from peftu.config import LoraHParams
    from peftu.model.base import base_fingerprint
    from peftu.store.current import split_current

    spec, users, _ = generate(TASK, 100_000, seed=100_000)
    save_task(tmp_path / "data", spec, users)
    data, store_uri, slice_n = str(tmp_path / "data"), str(tmp_path / "store"), 3000
    store = AdapterStore.open(store_uri)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen(_fit_command(data, store_uri, tiny_base, slice_n), env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while driver.poll() is None and len(store.list_users(TASK)) < 200:
            time.sleep(2)  # polling the store: the publishes are the signal
    finally:  # the driver and its local Ray, every process of it (some leave the driver's process group)
        tree = [driver_proc := psutil.Process(driver.pid), *driver_proc.children(recursive=True)]
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        driver.wait()
        psutil.wait_procs(tree, timeout=30)
    current = set(store.list_users(TASK))
    assert 200 <= len(current) < slice_n, "the kill came too late to test a resume"

    hp = LoraHParams(**store.manifest(TASK, min(current)).hparams)  # what the job fitted with
    started = time.monotonic()
    todo, fresh = split_current(store, spec, users, hp, base_fingerprint(tiny_base))
    plan_s = time.monotonic() - started
    assert set(fresh) == current and len(todo) == 100_000 - len(current)

    resumed = subprocess.run(_fit_command(data, store_uri, tiny_base, slice_n), env=env, capture_output=True,
                             text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = store.artifact_owners(RUN_SUMMARY, TASK)
    record = store.get_record(RUN_SUMMARY.of(TASK, runs[-1]))
    assert (record["fitted"], record["skipped"], record["failed"]) == (slice_n - len(current), len(current), 0)
    counts = versions_per_user(store)
    assert set(counts) == {u.user_id for u in users[:slice_n]}
    # A user whose publish the kill cut between manifest and pointer keeps that unpointed version beside
    # the one the resumed run published: only the users in flight at the kill (2 workers' publishes)
    orphaned = {u for u, n in counts.items() if n > 1}
    assert len(orphaned) <= 16 and not orphaned & current and set(counts.values()) <= {1, 2}, orphaned
    assert store.backend.list(f"indexes/{ADAPTER.root}/{TASK}/changes") == []  # compacted at the end
    store.gc_versions(TASK, keep=1)  # `peftu store gc --keep 1` removes them, never a current version
    assert set(versions_per_user(store).values()) == {1} and set(store.list_users(TASK)) == set(counts)
    print(f"planned 100,000 users in {plan_s:.1f} s; killed after {len(current)} of {slice_n}; resumed run "
          f"fitted {record['fitted']} ({len(orphaned)} had an unpointed version from the kill); its driver's "
          f"peak RSS {_peak_rss(resumed.stderr + resumed.stdout)}")

