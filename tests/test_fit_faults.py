"""The fit's publish path when the store fails: the S3 endpoint goes down mid-fit, the disk fills up.

In-process (no Ray): the same `fit_users_banked` a Ray Train worker runs. A user
whose publish fails is recorded with the reason, the others are published, nothing
half-written is left, and a re-run publishes exactly the users that failed.
"""

from __future__ import annotations

import errno
import os
import uuid

import pytest

from peftu.config import LoraHParams
from peftu.data.synthetic import generate
from peftu.fitting.banked import fit_users_banked
from peftu.model.base import base_fingerprint, load_base
from peftu.store import AdapterStore, S3Backend
from tests.faults import S3Endpoint, assert_store_whole

TASK = "synth-cls"
HP = LoraHParams(epochs=1, r=4)


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(tiny_base)


def _fit(base, tiny_base, store, users, **kw):
    model, tokenizer = base
    spec, _, _ = generate(TASK, 1, seed=0)
    return fit_users_banked(model, tokenizer, spec, users, HP, store, base_fp=base_fingerprint(tiny_base),
                            pack_size=2, **kw)


def test_s3_goes_down_mid_fit_then_a_rerun_publishes_exactly_the_failed_users(base, tiny_base, s3_fake_credentials,
                                                                              free_tcp_port):
    _, users, _ = generate(TASK, 6, seed=21)
    s3 = S3Endpoint(free_tcp_port).up()
    try:
        bucket = s3.create_bucket(f"peftu-fit-{uuid.uuid4().hex[:8]}")
        store = AdapterStore(S3Backend(bucket, "store", endpoint_url=s3.url, max_attempts=2,
                                       connect_timeout=0.5, read_timeout=2.0))
        first = _fit(base, tiny_base, store, users, on_progress=lambda done: s3.down())  # after the first user
        assert len(first.fitted) == 1 and len(first.failed) == 5
        for reason in first.failed.values():
            assert reason.startswith("publish failed") and s3.url in reason and "unreachable" in reason, reason
        s3.up()
        fp = base_fingerprint(tiny_base)
        kept = assert_store_whole(store, TASK, first.fitted, fp)
        assert store.list_users(TASK) == sorted(first.fitted)
        again = _fit(base, tiny_base, store, users)
        assert sorted(again.fitted) == sorted(first.failed) and sorted(again.skipped) == sorted(first.fitted)
        assert again.failed == {}
        versions = assert_store_whole(store, TASK, [u.user_id for u in users], fp)
        assert all(versions[u] == v for u, v in kept.items())  # the first run's adapters were not refitted
    finally:
        s3.down()


def test_a_full_disk_fails_only_the_user_being_written(base, tiny_base, tmp_path, monkeypatch):
    _, users, _ = generate(TASK, 4, seed=22)
    victim = users[1].user_id
    store = AdapterStore.open(str(tmp_path / "store"))
    replace = os.replace

    def full_for_victim(src, dst):
        if f"/{victim}/" in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", full_for_victim)
    done = _fit(base, tiny_base, store, users)
    monkeypatch.undo()
    assert list(done.failed) == [victim] and "No space left on device" in done.failed[victim]
    others = [u.user_id for u in users if u.user_id != victim]
    assert sorted(done.fitted) == sorted(others)
    assert_store_whole(store, TASK, others, base_fingerprint(tiny_base))
    assert store.list_users(TASK) == sorted(others) and store.list_versions(TASK, victim) == []
