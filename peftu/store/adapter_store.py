"""The store: users' adapters and the project's other artifacts, kept in a directory or an S3 bucket.

Every artifact (`kinds.Ref`: a kind, a task, and a user id or a name where the
kind has one) lives in its own folder (keys relative to the backend root,
"/"-separated; docs/store.md lists every kind)::

    <ref.key>/versions/<version>/<the kind's files>
    <ref.key>/versions/<version>/manifest.json
    <ref.key>/LATEST          (content: the latest version string)

so a user's adapter is `adapters/<task>/<user_id>/versions/<version>/adapter_config.json`
and so on, in PEFT's own format.

Publish protocol. Each publish gets its own version directory, named
`<time_ns, 20 digits>-<8 hex>` so versions sort by time and two publishers never
share one. It writes the files, then `manifest.json` (the sha256 of every
file), then the `LATEST` pointer, in that order, each object written atomically.
A version therefore counts as existing only once its manifest is there, and as
published only once the pointer names it: a crash or an unreachable store before
the pointer leaves readers on the previous version, and the partial version is
deleted where the store still allows it. A publisher killed mid-write cannot
clean up after itself: `sweep_partial` removes such manifest-less versions once
no publisher can still be writing them (the fit job sweeps its users when its
workers are done). A failed pointer write deletes
nothing: the write may have landed, and the version it names is complete.
The pointer only moves forward, by compare-and-swap
(`Backend.put_if`: S3's If-Match on the ETag read, a lock file locally): a
publisher that finds it naming a newer version leaves it alone, and one that
loses a race reads it again, so of racing publishers the newest version wins.
Manifests are written create-only (If-None-Match: *). Before a pointer of a
kind with owners moves or goes, the task's index is marked (`index`), so the
index can answer "who has what" without reading every pointer.

Readers trust nothing they read: ids are checked before they become keys, a
manifest must be the one of the artifact and version it was found for, with the
kind's files and fields, its file names are checked before they become paths,
and every downloaded file must match its manifest's sha256 before it is handed
out. Only `.json` and `.safetensors` files are stored, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
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
from peftu.store.ids import MANIFEST, POINTER, _file_name_problem, _show, validate_id
from peftu.store.index import READ_THREADS, Entry, TaskIndex
from peftu.store.kinds import ADAPTER, RECORD_FILE, Kind, Ref
from peftu.store.manifest import (
    Manifest,
    _file_error,
    _new_version,
    _sha256_file,
    _short,
    fingerprint,
    read_manifest,
    version_started_ns,
)


class AdapterStore:
    """Publishes, lists, verifies and fetches artifacts of every kind on a Backend.

    The `*_artifact` methods take any artifact's `Ref`; the others are the same
    for a user's adapter, named by task and user id (what servers and fits use).
    """

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def open(cls, uri: str, *, endpoint_url: str | None = None) -> AdapterStore:
        return cls(open_backend(uri, endpoint_url=endpoint_url))

    def __repr__(self) -> str:
        return f"AdapterStore({self.backend.describe()})"

    # publishing

    def publish_artifact(self, ref: Ref, files: dict[str, bytes], *, base_fingerprint: str | None = None,
                         encoder_fingerprint: str | None = None, data_fingerprint: str | None = None,
                         hparams: dict | None = None, metrics: dict | None = None,
                         extra: dict | None = None) -> Manifest:
        """Store a new version of `ref` and make it the latest (see module docs)."""
        _check_publish_files(ref, files)
        version = _new_version()
        try:
            manifest = Manifest(
                **ref.identity(), version=version,
                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                base_fingerprint=base_fingerprint, encoder_fingerprint=encoder_fingerprint,
                data_fingerprint=data_fingerprint, hparams=hparams,
                hparams_fingerprint=None if hparams is None else fingerprint(hparams), metrics=metrics or {},
                files={name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
                extra=extra or {},
            )
        except ValidationError as e:
            raise StoreError(f"cannot publish the {ref}: {e}") from None
        missing = [field for field in ref.kind.needs if getattr(manifest, field) is None]
        if missing:
            raise StoreError(f"cannot publish the {ref}: a {ref.kind.what} needs {', '.join(missing)}")
        version_key = f"{ref.key}/versions/{version}"
        try:
            for name, data in files.items():
                self.backend.put(f"{version_key}/{name}", data)
            if not self.backend.put_if(f"{version_key}/{MANIFEST}", manifest.to_json(), None):
                raise StoreError(f"{version_key}/{MANIFEST} exists already: another publisher took this version")
            self._check_landed(version_key, files)
            if ref.kind.owner:
                self.index(ref.kind, ref.task).mark(ref.owner, version)
        except Exception:
            self._discard(version_key)
            raise
        # No cleanup if the pointer write fails: it may have landed anyway, and the
        # version it would name is complete.
        self._advance_pointer(ref, version)
        return manifest

    def _advance_pointer(self, ref: Ref, version: str) -> None:
        """Compare-and-swap the pointer to `version` unless it names a newer one; a lost race reads again.

        Every lost race is another publisher moving the pointer forward, so this ends."""
        key = f"{ref.key}/{POINTER}"
        while True:
            now = self.backend.get_tagged(key)
            current = None if now is None else _pointer_version(now[0], key, self.backend)
            if current is not None and current >= version:
                return
            if self.backend.put_if(key, version.encode(), now[1] if now else None):
                return

    def _check_landed(self, version_key: str, files: dict[str, bytes]) -> None:
        """Before the pointer may name a version, every file it lists must be there: a sweep
        run by someone who took this publisher for dead must not leave the pointer on a hole."""
        missing = set(files) - {key.rsplit("/", 1)[-1] for key in self.backend.list(version_key)}
        if missing:
            raise StoreError(f"{version_key}: {sorted(missing)} vanished while publishing (swept as partial?)")

    def _version_files(self, kind: Kind, task: str, owners: Iterable[str] | None) -> dict[str, set[str]]:
        """Each version folder of `kind` in `task` and the file names in it: of every artifact (one
        listing of the task), or of `owners`' (one listing each, `READ_THREADS` at a time)."""
        task_key = f"{kind.root}/{validate_id(task, 'task name')}"
        if kind.owner and owners is not None:
            prefixes = [f"{task_key}/{validate_id(o, 'user id')}/versions" for o in sorted(set(owners))]
        else:
            prefixes = [task_key]
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(prefixes)))) as pool:
            listings = list(pool.map(self.backend.list, prefixes))
        depth = 4 if kind.owner else 3  # [<owner>/]versions/<version>/<file>
        files: dict[str, set[str]] = {}
        for key in (key for listing in listings for key in listing):
            parts = key[len(task_key) + 1:].split("/")
            if len(parts) == depth and parts[-3] == "versions":
                files.setdefault(key.rsplit("/", 1)[0], set()).add(parts[-1])
        return files

    def sweep_partial(self, task: str, users: Iterable[str] | None = None, *, before_ns: int,
                      kind: Kind = ADAPTER) -> list[str]:
        """Delete the versions of `kind` in `task` (of `users`, default all, where the kind is per
        user) that have no manifest and were started before `before_ns` (time.time_ns()): what a
        publisher killed mid-write leaves. Only call it with a time by which every publisher of
        those artifacts has finished or died. Returns the version keys removed."""
        swept = []
        for version_key, names in sorted(self._version_files(kind, task, users).items()):
            started = version_started_ns(version_key.rsplit("/", 1)[-1])
            if MANIFEST not in names and started is not None and started < before_ns:
                self.backend.delete_prefix(version_key)
                swept.append(version_key)
        return swept

    def gc_versions(self, task: str, *, keep: int, kind: Kind = ADAPTER) -> list[str]:
        """Keep at most `keep` complete versions of each artifact of `kind` in `task`: the newest, and
        always the one its pointer names (read after listing, so a publish meanwhile keeps its version).
        Half-written versions are `sweep_partial`'s. Returns the version keys removed."""
        if keep < 1:
            raise StoreError(f"gc must keep at least 1 version per artifact (the current one), not {keep}")
        by_artifact: dict[str, list[str]] = {}
        for version_key, names in self._version_files(kind, task, None).items():
            if MANIFEST in names:
                artifact, _, version = version_key.rpartition("/versions/")
                by_artifact.setdefault(artifact, []).append(version)
        crowded = {a: sorted(vs) for a, vs in by_artifact.items() if len(vs) > keep}

        def pointer(artifact: str) -> str | None:
            try:
                return _pointer_version(self.backend.get(f"{artifact}/{POINTER}"), artifact, self.backend)
            except NotFoundError:
                return None

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            current = dict(zip(crowded, pool.map(pointer, crowded)))
        removed = []
        for artifact, versions in sorted(crowded.items()):
            kept = set(versions[-keep:]) | {current[artifact]}
            for version in versions:
                if version not in kept:
                    self.backend.delete(f"{artifact}/versions/{version}/{MANIFEST}")  # unlisted first
                    self.backend.delete_prefix(f"{artifact}/versions/{version}")
                    removed.append(f"{artifact}/versions/{version}")
        return removed

    def _discard(self, version_key: str) -> None:
        """Best effort: remove an unpublished version, manifest first so it stops being listed."""
        with suppress(StoreError):
            self.backend.delete(f"{version_key}/{MANIFEST}")
            self.backend.delete_prefix(version_key)

    # reading

    def latest_artifact(self, ref: Ref) -> str | None:
        """The version the pointer names, or None if nothing of `ref` is published."""
        key = f"{ref.key}/{POINTER}"
        try:
            raw = self.backend.get(key)
        except NotFoundError:
            return None
        return _pointer_version(raw, key, self.backend)

    def _folders_holding(self, prefix: str, name: str) -> list[str]:
        """The folders right under `prefix` that hold an object `name`, sorted."""
        found = []
        for key in self.backend.list(prefix):
            parts = key[len(prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == name:
                found.append(parts[0])
        return sorted(found)

    def artifact_versions(self, ref: Ref) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        return self._folders_holding(f"{ref.key}/versions", MANIFEST)

    def artifact_manifest(self, ref: Ref, version: str | None = None) -> Manifest:
        """A version's manifest (default: the latest), checked against where it was found."""
        if version is None:
            version = self.latest_artifact(ref)
            if version is None:
                raise NotFoundError(f"no {ref} in {self.backend.describe()}")
        key = f"{ref.key}/versions/{validate_id(version, 'version')}/{MANIFEST}"
        try:
            raw = self.backend.get(key)
        except NotFoundError:
            raise NotFoundError(f"no version {version!r} of the {ref} in {self.backend.describe()}") from None
        return read_manifest(raw, ref, version, key)

    def artifact_owners(self, kind: Kind, task: str) -> list[str]:
        """The user ids (or names) with a published artifact of `kind` in `task` (from the index)."""
        return sorted(self.current_entries(kind, task))

    # the index: who has what, without reading every pointer

    def index(self, kind: Kind, task: str) -> TaskIndex:
        """The index of `kind`'s artifacts in `task` (a kind with owners: users, record names)."""
        if not kind.owner:
            raise StoreError(f"a {kind.what} is one per task: it has no index of owners")
        return TaskIndex(self.backend, kind, task, lambda owner: self._entry(kind.of(task, owner)),
                         lambda: self._folders_holding(f"{kind.root}/{validate_id(task, 'task name')}", POINTER))

    def _entry(self, ref: Ref) -> Entry | None:
        """What `ref`'s pointer names, read from the pointer and that version's manifest (the truth)."""
        version = self.latest_artifact(ref)
        return None if version is None else Entry.of(self.artifact_manifest(ref, version))

    def current_entries(self, kind: Kind, task: str) -> dict[str, Entry]:
        """Every owner's published version and fingerprints: the index, with marked owners read fresh."""
        return self.index(kind, task).state()

    def current_owners(self, kind: Kind, task: str, wanted: dict[str, tuple[str | None, ...]]) -> set[str]:
        """Those of `wanted` (owner -> base, data, hparams fingerprints[, encoder's]) whose published
        version was made from exactly these: one read of the index, not one per owner."""
        entries = self.current_entries(kind, task)
        return {owner for owner, fps in wanted.items() if owner in entries and entries[owner].fits(*fps)}

    def compact_index(self, kind: Kind, task: str) -> dict[str, Entry]:
        """Fold every change into the index's snapshot now; returns the entries."""
        return self.index(kind, task).compact()

    def _usable_manifest(self, ref: Ref, version: str | None, expect_base: str | None,
                         expect_encoder: str | None) -> Manifest:
        m = self.artifact_manifest(ref, version)
        for what, have, want in (("base", m.base_fingerprint, expect_base),
                                 ("history encoder", m.encoder_fingerprint, expect_encoder)):
            if want is not None and have != want:
                raise ForeignAdapterError(f"the {ref} (version {m.version}) was made for the {what} "
                                          f"{_short(have)}, not for the loaded {what} {_short(want)}")
        return m

    def fetch_artifact_bytes(self, ref: Ref, version: str | None = None, *, expect_base: str | None = None,
                             expect_encoder: str | None = None) -> tuple[dict[str, bytes], Manifest]:
        """A version's files (default: the latest) in memory, each verified against its manifest.

        For servers that load artifacts straight into memory: no temp files, no fsyncs.
        """
        m = self._usable_manifest(ref, version, expect_base, expect_encoder)
        version_key = f"{ref.key}/versions/{m.version}"
        files = {}
        for name, expected in m.files.items():
            try:
                data = self.backend.get(f"{version_key}/{name}")
            except NotFoundError:
                raise _file_error(ref, m, name) from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise _file_error(ref, m, name, actual)
            files[name] = data
        return files, m

    def fetch_artifact(self, ref: Ref, version: str | None = None, *, dest: Path | None = None,
                       expect_base: str | None = None) -> tuple[Path, Manifest]:
        """Download a version's files (default: the latest) and verify each against its manifest.

        Returns the directory holding them (`dest`, else a new temp dir) and the
        manifest. Nothing unverified is left behind: a file that fails its sha256
        is removed, and a temp dir made here is removed on any failure.
        """
        m = self._usable_manifest(ref, version, expect_base, None)
        version_key = f"{ref.key}/versions/{m.version}"
        made_here = dest is None
        out = Path(tempfile.mkdtemp(prefix="peftu-adapter-")) if made_here else Path(dest)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, expected in m.files.items():
                path = out / name
                try:
                    self.backend.get_file(f"{version_key}/{name}", path)
                except NotFoundError:
                    raise _file_error(ref, m, name) from None
                actual = _sha256_file(path)
                if actual != expected:
                    path.unlink(missing_ok=True)
                    raise _file_error(ref, m, name, actual)
        except BaseException as e:
            if made_here:
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(e, OSError):
                raise StoreUnavailableError(f"cannot write the {ref} to {out}: {e.strerror or e}") from e
            raise
        return out, m

    def delete_artifact(self, ref: Ref) -> int:
        """Unpublish (pointer first), then remove every version; returns how many were removed."""
        keys = self.backend.list(ref.key)
        if not keys:
            raise NotFoundError(f"no {ref} in {self.backend.describe()}")
        versions = {parts[1] for parts in (k[len(ref.key) + 1:].split("/") for k in keys)
                    if len(parts) > 2 and parts[0] == "versions"}
        if ref.kind.owner:
            self.index(ref.kind, ref.task).mark(ref.owner, _new_version(), deleted=True)
        self.backend.delete(f"{ref.key}/{POINTER}")
        self.backend.delete_prefix(ref.key)
        return len(versions)

    # records: one JSON object per version

    def put_record(self, ref: Ref, record: dict[str, Any]) -> Manifest:
        """Publish a record (tune results, a quality report, a run summary) as a new version of `ref`."""
        _check_record_kind(ref)
        data = json.dumps(record, indent=2, sort_keys=True).encode("utf-8")
        return self.publish_artifact(ref, {RECORD_FILE: data})

    def get_record(self, ref: Ref) -> dict[str, Any]:
        """The latest version of a record, verified like every artifact."""
        _check_record_kind(ref)
        files, _ = self.fetch_artifact_bytes(ref)
        return json.loads(files[RECORD_FILE])

    # users' adapters, by task and user id

    def publish(self, task: str, user_id: str, files: dict[str, bytes], *, base_fingerprint: str,
                data_fingerprint: str, hparams: dict, metrics: dict | None = None,
                extra: dict | None = None) -> Manifest:
        """Store a new version of a user's adapter and make it the latest."""
        return self.publish_artifact(ADAPTER.of(task, user_id), files, base_fingerprint=base_fingerprint,
                                     data_fingerprint=data_fingerprint, hparams=hparams, metrics=metrics,
                                     extra=extra)

    def latest_version(self, task: str, user_id: str) -> str | None:
        """The version the user's pointer names, or None if the user has no published adapter."""
        return self.latest_artifact(ADAPTER.of(task, user_id))

    def list_versions(self, task: str, user_id: str) -> list[str]:
        return self.artifact_versions(ADAPTER.of(task, user_id))

    def manifest(self, task: str, user_id: str, version: str | None = None) -> Manifest:
        return self.artifact_manifest(ADAPTER.of(task, user_id), version)

    def list_users(self, task: str) -> list[str]:
        """Users of `task` with a published adapter."""
        return self.artifact_owners(ADAPTER, task)

    def list_tasks(self) -> list[str]:
        """Tasks with at least one published user adapter."""
        tasks = set()
        for key in self.backend.list(ADAPTER.root):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == POINTER:
                tasks.add(parts[1])
        return sorted(tasks)

    def has_adapter(self, task: str, user_id: str) -> bool:
        return self.latest_version(task, user_id) is not None

    def fetch_bytes(self, task: str, user_id: str, version: str | None = None, *,
                    expect_base: str | None = None) -> tuple[dict[str, bytes], Manifest]:
        return self.fetch_artifact_bytes(ADAPTER.of(task, user_id), version, expect_base=expect_base)

    def fetch(self, task: str, user_id: str, version: str | None = None, *, dest: Path | None = None,
              expect_base: str | None = None) -> tuple[Path, Manifest]:
        return self.fetch_artifact(ADAPTER.of(task, user_id), version, dest=dest, expect_base=expect_base)

    def delete_user(self, task: str, user_id: str) -> int:
        """Unpublish a user's adapter, then remove every version; returns how many were removed."""
        return self.delete_artifact(ADAPTER.of(task, user_id))


def _pointer_version(raw: bytes, key: str, backend: Backend) -> str:
    try:
        return validate_id(raw.decode("utf-8").strip(), "version")
    except (UnicodeDecodeError, InvalidIdError) as e:
        raise CorruptAdapterError(f"pointer {key} in {backend.describe()} is unreadable: {e}") from None


def _check_record_kind(ref: Ref) -> None:
    if ref.kind.files != (RECORD_FILE,):
        raise StoreError(f"a {ref.kind.what} is not a record: it is stored as {', '.join(ref.kind.files)}")


def _check_publish_files(ref: Ref, files: dict[str, bytes]) -> None:
    """Refuse to publish anything but the kind's files, in safe formats; its JSON files hold objects."""
    for name in ref.kind.files:
        if name not in files:
            raise StoreError(f"cannot publish the {ref}: {name} is missing")
    for name, data in files.items():
        problem = _file_name_problem(name)
        if problem:
            raise StoreError(f"cannot publish the {ref}: file name {_show(name)} refused: {problem}")
        if not isinstance(data, bytes):
            raise StoreError(f"cannot publish the {ref}: {name} must be bytes, got {type(data).__name__}")
    for name in ref.kind.files:
        if not name.endswith(".json"):
            continue
        try:
            content = json.loads(files[name])
        except ValueError as e:
            raise StoreError(f"cannot publish the {ref}: {name} is not valid JSON: {e}") from None
        if not isinstance(content, dict):
            raise StoreError(f"cannot publish the {ref}: {name} must hold a JSON object")
