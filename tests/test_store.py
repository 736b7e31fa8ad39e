"""The store and its kinds of artifact, on a local directory and on S3 (moto's server over HTTP on loopback)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load, save

import peftu.store.adapter_store as store_module
from peftu.errors import (
    CorruptAdapterError,
    ForeignAdapterError,
    InvalidIdError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from peftu.store import AdapterStore, LocalBackend, Manifest, S3Backend, fingerprint, open_backend, validate_id
from peftu.store.kinds import BEST, EMBEDDINGS, PLUG, QUALITY_RESULTS, RUN_SUMMARY, TASK_ADAPTER, TUNE_RESULTS

TASK = "summarize"
BASE = fingerprint({"base": "tiny-llama", "revision": "abc"})
HPARAMS = {"r": 4, "lora_alpha": 8, "lr": 1e-3, "target_modules": ["q_proj", "v_proj"]}


def adapter_files(seed: int = 0) -> dict[str, bytes]:
    """A small but real PEFT pair: safetensors weights and a JSON config, distinct per seed."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        "base_model.model.q_proj.lora_B.weight": torch.full((16, 4), float(seed)),
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "seed": seed}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


def publish(store: AdapterStore, user: str = "alice", seed: int = 0, *, task: str = TASK,
            base: str = BASE) -> Manifest:
    return store.publish(task, user, adapter_files(seed), base_fingerprint=base,
                         data_fingerprint=fingerprint({"user": user, "seed": seed}), hparams=HPARAMS,
                         metrics={"val_loss": 0.25 + seed})


def version_key(task: str, user: str, version: str, name: str) -> str:
    return f"adapters/{task}/{user}/versions/{version}/{name}"


def leftover_temp_files(root: Path) -> list[str]:
    """Temp files of writes that failed (a pointer's lock file is no temp file: it stays with the pointer)."""
    return [name for _, _, names in os.walk(root) for name in names
            if name.startswith(".peftu-tmp-") and not name.startswith(".peftu-tmp-lock-")]


@pytest.fixture
def local_store(tmp_path: Path) -> AdapterStore:
    return AdapterStore.open(str(tmp_path / "store"))


# ---------------------------------------------------------------- ids

HOSTILE_IDS = ["..", ".", "a/b", "a\\b", "x\x00y", "\x1b[31m", "a\u202eb", "a\u200bb", "a\u2028b",
               " x", "x ", "\tx", "é" * 150, "", "x\ud800"]


@pytest.mark.parametrize("value", ["alice", "josé", "用户1", "user-1.a_b", "A" * 255, "é" * 127])
def test_validate_id_accepts_plain_names(value: str) -> None:
    assert validate_id(value) == value


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_validate_id_refuses_unsafe_names(value: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id(value, "task name")
    message = str(info.value)
    assert "task name" in message
    assert repr(value)[:40] in message
    assert len(message) < 300  # a 300-byte id is shown cut short
    assert "\x1b" not in message and "\x00" not in message


def test_validate_id_refuses_non_strings() -> None:
    with pytest.raises(InvalidIdError, match="user id must be a string, got int 7"):
        validate_id(7)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_ids_refused_by_publish_and_fetch(local_store: AdapterStore, value: str) -> None:
    publish(local_store, "alice")
    for call in (lambda: publish(local_store, value),
                 lambda: publish(local_store, "alice", task=value),
                 lambda: local_store.fetch(TASK, value),
                 lambda: local_store.fetch(value, "alice"),
                 lambda: local_store.fetch(TASK, "alice", version=value),
                 lambda: local_store.delete_user(TASK, value)):
        with pytest.raises(InvalidIdError) as info:
            call()
        assert repr(value)[:40] in str(info.value)
    assert local_store.list_users(TASK) == ["alice"]
    assert local_store.list_tasks() == [TASK]


# ---------------------------------------------------------------- publish and fetch

def test_publish_fetch_roundtrip(store: AdapterStore, tmp_path: Path) -> None:
    files = adapter_files(3)
    m = publish(store, "josé", seed=3)

    assert store.latest_version(TASK, "josé") == m.version
    assert store.list_versions(TASK, "josé") == [m.version]
    assert store.list_users(TASK) == ["josé"]
    assert store.list_tasks() == [TASK]
    assert store.has_adapter(TASK, "josé") and not store.has_adapter(TASK, "bob")
    assert store.latest_version(TASK, "bob") is None

    read = store.manifest(TASK, "josé")
    assert read == m
    assert (read.task, read.user_id, read.base_fingerprint) == (TASK, "josé", BASE)
    assert read.hparams == HPARAMS and read.hparams_fingerprint == fingerprint(HPARAMS)
    assert read.metrics == {"val_loss": 3.25}
    assert read.files == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    created = datetime.fromisoformat(read.created_at)
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=5)

    out, fetched = store.fetch(TASK, "josé", dest=tmp_path / "out", expect_base=BASE)
    assert out == tmp_path / "out" and fetched == m
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    weights = load((out / "adapter_model.safetensors").read_bytes())
    assert torch.equal(weights["base_model.model.q_proj.lora_B.weight"], torch.full((16, 4), 3.0))
    assert json.loads((out / "adapter_config.json").read_text())["seed"] == 3

    tmp_out, _ = store.fetch(TASK, "josé")  # no dest: a new temp dir
    try:
        assert (tmp_out / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    finally:
        for p in tmp_out.iterdir():
            p.unlink()
        tmp_out.rmdir()


def test_extra_files_and_nan_metrics_roundtrip(local_store: AdapterStore, tmp_path: Path) -> None:
    files = adapter_files() | {"tokenizer_config.json": b'{"a": 1}', "extra.safetensors": save({})}
    m = local_store.publish(TASK, "alice", files, base_fingerprint=BASE, data_fingerprint="d",
                            hparams={}, metrics={"val_loss": float("nan")}, extra={"note": "x"})
    read = local_store.manifest(TASK, "alice")
    assert math.isnan(read.metrics["val_loss"]) and read.extra == {"note": "x"}
    out, _ = local_store.fetch(TASK, "alice", m.version, dest=tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_two_versions_latest_is_newest_and_older_still_fetches(store: AdapterStore, tmp_path: Path) -> None:
    v1 = publish(store, "alice", seed=1).version
    v2 = publish(store, "alice", seed=2).version
    assert v1 < v2
    assert store.latest_version(TASK, "alice") == v2
    assert store.list_versions(TASK, "alice") == [v1, v2]
    assert store.manifest(TASK, "alice").version == v2
    out, m = store.fetch(TASK, "alice", v1, dest=tmp_path / "v1")
    assert m.version == v1
    assert (out / "adapter_model.safetensors").read_bytes() == adapter_files(1)["adapter_model.safetensors"]
    with pytest.raises(NotFoundError, match="alice") as info:
        store.fetch(TASK, "alice", "00000000000000000000-deadbeef")
    assert "00000000000000000000-deadbeef" in str(info.value) and TASK in str(info.value)


def test_pointer_never_moves_back(local_store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    newer = publish(local_store, "alice", seed=1).version
    monkeypatch.setattr(store_module, "_new_version", lambda: "00000000000000000001-aaaaaaaa")
    older = publish(local_store, "alice", seed=2).version
    assert older == "00000000000000000001-aaaaaaaa"
    assert local_store.latest_version(TASK, "alice") == newer
    assert local_store.list_versions(TASK, "alice") == [older, newer]


def test_concurrent_publishers_of_one_user(store: AdapterStore, tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        manifests = list(pool.map(lambda seed: publish(store, "alice", seed=seed), range(8)))
    versions = {m.version: m for m in manifests}
    assert len(versions) == 8
    assert store.list_versions(TASK, "alice") == sorted(versions)
    assert store.latest_version(TASK, "alice") in versions
    for seed, m in enumerate(manifests):
        out, fetched = store.fetch(TASK, "alice", m.version, dest=tmp_path / m.version, expect_base=BASE)
        assert fetched == m
        assert (out / "adapter_model.safetensors").read_bytes() == adapter_files(seed)["adapter_model.safetensors"]


def test_published_files_are_verified(store: AdapterStore, tmp_path: Path) -> None:
    m = publish(store, "alice")
    key = version_key(TASK, "alice", m.version, "adapter_model.safetensors")
    good = store.backend.get(key)
    store.backend.put(key, good[:-1] + bytes([good[-1] ^ 1]))
    dest = tmp_path / "out"
    with pytest.raises(CorruptAdapterError) as info:
        store.fetch(TASK, "alice", dest=dest)
    assert "adapter_model.safetensors" in str(info.value) and "'alice'" in str(info.value)
    assert not (dest / "adapter_model.safetensors").exists()

    store.backend.delete(key)
    with pytest.raises(CorruptAdapterError, match="missing"):
        store.fetch(TASK, "alice", dest=dest)


def test_fetch_into_new_temp_dir_leaves_nothing_when_corrupt(local_store: AdapterStore,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    m = publish(local_store, "alice")
    local_store.backend.put(version_key(TASK, "alice", m.version, "adapter_model.safetensors"), b"junk")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with pytest.raises(CorruptAdapterError):
        local_store.fetch(TASK, "alice")
    assert list(scratch.iterdir()) == []


def test_foreign_base_refused(store: AdapterStore) -> None:
    publish(store, "alice")
    other = fingerprint({"base": "another-model"})
    with pytest.raises(ForeignAdapterError) as info:
        store.fetch(TASK, "alice", expect_base=other)
    message = str(info.value)
    assert BASE[:12] in message and other[:12] in message and "'alice'" in message


# ---------------------------------------------------------------- crashes and failures

def test_failure_before_pointer_keeps_previous_version(store: AdapterStore, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    v1 = publish(store, "alice", seed=1).version
    real_put, real_put_if = store.backend.put, store.backend.put_if

    def failing_on(suffix: str) -> None:
        """Plain and conditional writes of keys ending in `suffix` fail."""
        def check(key: str) -> None:
            if key.endswith(suffix):
                raise StoreUnavailableError(f"simulated failure writing {key}")
        monkeypatch.setattr(store.backend, "put", lambda key, data: check(key) or real_put(key, data))
        monkeypatch.setattr(store.backend, "put_if", lambda key, data, tag: check(key) or real_put_if(key, data, tag))

    # Manifest write fails: the partial version is removed, readers stay on v1.
    failing_on("/manifest.json")
    with pytest.raises(StoreUnavailableError, match="simulated"):
        publish(store, "alice", seed=2)
    assert store.latest_version(TASK, "alice") == v1
    assert store.list_versions(TASK, "alice") == [v1]
    assert {k.split("/")[4] for k in store.backend.list(f"adapters/{TASK}/alice/versions")} == {v1}

    # Pointer write fails: the complete new version stays, but v1 is still the latest.
    failing_on("/LATEST")
    with pytest.raises(StoreUnavailableError, match="simulated"):
        publish(store, "alice", seed=3)
    failing_on("/no-such-key")
    assert store.latest_version(TASK, "alice") == v1
    out, m = store.fetch(TASK, "alice", dest=tmp_path / "out", expect_base=BASE)
    assert m.version == v1
    assert (out / "adapter_model.safetensors").read_bytes() == adapter_files(1)["adapter_model.safetensors"]


def test_crash_after_files_before_pointer(store: AdapterStore, tmp_path: Path) -> None:
    v1 = publish(store, "alice", seed=1).version
    # A publisher that died after its files and manifest: written by hand, no pointer.
    crashed = "99999999999999999999-00000000"
    files = adapter_files(2)
    for name, data in files.items():
        store.backend.put(version_key(TASK, "alice", crashed, name), data)
    manifest = store.manifest(TASK, "alice").model_copy(update={
        "version": crashed, "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}})
    store.backend.put(version_key(TASK, "alice", crashed, "manifest.json"), manifest.model_dump_json().encode())

    assert store.latest_version(TASK, "alice") == v1
    _, m = store.fetch(TASK, "alice", dest=tmp_path / "out")
    assert m.version == v1


def test_sweep_removes_only_what_killed_publishers_left(store: AdapterStore, tmp_path: Path) -> None:
    v1 = publish(store, "alice", seed=1).version
    publish(store, "bob", seed=1)
    # Publishers killed after writing files but before the manifest: one of alice, one of bob.
    half = {user: f"{time.time_ns():020d}-0000000{i}" for i, user in enumerate(["alice", "bob"])}
    for user, version in half.items():
        store.backend.put(version_key(TASK, user, version, "adapter_model.safetensors"), b"half")
    cut = time.time_ns()
    later = f"{cut + 10**12:020d}-00000009"  # a publisher still writing: started after the cut
    store.backend.put(version_key(TASK, "alice", later, "adapter_config.json"), b"{}")

    assert store.sweep_partial(TASK, ["alice"], before_ns=cut) == [
        f"adapters/{TASK}/alice/versions/{half['alice']}"]
    alice = {k.split("/")[4] for k in store.backend.list(f"adapters/{TASK}/alice/versions")}
    assert alice == {v1, later}  # the complete version and the one still being written stay
    assert store.latest_version(TASK, "alice") == v1
    assert store.fetch_bytes(TASK, "alice")[1].version == v1
    assert store.sweep_partial(TASK, before_ns=cut) == [f"adapters/{TASK}/bob/versions/{half['bob']}"]
    assert store.sweep_partial(TASK, before_ns=cut) == []


def test_publish_whose_files_were_swept_is_not_pointed_at(store: AdapterStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone sweeps a slow publisher's version as partial: its publish fails, the pointer stays."""
    v1 = publish(store, "alice", seed=1).version
    real_put_if = store.backend.put_if

    def put_if(key: str, data: bytes, tag: str | None) -> bool:
        if key.endswith("/manifest.json") and "/alice/" in key:
            store.sweep_partial(TASK, ["alice"], before_ns=time.time_ns())
        return real_put_if(key, data, tag)

    monkeypatch.setattr(store.backend, "put_if", put_if)
    with pytest.raises(StoreError, match="vanished while publishing"):
        publish(store, "alice", seed=2)
    monkeypatch.setattr(store.backend, "put_if", real_put_if)
    assert store.latest_version(TASK, "alice") == v1
    assert store.list_versions(TASK, "alice") == [v1]


def test_local_full_disk(local_store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = publish(local_store, "alice").version

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StoreUnavailableError) as info:
        publish(local_store, "alice", seed=2)
    with pytest.raises(StoreUnavailableError, match="No space left on device") as direct:
        local_store.backend.put("records/x", b"data")  # no publish cleanup to hide a stray temp file
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device" in message and "adapter_config.json" in message
    root = local_store.backend.root
    assert str(root / "records" / "x") in str(direct.value)
    assert leftover_temp_files(root) == []
    assert not (root / "records" / "x").exists()
    assert local_store.latest_version(TASK, "alice") == v1
    assert local_store.list_versions(TASK, "alice") == [v1]


def test_local_read_only_directory(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        try:
            (root / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip("chmod does not stop this user (root) from writing")
        store = AdapterStore.open(str(root))
        with pytest.raises(StoreUnavailableError) as info:
            publish(store, "alice")
        assert str(root) in str(info.value) and "Permission denied" in str(info.value)
        assert leftover_temp_files(root) == []
    finally:
        root.chmod(0o755)


def test_s3_endpoint_down(s3_fake_credentials: None, free_tcp_port: int) -> None:
    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    backend = S3Backend("peftu-nowhere", "p", endpoint_url=endpoint, max_attempts=3,
                        connect_timeout=0.5, read_timeout=1.0)
    assert backend.describe() == f"s3://peftu-nowhere/p at {endpoint}"
    with pytest.raises(StoreUnavailableError) as info:
        AdapterStore(backend).latest_version(TASK, "alice")
    message = str(info.value)
    assert endpoint in message and "after 3 attempts" in message and "LATEST" in message


def test_s3_endpoint_goes_down_and_comes_back(s3_fake_credentials: None, free_tcp_port: int,
                                              tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_tcp_port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="peftu-flaky")
    store = AdapterStore(S3Backend("peftu-flaky", endpoint_url=endpoint, max_attempts=2,
                                   connect_timeout=0.5, read_timeout=2.0))
    v1 = publish(store, "alice", seed=1).version
    server.stop()

    with pytest.raises(StoreUnavailableError) as info:
        publish(store, "alice", seed=2)
    assert endpoint in str(info.value)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_tcp_port, verbose=False)
    server.start()  # moto keeps its buckets in-process, so the data is still there
    try:
        assert store.latest_version(TASK, "alice") == v1
        assert store.list_versions(TASK, "alice") == [v1]
        out, m = store.fetch(TASK, "alice", dest=tmp_path / "out", expect_base=BASE)
        assert m.version == v1
        assert (out / "adapter_model.safetensors").read_bytes() == adapter_files(1)["adapter_model.safetensors"]
    finally:
        server.stop()


def test_s3_listing_paginates(s3_store_uri: str, s3_server: str) -> None:
    backend = AdapterStore.open(s3_store_uri, endpoint_url=s3_server).backend
    keys = [f"many/{i:05d}" for i in range(1005)]  # more than one ListObjectsV2 page (1000)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda k: backend.put(k, b""), keys))
    assert backend.list("many") == keys
    backend.delete_prefix("many")
    assert backend.list("") == []


def test_s3_missing_bucket_is_a_store_error(s3_server: str, s3_fake_credentials: None) -> None:
    backend = S3Backend("peftu-no-such-bucket", endpoint_url=s3_server)
    for call in (lambda: backend.get("x"), lambda: backend.list(""), lambda: backend.put("x", b"1")):
        with pytest.raises(StoreError, match="peftu-no-such-bucket") as info:
            call()
        assert not isinstance(info.value, (NotFoundError, StoreUnavailableError))


def test_s3_endpoint_from_environment(s3_store_uri: str, s3_server: str, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    store = AdapterStore.open(s3_store_uri)
    assert store.backend.describe() == f"{s3_store_uri} at {s3_server}"
    m = publish(store, "alice")
    assert store.fetch(TASK, "alice", dest=tmp_path / "out")[1] == m


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", ["adapter_model.bin", "../x.json", "model.pt", "weights.pkl", "a/b.json",
                                  ".hidden.json", "manifest.json", "x.json\x00", "README.md"])
def test_disallowed_file_names_refused(local_store: AdapterStore, name: str) -> None:
    files = adapter_files() | {name: b"{}"}
    with pytest.raises(StoreError, match="refused") as info:
        local_store.publish(TASK, "alice", files, base_fingerprint=BASE, data_fingerprint="d", hparams={})
    assert repr(name) in str(info.value)
    assert local_store.backend.list("") == []


def test_incomplete_or_malformed_adapter_refused(local_store: AdapterStore) -> None:
    def attempt(files: dict[str, bytes]) -> None:
        local_store.publish(TASK, "alice", files, base_fingerprint=BASE, data_fingerprint="d", hparams={})

    with pytest.raises(StoreError, match="adapter_model.safetensors is missing"):
        attempt({"adapter_config.json": b"{}"})
    with pytest.raises(StoreError, match="adapter_config.json must hold a JSON object"):
        attempt(adapter_files() | {"adapter_config.json": b"[1, 2]"})
    with pytest.raises(StoreError, match="adapter_config.json is not valid JSON"):
        attempt(adapter_files() | {"adapter_config.json": b"{not json"})
    with pytest.raises(StoreError, match="metrics"):
        local_store.publish(TASK, "alice", adapter_files(), base_fingerprint=BASE, data_fingerprint="d",
                            hparams={}, metrics={"accuracy": "high"})  # type: ignore[dict-item]
    assert local_store.backend.list("") == []


@pytest.mark.parametrize("forged", [
    {"files": {"adapter_config.json": "0" * 64, "adapter_model.safetensors": "0" * 64,
               "../../etc/passwd": "0" * 64}},
    {"user_id": "mallory"},
    {"files": {"adapter_config.json": "0" * 64}},
    {"files": {"adapter_config.json": "0" * 64, "adapter_model.safetensors": "../../x"}},
    {"kind": "task-adapter"},
    {"name": "best"},
    {"base_fingerprint": None},
])
def test_forged_manifest_refused(store: AdapterStore, tmp_path: Path, forged: dict) -> None:
    m = publish(store, "alice")
    key = version_key(TASK, "alice", m.version, "manifest.json")
    store.backend.put(key, json.dumps(m.model_dump() | forged).encode())
    dest = tmp_path / "out" / "inner"
    with pytest.raises(CorruptAdapterError, match="manifest"):
        store.fetch(TASK, "alice", dest=dest)
    assert not (tmp_path / "etc").exists() and not dest.exists()


def test_unreadable_manifest_and_pointer(local_store: AdapterStore) -> None:
    m = publish(local_store, "alice")
    local_store.backend.put(f"adapters/{TASK}/alice/LATEST", b"../../x")
    with pytest.raises(CorruptAdapterError, match="LATEST"):
        local_store.latest_version(TASK, "alice")
    local_store.backend.put(f"adapters/{TASK}/alice/LATEST", m.version.encode())
    local_store.backend.put(version_key(TASK, "alice", m.version, "manifest.json"), b'{"task": 1}')
    with pytest.raises(CorruptAdapterError, match="manifest"):
        local_store.manifest(TASK, "alice")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "a//b", "/a", "a/./b", ".", ""])
def test_backend_refuses_escaping_keys(store: AdapterStore, key: str) -> None:
    backend = store.backend
    for call in (lambda: backend.put(key, b"x"), lambda: backend.get(key), lambda: backend.delete(key)):
        with pytest.raises(StoreError, match="invalid store key"):
            call()


# ---------------------------------------------------------------- backends, deletion

def test_backend_basics(store: AdapterStore, tmp_path: Path) -> None:
    b = store.backend
    for key in ("a/b/c", "a/bc", "a/b/d/e", "z"):
        b.put(key, key.encode())
    assert b.list("") == ["a/b/c", "a/b/d/e", "a/bc", "z"]
    assert b.list("a/b") == ["a/b/c", "a/b/d/e"] == b.list("a/b/")
    assert b.list("nothing") == []
    assert b.get("a/b/d/e") == b"a/b/d/e"
    assert b.exists("a/bc") and not b.exists("a/b") and not b.exists("missing")
    with pytest.raises(NotFoundError, match="missing/key"):
        b.get("missing/key")
    with pytest.raises(NotFoundError, match="missing/key"):
        b.get_file("missing/key", tmp_path / "never")
    b.delete("a/bc")
    b.delete("a/bc")  # already gone: fine
    b.delete_prefix("a/b")
    b.delete_prefix("z")  # an object, not a "directory": nothing under it
    assert b.list("") == ["z"]
    with pytest.raises(StoreError, match="refusing to delete everything"):
        b.delete_prefix("")

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    b.put_file("files/big", big)
    b.get_file("files/big", tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == big.read_bytes()


def test_delete_user(store: AdapterStore) -> None:
    publish(store, "alice", seed=1)
    publish(store, "alice", seed=2)
    bob = publish(store, "bob").version
    assert store.delete_user(TASK, "alice") == 2
    assert not store.has_adapter(TASK, "alice")
    assert store.list_versions(TASK, "alice") == []
    assert store.backend.list(f"adapters/{TASK}/alice") == []
    assert store.list_users(TASK) == ["bob"]
    assert store.latest_version(TASK, "bob") == bob
    with pytest.raises(NotFoundError, match="alice"):
        store.delete_user(TASK, "alice")
    with pytest.raises(NotFoundError, match="alice"):
        store.manifest(TASK, "alice")
    if isinstance(store.backend, LocalBackend):
        assert not (store.backend.root / "adapters" / TASK / "alice").exists()


def test_deleting_a_users_data_leaves_nothing_of_theirs_and_everything_of_others(store: AdapterStore) -> None:
    from peftu.store.kinds import NEIGHBORS, SELECTION
    from peftu.store.users import delete_user_data

    for user in ("alice", "bob"):
        publish(store, user)
        store.publish_artifact(NEIGHBORS.of(TASK, user), {"neighbors.json": b'{"labels": []}',
                                                          "neighbors.safetensors": save({"vectors": torch.ones(1)})},
                               encoder_fingerprint="e", data_fingerprint="d")
    entry = {"method": "profile+adapter", "val": {}, "profile": "User profile: words of theirs."}
    store.put_record(SELECTION.of(TASK), {"task": TASK, "users": {"alice": entry}})  # an older version
    store.put_record(SELECTION.of(TASK), {"task": TASK, "strength": 8.0, "users": {"alice": entry, "bob": entry}})
    assert delete_user_data(store, TASK, "alice") == 1
    assert not store.has_adapter(TASK, "alice") and store.latest_artifact(NEIGHBORS.of(TASK, "alice")) is None
    [kept] = store.artifact_versions(SELECTION.of(TASK))  # no older version names her
    assert store.get_record(SELECTION.of(TASK)) == {"task": TASK, "strength": 8.0, "users": {"bob": entry}}
    assert store.has_adapter(TASK, "bob") and store.latest_artifact(NEIGHBORS.of(TASK, "bob")) is not None
    store.delete_artifact(SELECTION.of(TASK))
    assert delete_user_data(store, TASK, "bob") == 1  # no selection record: nothing else to forget
    with pytest.raises(NotFoundError, match="alice"):
        delete_user_data(store, TASK, "alice")


def test_delete_user_unpublishes_first(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(store, "alice")

    def unreachable(prefix: str) -> None:
        raise StoreUnavailableError(f"simulated failure deleting {prefix}")

    monkeypatch.setattr(store.backend, "delete_prefix", unreachable)
    with pytest.raises(StoreUnavailableError, match="simulated"):
        store.delete_user(TASK, "alice")
    assert not store.has_adapter(TASK, "alice")
    assert store.list_users(TASK) == []


# ---------------------------------------------------------------- the other kinds

def plug_files() -> dict[str, bytes]:
    return {"plug.json": b'{"enc_dim": 4}', "plug.safetensors": save({"w": torch.ones(2)})}


def test_every_kind_has_its_own_folder_files_and_pointer(store: AdapterStore, tmp_path: Path) -> None:
    user = publish(store, "alice")
    task = store.publish_artifact(TASK_ADAPTER.of(TASK), adapter_files(1), base_fingerprint=BASE,
                                  data_fingerprint="d", hparams=HPARAMS)
    plug = store.publish_artifact(PLUG.of(TASK), plug_files(), base_fingerprint=BASE, encoder_fingerprint="e",
                                  data_fingerprint="d", hparams={"lr": 1e-3})
    emb = store.publish_artifact(EMBEDDINGS.of(TASK, "alice"), {
        "embeddings.json": b'{"ids": ["h1"]}', "embeddings.safetensors": save({"vectors": torch.ones(1, 4)})},
        encoder_fingerprint="e", data_fingerprint="h")
    best = store.put_record(TUNE_RESULTS.of(TASK, BEST), {"best": {"all": {"r": 4}}})
    keys = set(store.backend.list(""))
    for prefix, m in ((f"adapters/{TASK}/alice", user), (f"task-adapters/{TASK}", task),
                      (f"pplug/plugs/{TASK}", plug), (f"pplug/embeddings/{TASK}/alice", emb),
                      (f"records/tune/{TASK}/best", best)):
        assert {f"{prefix}/LATEST", f"{prefix}/versions/{m.version}/manifest.json"} <= keys, prefix
        assert {f"{prefix}/versions/{m.version}/{name}" for name in m.files} <= keys, prefix
    # A user's adapter is where it always was, its manifest as it was plus its kind.
    raw = json.loads(store.backend.get(version_key(TASK, "alice", user.version, "manifest.json")))
    assert set(raw) == {"kind", "task", "user_id", "version", "created_at", "base_fingerprint",
                        "data_fingerprint", "hparams", "hparams_fingerprint", "metrics", "files", "extra"}
    assert raw["kind"] == "adapter"
    # Only real users' adapters are users: the task adapter is none of them.
    assert store.list_users(TASK) == ["alice"] and store.list_tasks() == [TASK]
    assert store.artifact_owners(EMBEDDINGS, TASK) == ["alice"]
    folder, read = store.fetch_artifact(TASK_ADAPTER.of(TASK), dest=tmp_path / "task", expect_base=BASE)
    assert read == task and (folder / "adapter_model.safetensors").read_bytes() == \
        adapter_files(1)["adapter_model.safetensors"]
    files, read = store.fetch_artifact_bytes(PLUG.of(TASK), expect_base=BASE, expect_encoder="e")
    assert read == plug and files == plug_files()
    with pytest.raises(ForeignAdapterError, match="history encoder"):
        store.fetch_artifact_bytes(EMBEDDINGS.of(TASK, "alice"), expect_encoder="another")
    assert store.get_record(TUNE_RESULTS.of(TASK, BEST)) == {"best": {"all": {"r": 4}}}


def test_a_kind_needs_its_files_and_fields(local_store: AdapterStore) -> None:
    with pytest.raises(StoreError, match="plug.safetensors is missing"):
        local_store.publish_artifact(PLUG.of(TASK), {"plug.json": b"{}"}, base_fingerprint=BASE,
                                     encoder_fingerprint="e", data_fingerprint="d", hparams={})
    with pytest.raises(StoreError, match="needs encoder_fingerprint"):
        local_store.publish_artifact(PLUG.of(TASK), plug_files(), base_fingerprint=BASE, data_fingerprint="d",
                                     hparams={})
    with pytest.raises(StoreError, match="plug.json must hold a JSON object"):
        local_store.publish_artifact(PLUG.of(TASK), plug_files() | {"plug.json": b"[]"}, base_fingerprint=BASE,
                                     encoder_fingerprint="e", data_fingerprint="d", hparams={})
    with pytest.raises(StoreError, match="is not a record"):
        local_store.put_record(PLUG.of(TASK), {})
    with pytest.raises(StoreError, match="record.json must hold a JSON object"):
        local_store.put_record(RUN_SUMMARY.of(TASK, "run-1"), [1, 2])  # type: ignore[arg-type]
    assert local_store.backend.list("") == []


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_refs_check_their_ids(value: str) -> None:
    with pytest.raises(InvalidIdError, match="record name"):
        QUALITY_RESULTS.of(TASK, value)
    with pytest.raises(InvalidIdError, match="task name"):
        TASK_ADAPTER.of(value)


def test_a_ref_has_an_owner_exactly_where_its_kind_does() -> None:
    with pytest.raises(ValueError, match="belongs to a task"):
        TASK_ADAPTER.of(TASK, "alice")
    with pytest.raises(InvalidIdError, match="user id"):
        EMBEDDINGS.of(TASK)
    assert str(RUN_SUMMARY.of(TASK, "r1")) == f"run summary 'r1' of task {TASK!r}"


def test_records_are_versioned_and_verified(store: AdapterStore) -> None:
    ref = RUN_SUMMARY.of(TASK, "run-1")
    with pytest.raises(NotFoundError, match="run summary 'run-1'"):
        store.get_record(ref)
    record = {"users": ["alice", "josé"], "mean": 0.5, "nested": {"k": [1, 2]}}
    first = store.put_record(ref, record)
    second = store.put_record(ref, record | {"mean": 0.75})
    assert store.get_record(ref)["mean"] == 0.75
    assert store.artifact_versions(ref) == [first.version, second.version]
    assert store.artifact_manifest(ref).name == "run-1" and store.artifact_manifest(ref).user_id is None
    key = f"records/runs/{TASK}/run-1/versions/{second.version}/record.json"
    store.backend.put(key, store.backend.get(key).replace(b"0.75", b"0.99"))
    with pytest.raises(CorruptAdapterError, match="record.json of the run summary 'run-1'"):
        store.get_record(ref)
    with pytest.raises(CorruptAdapterError, match="claims"):  # another record's manifest is not this one's
        store.backend.put(f"records/runs/{TASK}/run-2/versions/{first.version}/manifest.json",
                          store.backend.get(f"records/runs/{TASK}/run-1/versions/{first.version}/manifest.json"))
        store.artifact_manifest(RUN_SUMMARY.of(TASK, "run-2"), first.version)


def test_sweep_reaches_every_kind(store: AdapterStore) -> None:
    task = store.publish_artifact(TASK_ADAPTER.of(TASK), adapter_files(), base_fingerprint=BASE,
                                  data_fingerprint="d", hparams={}).version
    half = f"{time.time_ns():020d}-00000001"
    store.backend.put(f"task-adapters/{TASK}/versions/{half}/adapter_config.json", b"{}")
    cut = time.time_ns()
    assert store.sweep_partial(TASK, before_ns=cut) == []  # users' adapters only
    assert store.sweep_partial(TASK, before_ns=cut, kind=TASK_ADAPTER) == [f"task-adapters/{TASK}/versions/{half}"]
    assert store.artifact_versions(TASK_ADAPTER.of(TASK)) == [task]
    assert store.latest_artifact(TASK_ADAPTER.of(TASK)) == task


def test_open_backend(tmp_path: Path, s3_fake_credentials: None) -> None:
    local = open_backend(f"file://{tmp_path}/via-uri")
    assert isinstance(local, LocalBackend) and (tmp_path / "via-uri").is_dir()
    plain = open_backend(str(tmp_path / "plain" / "deeper"))
    assert isinstance(plain, LocalBackend) and plain.describe() == str(tmp_path / "plain" / "deeper")
    s3 = open_backend("s3://some-bucket/a/b", endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Backend) and (s3.bucket, s3.prefix) == ("some-bucket", "a/b")
    assert s3.describe() == "s3://some-bucket/a/b at http://127.0.0.1:9"
    for uri in ("gs://bucket/x", "s3:///x", "file://otherhost/x"):
        with pytest.raises(StoreError, match="URI"):
            open_backend(uri)


def test_fingerprint_is_canonical() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()
