"""The store at scale: the pointer race closed by conditional writes, the task index, gc of old versions.

On a local directory and on S3 (moto's server over HTTP on loopback), as tests/test_store.py.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import peftu.store.adapter_store as store_module
from peftu.errors import StoreError
from peftu.store import AdapterStore
from peftu.store.index import SNAPSHOT, Entry
from peftu.store.kinds import ADAPTER
from tests.test_store import TASK, publish


def truth(store: AdapterStore) -> dict[str, Entry]:
    """Every user's entry read the slow way: each pointer, then its manifest."""
    owners = store._folders_holding(f"adapters/{TASK}", "LATEST")
    return {u: Entry.of(store.manifest(TASK, u)) for u in owners}


# ---------------------------------------------------------------- the pointer race


def test_racing_publishers_leave_the_pointer_on_the_newest(store: AdapterStore) -> None:
    """16 publishers of one user start together; whatever the interleaving, the newest version is current."""
    for rounds in range(3):
        start = threading.Barrier(16)

        def one(seed: int) -> str:
            start.wait()
            return publish(store, "alice", seed=seed).version

        with ThreadPoolExecutor(max_workers=16) as pool:
            versions = list(pool.map(one, range(rounds * 16, rounds * 16 + 16)))
        assert store.latest_version(TASK, "alice") == max(versions)


@pytest.mark.parametrize("mine_is_newer", [True, False])
def test_a_publisher_that_loses_the_race_reads_the_pointer_again(store: AdapterStore, mine_is_newer: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The publisher reads the pointer, then another publish lands before it writes: its conditional write
    fails, it reads again, and it moves the pointer only if its version is the newer one."""
    publish(store, "alice", seed=0)
    older, newer = "50000000000000000000-aaaaaaaa", "60000000000000000000-bbbbbbbb"
    mine, other = (newer, older) if mine_is_newer else (older, newer)
    real_get_tagged, interleaved = store.backend.get_tagged, []

    def get_tagged(key: str):
        seen = real_get_tagged(key)
        if key.endswith("/alice/LATEST") and not interleaved:
            interleaved.append(True)  # the other publisher lands between this read and the write
            monkeypatch.setattr(store_module, "_new_version", lambda: other)
            publish(store, "alice", seed=2)
        return seen

    monkeypatch.setattr(store_module, "_new_version", lambda: mine)
    monkeypatch.setattr(store.backend, "get_tagged", get_tagged)
    publish(store, "alice", seed=1)
    assert interleaved
    assert store.latest_version(TASK, "alice") == max(mine, other)


def test_conditional_writes(store: AdapterStore) -> None:
    b = store.backend
    assert b.put_if("x/new", b"one", None)
    assert not b.put_if("x/new", b"two", None)  # If-None-Match: * on an existing object
    data, tag = b.get_tagged("x/new")
    assert data == b"one"
    assert b.put_if("x/new", b"three", tag)
    assert not b.put_if("x/new", b"four", tag)  # the tag read before the last write is stale
    assert b.get("x/new") == b"three"
    assert not b.put_if("x/gone", b"five", tag)  # If-Match on no object
    assert b.get_tagged("x/gone") is None and b.list("x") == ["x/new"]


# ---------------------------------------------------------------- the index


def count_requests(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name in ("get", "get_tagged", "list", "exists"):
        real = getattr(store.backend, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args)
        monkeypatch.setattr(store.backend, name, counted)
    return calls


def test_a_compacted_index_answers_in_two_requests(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    users = [f"u{i:03d}" for i in range(40)]
    for i, user in enumerate(users):
        publish(store, user, seed=i)
    store.compact_index(ADAPTER, TASK)
    want = truth(store)
    calls = count_requests(store, monkeypatch)
    assert store.current_entries(ADAPTER, TASK) == want
    monkeypatch.undo()
    assert calls == {"list": 1, "get_tagged": 1}  # the marks (none), the snapshot: no user's pointer
    assert store.list_users(TASK) == users
    assert store.index(ADAPTER, TASK).size() > 0


def test_a_stale_index_still_answers_right(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishes and deletes after the last compaction: only the changed users' pointers are read."""
    for i in range(6):
        publish(store, f"u{i}", seed=i)
    store.compact_index(ADAPTER, TASK)
    publish(store, "u0", seed=100)  # a newer version with other data
    store.delete_user(TASK, "u1")
    publish(store, "new", seed=7)
    # A publisher that died after its mark, before its pointer moved: u2 stays on its old version.
    store.index(ADAPTER, TASK).mark("u2", "99999999999999999999-deadbeef")
    calls = count_requests(store, monkeypatch)
    entries = store.current_entries(ADAPTER, TASK)
    monkeypatch.undo()
    assert calls["get"] == 2 * 3 + 1  # pointer and manifest of u0, u2 and new; u1's pointer is gone
    assert entries == truth(store)
    assert "u1" not in entries and entries["u0"].data_fingerprint == store.manifest(TASK, "u0").data_fingerprint

    # Compaction folds in what happened and keeps the mark whose pointer change may still come.
    assert store.compact_index(ADAPTER, TASK) == truth(store)
    assert store.backend.list(f"indexes/adapters/{TASK}/changes") == [
        f"indexes/adapters/{TASK}/changes/u2/99999999999999999999-deadbeef"]
    assert store.current_entries(ADAPTER, TASK) == truth(store)
    # A republish after a delete, and a publish after the last compaction, still count.
    publish(store, "u1", seed=11)
    assert store.current_entries(ADAPTER, TASK) == truth(store) and "u1" in store.list_users(TASK)


def test_a_missing_index_is_rebuilt_from_the_pointers(store: AdapterStore) -> None:
    for i in range(5):
        publish(store, f"u{i}", seed=i)
    store.compact_index(ADAPTER, TASK)
    store.backend.delete(f"indexes/adapters/{TASK}/{SNAPSHOT}")
    publish(store, "u0", seed=50)
    assert store.current_entries(ADAPTER, TASK) == truth(store)  # a full scan, written back
    assert store.backend.exists(f"indexes/adapters/{TASK}/{SNAPSHOT}")
    store.backend.delete_prefix("indexes")  # a store written before the index: no marks either
    assert store.list_users(TASK) == [f"u{i}" for i in range(5)]
    assert store.current_entries(ADAPTER, TASK) == truth(store)


def test_a_compactor_that_loses_the_race_changes_nothing(store: AdapterStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        publish(store, f"u{i}", seed=i)
    store.compact_index(ADAPTER, TASK)
    publish(store, "u0", seed=9)
    monkeypatch.setattr(store.backend, "put_if", lambda key, data, tag: False)  # another compactor won
    assert store.compact_index(ADAPTER, TASK) == truth(store)
    monkeypatch.undo()
    assert len(store.backend.list(f"indexes/adapters/{TASK}/changes")) == 1  # u0's mark stays
    assert store.current_entries(ADAPTER, TASK) == truth(store)


def test_split_current_plans_from_the_index(tmp_path: Path) -> None:
    from peftu.config import LoraHParams
    from peftu.data.synthetic import generate
    from peftu.store.current import publish_adapter, split_current
    from tests.test_store import BASE, adapter_files

    spec, users, _ = generate("synth-cls", 6, seed=3)
    store, hp = AdapterStore.open(str(tmp_path / "store")), LoraHParams(r=4)
    for user in users[:4]:
        publish_adapter(store, spec, user, adapter_files(), hp, BASE, {})
    store.compact_index(ADAPTER, spec.name)
    publish_adapter(store, spec, users[0], adapter_files(), LoraHParams(r=8), BASE, {})  # other settings now
    todo, current = split_current(store, spec, users, hp, BASE)
    assert sorted(current) == sorted(u.user_id for u in users[1:4])
    assert sorted(u.user_id for u in todo) == sorted(u.user_id for u in [users[0], *users[4:]])


# ---------------------------------------------------------------- gc


def test_gc_keeps_the_newest_and_always_the_current_version(store: AdapterStore) -> None:
    versions = [publish(store, "alice", seed=i).version for i in range(5)]
    bob = [publish(store, "bob", seed=i).version for i in range(2)]
    store.backend.put(f"adapters/{TASK}/alice/LATEST", versions[0].encode())  # rolled back by hand
    removed = store.gc_versions(TASK, keep=2)
    assert removed == [f"adapters/{TASK}/alice/versions/{v}" for v in versions[1:3]]
    assert store.list_versions(TASK, "alice") == [versions[0], *versions[3:]]
    assert store.list_versions(TASK, "bob") == bob
    assert store.manifest(TASK, "alice").version == versions[0]
    assert store.gc_versions(TASK, keep=3) == []
    with pytest.raises(StoreError, match="at least 1"):
        store.gc_versions(TASK, keep=0)


def test_store_gc_command(tmp_path: Path) -> None:
    from tests.test_cli import peftu

    store = AdapterStore.open(str(tmp_path / "store"))
    versions = [publish(store, "alice", seed=i).version for i in range(3)]
    result = peftu("store", "gc", "--task", TASK, "--keep", "1", "--store", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"adapters/{TASK}/alice/versions/{versions[0]}"
    assert store.list_versions(TASK, "alice") == [versions[2]]
    assert store.backend.list(f"indexes/adapters/{TASK}/changes") == []  # compacted
    bad = peftu("store", "gc", "--task", TASK, "--keep", "0", "--store", str(tmp_path / "store"))
    assert bad.returncode != 0 and "at least 1" in bad.stderr and "Traceback" not in bad.stderr
