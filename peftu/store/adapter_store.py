"""The adapter store: per-user LoRA adapters kept in a directory or an S3 bucket.

Layout (keys relative to the backend root, "/"-separated)::

    adapters/<task>/<user_id>/versions/<version>/adapter_config.json
    adapters/<task>/<user_id>/versions/<version>/adapter_model.safetensors
    adapters/<task>/<user_id>/versions/<version>/manifest.json
    adapters/<task>/<user_id>/LATEST          (content: the latest version string)
    records/<key>                              (JSON records: run summaries, tuning results)

Publish protocol. Each publish gets its own version directory, named
`<time_ns, 20 digits>-<8 hex>` so versions sort by time and two publishers never
share one. It writes the adapter files, then `manifest.json` (the sha256 of every
file), then the `LATEST` pointer, in that order, each object written atomically.
A version therefore counts as existing only once its manifest is there, and as
published only once the pointer names it: a crash or an unreachable store before
the pointer leaves readers on the previous version, and the partial version is
deleted where the store still allows it. A publisher killed mid-write cannot
clean up after itself: `sweep_partial` removes such manifest-less versions once
no publisher can still be writing them (the fit job sweeps its users when its
workers are done). A failed pointer write deletes
nothing: the write may have landed, and the version it names is complete.
The pointer only moves forward: a
publisher that finds it already naming a newer version leaves it alone. That
check is a read then a write (S3 offers no portable compare-and-swap), so two
publishers racing on one user can, rarely, leave the pointer on the older of two
complete versions; it never names an incomplete one.

Readers trust nothing they read: ids are checked before they become keys, manifest
file names are checked before they become paths, and every downloaded file must
match its manifest's sha256 before it is handed out. Only `.json` and
`.safetensors` files are stored, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from peftu.errors import (
    CorruptAdapterError,
    ForeignAdapterError,
    InvalidIdError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from peftu.store.backends import Backend, open_backend
from peftu.store.ids import MANIFEST, POINTER, REQUIRED_FILES, _file_name_problem, _show, validate_id
from peftu.store.manifest import (
    Manifest,
    _file_error,
    _new_version,
    _sha256_file,
    _short,
    fingerprint,
    version_started_ns,
)


class AdapterStore:
    """Publishes, lists, verifies and fetches per-user adapters on a Backend."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def open(cls, uri: str, *, endpoint_url: str | None = None) -> AdapterStore:
        return cls(open_backend(uri, endpoint_url=endpoint_url))

    def __repr__(self) -> str:
        return f"AdapterStore({self.backend.describe()})"

    # keys

    @staticmethod
    def _task_key(task: str) -> str:
        return f"adapters/{validate_id(task, 'task name')}"

    def _user_key(self, task: str, user_id: str) -> str:
        return f"{self._task_key(task)}/{validate_id(user_id, 'user id')}"

    def _version_key(self, task: str, user_id: str, version: str) -> str:
        return f"{self._user_key(task, user_id)}/versions/{validate_id(version, 'version')}"

    # publishing

    def publish(self, task: str, user_id: str, files: dict[str, bytes], *, base_fingerprint: str,
                data_fingerprint: str, hparams: dict, metrics: dict | None = None,
                extra: dict | None = None) -> Manifest:
        """Store a new version of a user's adapter and make it the latest (see module docs)."""
        user_key = self._user_key(task, user_id)
        _check_publish_files(files, task, user_id)
        version = _new_version()
        try:
            manifest = Manifest(
                task=task, user_id=user_id, version=version,
                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                base_fingerprint=base_fingerprint, data_fingerprint=data_fingerprint,
                hparams=hparams, hparams_fingerprint=fingerprint(hparams), metrics=metrics or {},
                files={name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
                extra=extra or {},
            )
        except ValidationError as e:
            raise StoreError(f"cannot publish the adapter of user {user_id!r} in task {task!r}: {e}") from None
        version_key = f"{user_key}/versions/{version}"
        try:
            for name, data in files.items():
                self.backend.put(f"{version_key}/{name}", data)
            self.backend.put(f"{version_key}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
            self._check_landed(version_key, files)
        except Exception:
            self._discard(version_key)
            raise
        # No cleanup if the pointer write fails: it may have landed anyway, and the
        # version it would name is complete.
        self._advance_pointer(task, user_id, version)
        return manifest

    def _check_landed(self, version_key: str, files: dict[str, bytes]) -> None:
        """Before the pointer may name a version, every file it lists must be there: a sweep
        run by someone who took this publisher for dead must not leave the pointer on a hole."""
        missing = set(files) - {key.rsplit("/", 1)[-1] for key in self.backend.list(version_key)}
        if missing:
            raise StoreError(f"{version_key}: {sorted(missing)} vanished while publishing (swept as partial?)")

    def sweep_partial(self, task: str, users: Iterable[str] | None = None, *, before_ns: int) -> list[str]:
        """Delete the versions (of `users`, default all) that have no manifest and were started
        before `before_ns` (time.time_ns()): what a publisher killed mid-write leaves. Only call it
        with a time by which every publisher of those users has finished or died. Returns the
        version keys removed."""
        task_key = self._task_key(task)
        wanted = None if users is None else {validate_id(u, "user id") for u in users}
        files: dict[str, set[str]] = {}
        for key in self.backend.list(task_key):
            parts = key[len(task_key) + 1:].split("/")
            if len(parts) == 4 and parts[1] == "versions" and (wanted is None or parts[0] in wanted):
                files.setdefault(f"{task_key}/{parts[0]}/versions/{parts[2]}", set()).add(parts[3])
        swept = []
        for version_key, names in sorted(files.items()):
            started = version_started_ns(version_key.rsplit("/", 1)[-1])
            if MANIFEST not in names and started is not None and started < before_ns:
                self.backend.delete_prefix(version_key)
                swept.append(version_key)
        return swept

    def _discard(self, version_key: str) -> None:
        """Best effort: remove an unpublished version, manifest first so it stops being listed."""
        with suppress(StoreError):
            self.backend.delete(f"{version_key}/{MANIFEST}")
            self.backend.delete_prefix(version_key)

    def _advance_pointer(self, task: str, user_id: str, version: str) -> None:
        current = self.latest_version(task, user_id)
        if current is None or current < version:
            self.backend.put(f"{self._user_key(task, user_id)}/{POINTER}", version.encode())

    # reading

    def latest_version(self, task: str, user_id: str) -> str | None:
        """The version the pointer names, or None if the user has no published adapter."""
        key = f"{self._user_key(task, user_id)}/{POINTER}"
        try:
            raw = self.backend.get(key)
        except NotFoundError:
            return None
        try:
            return validate_id(raw.decode("utf-8").strip(), "version")
        except (UnicodeDecodeError, InvalidIdError) as e:
            raise CorruptAdapterError(f"pointer {key} in {self.backend.describe()} is unreadable: {e}") from None

    def list_versions(self, task: str, user_id: str) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        versions_key = f"{self._user_key(task, user_id)}/versions"
        found = []
        for key in self.backend.list(versions_key):
            parts = key[len(versions_key) + 1:].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                found.append(parts[0])
        return sorted(found)

    def manifest(self, task: str, user_id: str, version: str | None = None) -> Manifest:
        """A version's manifest (default: the latest), checked against where it was found."""
        if version is None:
            version = self.latest_version(task, user_id)
            if version is None:
                raise NotFoundError(f"no adapter for user {user_id!r} in task {task!r} "
                                    f"in {self.backend.describe()}")
        key = f"{self._version_key(task, user_id, version)}/{MANIFEST}"
        try:
            raw = self.backend.get(key)
        except NotFoundError:
            raise NotFoundError(f"no version {version!r} of the adapter for user {user_id!r} "
                                f"in task {task!r} in {self.backend.describe()}") from None
        try:
            m = Manifest.model_validate_json(raw)
        except ValidationError as e:
            raise CorruptAdapterError(f"manifest {key} is invalid: {e}") from None
        if (m.task, m.user_id, m.version) != (task, user_id, version):
            raise CorruptAdapterError(
                f"manifest {key} claims task {m.task!r}, user {m.user_id!r}, version {m.version!r}")
        for name in REQUIRED_FILES:
            if name not in m.files:
                raise CorruptAdapterError(f"manifest {key} lists no {name}")
        for name, digest in m.files.items():
            problem = _file_name_problem(name)
            if problem:
                raise CorruptAdapterError(f"manifest {key} lists a disallowed file {_show(name)}: {problem}")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise CorruptAdapterError(f"manifest {key} gives {name} a malformed sha256 {_show(digest)}")
        return m

    def list_users(self, task: str) -> list[str]:
        """Users of `task` with a published adapter."""
        task_key = self._task_key(task)
        users = []
        for key in self.backend.list(task_key):
            parts = key[len(task_key) + 1:].split("/")
            if len(parts) == 2 and parts[1] == POINTER:
                users.append(parts[0])
        return sorted(users)

    def list_tasks(self) -> list[str]:
        """Tasks with at least one published adapter."""
        tasks = set()
        for key in self.backend.list("adapters"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == POINTER:
                tasks.add(parts[1])
        return sorted(tasks)

    def has_adapter(self, task: str, user_id: str) -> bool:
        return self.latest_version(task, user_id) is not None

    def _usable_manifest(self, task: str, user_id: str, version: str | None, expect_base: str | None) -> Manifest:
        m = self.manifest(task, user_id, version)
        if expect_base is not None and m.base_fingerprint != expect_base:
            raise ForeignAdapterError(
                f"adapter of user {user_id!r} in task {task!r} (version {m.version}) was fitted on base "
                f"{_short(m.base_fingerprint)}, not on the loaded base {_short(expect_base)}")
        return m

    def fetch_bytes(self, task: str, user_id: str, version: str | None = None, *,
                    expect_base: str | None = None) -> tuple[dict[str, bytes], Manifest]:
        """A version's files (default: the latest) in memory, each verified against its manifest.

        For servers that load adapters straight into memory: no temp files, no fsyncs.
        """
        m = self._usable_manifest(task, user_id, version, expect_base)
        version_key = self._version_key(task, user_id, m.version)
        files = {}
        for name, expected in m.files.items():
            try:
                data = self.backend.get(f"{version_key}/{name}")
            except NotFoundError:
                raise _file_error(m, name) from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise _file_error(m, name, actual)
            files[name] = data
        return files, m

    def fetch(self, task: str, user_id: str, version: str | None = None, *, dest: Path | None = None,
              expect_base: str | None = None) -> tuple[Path, Manifest]:
        """Download a version's files (default: the latest) and verify each against its manifest.

        Returns the directory holding them (`dest`, else a new temp dir) and the
        manifest. Nothing unverified is left behind: a file that fails its sha256
        is removed, and a temp dir made here is removed on any failure.
        """
        m = self._usable_manifest(task, user_id, version, expect_base)
        version_key = self._version_key(task, user_id, m.version)
        made_here = dest is None
        out = Path(tempfile.mkdtemp(prefix="peftu-adapter-")) if made_here else Path(dest)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, expected in m.files.items():
                path = out / name
                try:
                    self.backend.get_file(f"{version_key}/{name}", path)
                except NotFoundError:
                    raise _file_error(m, name) from None
                actual = _sha256_file(path)
                if actual != expected:
                    path.unlink(missing_ok=True)
                    raise _file_error(m, name, actual)
        except BaseException as e:
            if made_here:
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(e, OSError):
                raise StoreUnavailableError(f"cannot write the adapter to {out}: {e.strerror or e}") from e
            raise
        return out, m

    # deleting

    def delete_user(self, task: str, user_id: str) -> int:
        """Unpublish (pointer first), then remove every version; returns how many were removed."""
        user_key = self._user_key(task, user_id)
        keys = self.backend.list(user_key)
        if not keys:
            raise NotFoundError(f"no adapter for user {user_id!r} in task {task!r} in {self.backend.describe()}")
        versions = {parts[1] for parts in (k[len(user_key) + 1:].split("/") for k in keys)
                    if len(parts) > 2 and parts[0] == "versions"}
        self.backend.delete(f"{user_key}/{POINTER}")
        self.backend.delete_prefix(user_key)
        return len(versions)

    # other records

    @staticmethod
    def _record_key(key: str) -> str:
        if not isinstance(key, str):
            raise InvalidIdError(f"record key must be a string, got {type(key).__name__} {_show(key)}")
        return "records/" + "/".join(validate_id(part, "record key component") for part in key.split("/"))

    def put_json(self, key: str, obj: Any) -> None:
        """Store a JSON record (a run summary, tuning results) under records/<key>."""
        data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
        self.backend.put(self._record_key(key), data)

    def get_json(self, key: str) -> Any:
        record_key = self._record_key(key)
        raw = self.backend.get(record_key)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StoreError(f"record {record_key} in {self.backend.describe()} is not valid JSON: {e}") from None


def _check_publish_files(files: dict[str, bytes], task: str, user_id: str) -> None:
    """Refuse to publish anything but a well-formed PEFT adapter in safe formats."""
    whose = f"adapter of user {user_id!r} in task {task!r}"
    for name in REQUIRED_FILES:
        if name not in files:
            raise StoreError(f"cannot publish {whose}: {name} is missing")
    for name, data in files.items():
        problem = _file_name_problem(name)
        if problem:
            raise StoreError(f"cannot publish {whose}: file name {_show(name)} refused: {problem}")
        if not isinstance(data, bytes):
            raise StoreError(f"cannot publish {whose}: {name} must be bytes, got {type(data).__name__}")
    try:
        config = json.loads(files["adapter_config.json"])
    except ValueError as e:
        raise StoreError(f"cannot publish {whose}: adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise StoreError(f"cannot publish {whose}: adapter_config.json must hold a JSON object")
