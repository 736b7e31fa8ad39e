"""The fit job on a real local Ray: shards, publishing once, resume, a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from peftu.config import FitJobConfig, LoraHParams
from peftu.data.io import save_task
from peftu.data.synthetic import generate
from peftu.fitting.job import run_fit_job
from peftu.fitting.selection import selected_counts
from peftu.model.base import base_fingerprint
from peftu.store import AdapterStore
from peftu.store.kinds import RUN_SUMMARY, SELECTION
from tests.faults import assert_store_whole


def _job(tmp_path, tiny_base, n_users: int, select: bool = False, **kw) -> FitJobConfig:
    """A fit job of `n_users` generated users; without the selection after it unless asked (it costs a
    Ray task and every user's validation forwards: one test checks it)."""
    spec, users, _ = generate("synth-cls", n_users, seed=9)
    save_task(tmp_path / "data", spec, users)
    hp = LoraHParams(epochs=1, r=4)
    return FitJobConfig(data=str(tmp_path / "data"), store=str(tmp_path / "store"), base=tiny_base,
                        hparams=hp, progress_interval_s=1.0, select=select, **kw)


def test_every_user_is_published_once_and_a_rerun_skips_all(local_ray, tiny_base, tmp_path):
    job = _job(tmp_path, tiny_base, 6, workers=2, pack_size=2, select=True)
    first = run_fit_job(job)
    store = AdapterStore.open(job.store)
    users = store.list_users("synth-cls")
    assert len(users) == 6 and sorted(first.summary.fitted) == users
    assert all(len(store.list_versions("synth-cls", u)) == 1 for u in users)
    assert "test_accuracy" in store.manifest("synth-cls", users[0]).metrics
    # Then each user's method is chosen on validation and published for serving.
    selection = store.get_record(SELECTION.of("synth-cls"))
    assert selection["users_base"] == base_fingerprint(tiny_base) and sorted(selection["users"]) == users
    assert {c["method"] for c in selection["users"].values()} <= {"majority", "base", "base+prior", "adapter",
                                                                 "adapter+prior", "profile+adapter",
                                                                 "profile+adapter+prior", "retrieval+adapter",
                                                                 "retrieval+adapter+prior", "neighbors",
                                                                 "neighbors+prior"}
    assert first.selected == selected_counts(selection["users"]) and sum(first.selected.values()) == 6
    assert store.get_record(RUN_SUMMARY.of("synth-cls", first.run_id))["selected"] == first.selected

    # A worker killed mid-publish (before its manifest) leaves files the next run that fits the user
    # sweeps away; the others are skipped, planned from the index the first run compacted.
    assert store.backend.list("indexes/adapters/synth-cls/changes") == []
    store.delete_user("synth-cls", users[0])
    half = f"adapters/synth-cls/{users[0]}/versions/{time.time_ns():020d}-deadbeef"
    store.backend.put(f"{half}/adapter_model.safetensors", b"half-written")
    # Scores no model gives, which a re-run that scored everyone again would overwrite; by them the base wins.
    kept = {"method": "adapter", "val": {"majority": 0.0, "base": 1.0, "adapter": 0.0}, "n_val": 4}
    store.put_record(SELECTION.of("synth-cls"), selection | {"users": {u: kept for u in users}})
    again = run_fit_job(job)
    assert again.summary.fitted == [users[0]] and sorted(again.summary.skipped) == users[1:]
    assert all(len(store.list_versions("synth-cls", u)) == 1 for u in users)
    assert store.backend.list(half) == []
    record = store.get_record(RUN_SUMMARY.of("synth-cls", again.run_id))
    assert (record["fitted"], record["skipped"], record["failed"], record["failures"]) == (1, 5, 0, {})
    assert record["error"] is None
    # Only the refitted user is scored again; the others are chosen again from the scores they kept.
    again_selection = store.get_record(SELECTION.of("synth-cls"))["users"]
    assert all(again_selection[u] == kept | {"method": "base"} for u in users[1:])
    assert again_selection[users[0]]["val"] == selection["users"][users[0]]["val"]
    assert record["selected"] == again.selected == selected_counts(again_selection)


def _adapter(store: AdapterStore, user: str, dest) -> dict:
    from safetensors.torch import load_file

    folder, _ = store.fetch("synth-cls", user, dest=dest)
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_pack_parallel_deepspeed_gives_the_user_parallel_adapters(local_ray, tiny_base, tmp_path, stage):
    """2 CPU workers train one pack together under DeepSpeed (gloo); the adapters match a 1-worker run.

    Under `make test-slow` (107 s for ZeRO-2 in CI's suite; ZeRO-3 shards the frozen base too, ~50 s
    more); `make test` keeps DeepSpeed's ZeRO-2 on two ranks in tests/test_zero.py.
    """
    from peftu.paths import peftu_home

    alone = _job(tmp_path / "alone", tiny_base, 4, workers=1, pack_size=4)
    run_fit_job(alone)
    alone_store = AdapterStore.open(alone.store)
    parallel = _job(tmp_path / stage, tiny_base, 4, workers=2, pack_size=4, deepspeed=stage)
    run = run_fit_job(parallel)
    assert len(run.summary.fitted) == 4
    assert (peftu_home() / "ray-runs" / run.run_id / "deepspeed.json").exists()
    store = AdapterStore.open(parallel.store)
    assert store.list_users("synth-cls") == alone_store.list_users("synth-cls")
    for user in run.summary.fitted:
        got = _adapter(store, user, tmp_path / "got" / user)
        want = _adapter(alone_store, user, tmp_path / "want" / user)
        for key in want:
            # fp32: only the order of float sums differs (tests/test_zero.py checks float64)
            assert ((got[key] - want[key]).norm() / want[key].norm()) < 2e-2, (user, key)


def test_oppu_two_stages_fit_users_on_the_merged_task_adapter(local_ray, tiny_base, tmp_path):
    from peftu.model.base import base_fingerprint
    from peftu.model.bases import merged_fingerprint
    from peftu.store.kinds import TASK_ADAPTER

    job = _job(tmp_path, tiny_base, 4, workers=1, pack_size=4, oppu=True)
    first = run_fit_job(job)
    store = AdapterStore.open(job.store)
    task = store.artifact_manifest(TASK_ADAPTER.of("synth-cls"))
    assert task.base_fingerprint == base_fingerprint(tiny_base)
    assert task.metrics["final_loss"] < task.metrics["first_loss"]
    merged = merged_fingerprint(task.base_fingerprint, task)
    assert merged != task.base_fingerprint
    assert len(first.summary.fitted) == 4
    assert {store.manifest("synth-cls", u).base_fingerprint for u in first.summary.fitted} == {merged}

    again = run_fit_job(job)  # the task adapter and every user are current
    assert len(again.summary.skipped) == 4
    assert store.artifact_versions(TASK_ADAPTER.of("synth-cls")) == [task.version]


def _kill_a_worker_once_users_are_published(store: AdapterStore, killed: list[int], stop: threading.Event):
    """Waits for the first published adapter, then SIGKILLs one Ray Train worker process.

    The workers are descendants of this test process (it started the local Ray);
    Ray titles their processes `ray::RayTrainWorker...`.
    """
    import psutil

    while not stop.wait(0.2):
        if not store.list_users("synth-cls"):
            continue
        for proc in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            except psutil.NoSuchProcess:
                continue


@pytest.mark.slow  # 59 s; `make test` keeps a killed worker mid-publish (the re-run above) and the fault
# tests of tests/test_fit_faults.py
def test_a_killed_worker_costs_only_the_users_in_flight(local_ray, tiny_base, tmp_path):
    job = _job(tmp_path, tiny_base, 10, workers=2, pack_size=2, max_failures=3)
    store = AdapterStore.open(job.store)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_once_users_are_published, args=(store, killed, stop))
    killer.start()
    try:
        result = run_fit_job(job)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed: the test did not test anything"
    users = store.list_users("synth-cls")
    assert len(users) == 10 and result.summary.failed == {}
    assert all(len(store.list_versions("synth-cls", u)) == 1 for u in users)
    # One version each: users published before the kill were skipped after the restart, not refitted
    # (a user published just before the kill, but not yet reported, is counted as skipped).
    assert sorted(result.summary.fitted + result.summary.skipped) == users
    assert result.summary.fitted
    # None half-written: every user's one version is the one its pointer names, and it verifies.
    assert_store_whole(store, "synth-cls", users, base_fingerprint(tiny_base))


def _submit_fit(cluster, data: str, store: str, base: str, *extra: str):
    """`python -m jobs.fit` as a Ray job on the multi-node cluster, with the repo as working_dir."""
    from cluster.submit import submit

    entrypoint = " ".join(["python -m jobs.fit", "--data", data, "--store", store, "--base", base,
                           "--workers", "2", *extra])
    return submit(cluster.dashboard_url, entrypoint, token=cluster.auth_token, out=None, timeout_s=1800,
                  env_vars={"PEFTU_HOME": os.environ["PEFTU_HOME"]})


@pytest.mark.slow  # 48 s; tests/test_cluster.py keeps job submission to the multi-node cluster in `make test`
def test_fit_job_through_ray_job_submit_on_a_multi_node_cluster(ray_cluster, tiny_base, tmp_path):
    job = _job(tmp_path, tiny_base, 6)
    result = _submit_fit(ray_cluster, job.data, job.store, tiny_base, "--pack-size", "2", "--epochs", "1")
    assert result.succeeded, result.logs[-3000:]
    assert "fitted 6, skipped 0" in result.logs
    assert "users done" in result.logs  # the driver's progress log
    store = AdapterStore.open(job.store)
    users = store.list_users("synth-cls")
    assert len(users) == 6
    for user in users:  # each adapter verifies (sha256, fitted on this base) and is a PEFT adapter
        folder, _ = store.fetch("synth-cls", user, dest=tmp_path / "fetched" / user,
                                expect_base=base_fingerprint(tiny_base))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in folder.iterdir()}


@pytest.mark.slow
def test_a_thousand_users_on_the_cluster_then_a_rerun_skips_all(ray_cluster, tiny_base, tmp_path):
    """`make test-slow`: 1,000 generated users through the job on a head + 2 worker nodes."""
    spec, users, _ = generate("synth-cls", 1000, seed=1000)
    save_task(tmp_path / "data", spec, users)
    data, store_uri = str(tmp_path / "data"), str(tmp_path / "store")
    first = _submit_fit(ray_cluster, data, store_uri, tiny_base, "--pack-size", "32", "--epochs", "1")
    assert first.succeeded, first.logs[-3000:]
    store = AdapterStore.open(store_uri)
    published = store.list_users("synth-cls")
    assert len(published) == 1000
    assert all(len(store.list_versions("synth-cls", u)) == 1 for u in published)
    again = _submit_fit(ray_cluster, data, store_uri, tiny_base, "--pack-size", "32", "--epochs", "1")
    assert again.succeeded and "fitted 0, skipped 1000" in again.logs
    assert all(len(store.list_versions("synth-cls", u)) == 1 for u in published)
    print([line for line in first.logs.splitlines() if "users/hour over" in line][-1])  # for the docs


def test_a_lost_progress_actor_leaves_the_store_as_the_record(local_ray, tmp_path):
    """The driver's summary without its progress actor: only users published during the run count as fitted."""
    from peftu.fitting.job import FitProgress, _final_status
    from tests.test_store import publish

    store = AdapterStore.open(str(tmp_path / "store"))
    users = generate("synth-cls", 3, seed=2)[1]
    publish(store, users[0].user_id, task="synth-cls")  # before the run: not this run's work
    started_ns = time.time_ns()
    publish(store, users[1].user_id, task="synth-cls")
    ids = [u.user_id for u in users]
    live = FitProgress.remote(3)
    ray.get(live.record.remote({users[2].user_id: "skipped"}, {}))
    assert _final_status(live, store, "synth-cls", ids, started_ns) == ({users[2].user_id: "skipped"}, {})

    lost = FitProgress.remote(3)
    ray.kill(lost)
    status, reasons = _final_status(lost, store, "synth-cls", ids, started_ns)
    assert status == {users[0].user_id: "failed", users[1].user_id: "fitted", users[2].user_id: "failed"}
    assert set(reasons) == {users[0].user_id, users[2].user_id}
    assert all("progress actor was lost" in r for r in reasons.values())


def test_progress_counts_work_left_per_worker(local_ray):
    """The ETA comes from each worker's examples left at its examples per second, the slowest worker's."""
    from peftu.fitting.job import FitProgress, _progress_line

    progress = FitProgress.remote(5)
    assert _progress_line(ray.get(progress.snapshot.remote()), 0.0) == (
        "users done 0 / 5: the workers are starting (loading the base, planning)")  # not "0 examples left"
    ray.get(progress.plan.remote("0", {"a": 30, "b": 10}))
    ray.get(progress.plan.remote("1", {"c": 20}))
    ray.get(progress.record.remote({"d": "skipped", "e": "failed"}, {"e": "no examples"}, "1"))
    snap = ray.get(progress.snapshot.remote())
    assert (snap["done"], snap["fitted"]) == (2, 0)
    assert snap["workers"]["0"] == {"fitted": 0, "left_users": 2, "left_examples": 40, "eta_s": None}
    assert "ETA unknown (60 examples left)" in _progress_line(snap, 0.01)

    ray.get(progress.record.remote({"a": "fitted"}, {}, "0"))
    ray.get(progress.record.remote({"c": "fitted"}, {}, "1"))
    snap = ray.get(progress.snapshot.remote())
    w0, w1 = snap["workers"]["0"], snap["workers"]["1"]
    assert (w0["left_examples"], w0["fitted"], w1["left_examples"], w1["eta_s"]) == (10, 1, 0, 0.0)
    assert w0["eta_s"] is not None and w0["eta_s"] > 0
    line = _progress_line(snap, 0.01)
    assert "users done 4 / 5 (fitted 2), 200 users/hour" in line and "(10 examples left)" in line
    assert "worker 0: fitted 1, 1 users / 10 examples left" in line
    status, reasons = ray.get(progress.final.remote())
    assert status == {"a": "fitted", "c": "fitted", "d": "skipped", "e": "failed"} and reasons == {"e": "no examples"}

