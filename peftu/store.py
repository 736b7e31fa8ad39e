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

import abc
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError,
                                 ParamValidationError, PartialCredentialsError)
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import (CorruptAdapterError, ForeignAdapterError, InvalidIdError, NotFoundError,
                     StoreError, StoreUnavailableError)

__all__ = [
    "AdapterStore", "Backend", "LocalBackend", "Manifest", "S3Backend",
    "fingerprint", "open_backend", "validate_id",
]

MANIFEST = "manifest.json"
POINTER = "LATEST"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")

_MAX_ID_BYTES = 255
# Control and format characters (bidi overrides, zero-width marks), line and
# paragraph separators, and lone surrogates: invisible or terminal-hostile in a
# key, and surrogates cannot even be encoded.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")
_FILE_SUFFIXES = (".json", ".safetensors")
# Local temp files live next to their target (so os.replace is atomic); keys may
# not use this prefix, so a listing can always tell them apart.
_TMP_PREFIX = ".peftu-tmp-"


# ---------------------------------------------------------------- ids and keys

def _show(value: object, limit: int = 80) -> str:
    """repr() of a value for an error message, cut short so a huge id stays readable."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} chars" if isinstance(value, str) else type(value).__name__
    return f"{text[:limit]}... ({size})"


def _id_problem(value: str) -> str | None:
    if value == "":
        return "it is empty"
    if value in (".", ".."):
        return "it is a relative path component"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    for ch in value:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return f"it contains the control or invisible character U+{ord(ch):04X}"
    if value != value.strip():
        return "it has leading or trailing whitespace"
    if len(value.encode("utf-8")) > _MAX_ID_BYTES:
        return f"it is longer than {_MAX_ID_BYTES} bytes in UTF-8"
    return None


def validate_id(value: str, what: str = "user id") -> str:
    """Return `value` if it is safe as one path component of a store key.

    Ids come from data files and command lines; checking them here keeps them
    from escaping their directory or smuggling escapes into terminals and logs.
    """
    if not isinstance(value, str):
        raise InvalidIdError(f"{what} must be a string, got {type(value).__name__} {_show(value)}")
    problem = _id_problem(value)
    if problem:
        raise InvalidIdError(f"invalid {what} {_show(value)}: {problem}")
    return value


def _check_key(key: str) -> str:
    """Refuse a backend key that could leave the backend root or collide with temp files."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {_show(key)}: it is empty or not a string")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"invalid store key {_show(key)}: empty, '.' or '..' component")
        if "\\" in part or "\x00" in part:
            raise StoreError(f"invalid store key {_show(key)}: backslash or NUL in a component")
        if part.startswith(_TMP_PREFIX):
            raise StoreError(f"invalid store key {_show(key)}: {_TMP_PREFIX!r} is reserved")
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix: "" for everything, else a key naming a "directory"."""
    prefix = prefix.strip("/")
    return _check_key(prefix) if prefix else ""


# ---------------------------------------------------------------- backends

class Backend(abc.ABC):
    """A flat map of "/"-separated keys to bytes; each put replaces an object atomically."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`; readers see the old object or the new one, never a mix."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; NotFoundError naming the key if it is missing."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys under the "directory" `prefix` ("" for all), recursive, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the "directory" `prefix`."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store a local file without reading it all into memory."""

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Write the object to a local file, replacing it only once complete."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages."""


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: on POSIX the directory entry needs its own fsync.

    Best effort: some file systems refuse to fsync a directory, and by now the
    rename has happened, so failing the write would report a write that worked.
    """
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, fill: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` through a temp file in its directory: fsync, then os.replace.

    OS errors (permissions, a full disk) become StoreUnavailableError naming the
    path; the temp file never outlives a failure.
    """
    tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open rather than mkstemp: mode 0o666 lets the umask decide who can read.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StoreUnavailableError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)


class LocalBackend(Backend):
    """A directory on a local or mounted file system."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create store directory {self.root}: {e.strerror or e}") from e

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        _write_atomic(self._path(key), lambda f: f.write(data))

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"no object {key!r} in {self.root}") from None
        except OSError as e:
            raise StoreUnavailableError(f"cannot read {path}: {e.strerror or e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        prefix = _check_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        if not base.is_dir():
            return []

        def fail(e: OSError) -> None:
            raise StoreUnavailableError(f"cannot list {e.filename or base}: {e.strerror or e}") from e

        keys = []
        for dirpath, _, filenames in os.walk(base, onerror=fail):
            rel = Path(dirpath).relative_to(self.root).parts
            keys += ["/".join((*rel, name)) for name in filenames if not name.startswith(_TMP_PREFIX)]
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot delete {path}: {e.strerror or e}") from e

    def delete_prefix(self, prefix: str) -> None:
        prefix = _check_prefix(prefix)
        if not prefix:
            raise StoreError(f"refusing to delete everything in {self.root}: give a prefix")
        path = self.root.joinpath(*prefix.split("/"))
        try:
            shutil.rmtree(path)
        except (FileNotFoundError, NotADirectoryError):
            pass  # nothing under it (a plain object named like the prefix is not "under" it)
        except OSError as e:
            raise StoreUnavailableError(f"cannot delete {path}: {e.strerror or e}") from e

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        try:
            src = open(path, "rb")
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror or e}") from e
        with src:
            _write_atomic(target, lambda f: shutil.copyfileobj(src, f))

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            src = open(source, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"no object {key!r} in {self.root}") from None
        except OSError as e:
            raise StoreUnavailableError(f"cannot read {source}: {e.strerror or e}") from e
        with src:
            _write_atomic(Path(path), lambda f: shutil.copyfileobj(src, f))

    def describe(self) -> str:
        return str(self.root)


# Errors S3 answers when it is overloaded rather than refusing the request.
_S3_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                  "ServiceUnavailable", "InternalError"}


class S3Backend(Backend):
    """A bucket (and key prefix) on S3 or an S3-compatible endpoint.

    Credentials and region come the usual AWS way (environment, profile); the
    region defaults to us-east-1, which S3-compatible servers ignore anyway.
    botocore retries each request up to `max_attempts` times with exponential
    backoff and jitter ("standard" mode), and the timeouts keep a dead endpoint
    from hanging a fit: it fails in bounded time with StoreUnavailableError.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_attempts: int = 4, connect_timeout: float = 2.0, read_timeout: float = 10.0):
        self.bucket = bucket
        self.prefix = _check_prefix(prefix)
        self.max_attempts = max_attempts
        config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                        connect_timeout=connect_timeout, read_timeout=read_timeout)
        session = boto3.session.Session()
        # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL(_S3) and the profile's endpoint.
        self._client = session.client("s3", region_name=session.region_name or "us-east-1",
                                      endpoint_url=endpoint_url, config=config)
        self.endpoint = self._client.meta.endpoint_url

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"

    def _translate(self, exc: Exception, doing: str, key: str) -> StoreError:
        """One clear store error for whatever boto3 raised."""
        where = self._where(key)
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, (ClientError, BotoCoreError)):
            exc = exc.__context__  # upload_file wraps the real error in a message string
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFoundError(f"no object {where} at {self.endpoint}")
            if code == "NoSuchBucket":
                return StoreError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint} "
                                  f"(while {doing} {where})")
            if code == "AccessDenied" or status == 403:
                return StoreError(f"access denied while {doing} {where} at {self.endpoint}: {exc}")
            if status >= 500 or code in _S3_BUSY_CODES:
                return StoreUnavailableError(f"S3 endpoint {self.endpoint} failed after {self.max_attempts} "
                                             f"attempts while {doing} {where}: {exc}")
            return StoreError(f"S3 error while {doing} {where} at {self.endpoint}: {exc}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"no usable AWS credentials while {doing} {where}: {exc} "
                              "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
        if isinstance(exc, ParamValidationError):
            return StoreError(f"invalid S3 request while {doing} {where}: {exc}")
        return StoreUnavailableError(f"S3 endpoint {self.endpoint} unreachable after {self.max_attempts} "
                                     f"attempts while {doing} {where}: {exc}")

    @contextmanager
    def _call(self, doing: str, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._translate(e, doing, key) from e

    def put(self, key: str, data: bytes) -> None:
        with self._call("writing", key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        with self._call("reading", key):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._call("checking", key):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return False
        return True

    def _list_full(self, prefix: str) -> list[str]:
        """Full S3 keys under `prefix` (already checked), page after page."""
        full = self._key(prefix) if prefix else self.prefix
        s3_prefix = f"{full}/" if full else ""
        keys = []
        with self._call("listing", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=s3_prefix)
            for page in pages:
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys

    def list(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(key[strip:] for key in self._list_full(_check_prefix(prefix)))

    def delete(self, key: str) -> None:
        with self._call("deleting", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        prefix = _check_prefix(prefix)
        if not prefix:
            raise StoreError(f"refusing to delete everything in {self.describe()}: give a prefix")
        keys = self._list_full(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._call("deleting", prefix):
                answer = self._client.delete_objects(Bucket=self.bucket,
                                                     Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StoreError(f"could not delete s3://{self.bucket}/{first.get('Key')} at "
                                 f"{self.endpoint}: {first.get('Code')} {first.get('Message', '')}".rstrip())

    def put_file(self, key: str, path: Path) -> None:
        if not Path(path).is_file():
            raise StoreError(f"cannot upload {path}: not a readable file")
        with self._call("uploading", key):
            self._client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._call("downloading", key):
                # download_file writes a temp file next to `path` and renames it when complete.
                self._client.download_file(self.bucket, self._key(key), str(path))
        except OSError as e:
            raise StoreUnavailableError(f"cannot write {path}: {e.strerror or e}") from e

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} at {self.endpoint}"


def open_backend(uri: str, *, endpoint_url: str | None = None) -> Backend:
    """"s3://bucket/prefix" -> S3Backend; "file:///dir" or a plain path -> LocalBackend."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        return S3Backend(bucket, prefix, endpoint_url=endpoint_url)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {uri!r} names a remote host; only local file:// paths work")
        return LocalBackend(unquote(parsed.path))
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", uri):
        raise StoreError(f"unsupported store URI {uri!r}: use s3://bucket/prefix, file:///dir or a path")
    return LocalBackend(uri)


# ---------------------------------------------------------------- manifests

def fingerprint(obj: Any) -> str:
    """sha256 of canonical JSON: equal values give equal fingerprints whatever the key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Manifest(BaseModel):
    """What a published adapter version is: its origin, its settings and its files' sums."""

    # NaN metrics are real (a diverged fit); write them as NaN rather than null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    task: str
    user_id: str
    version: str
    created_at: str
    base_fingerprint: str
    data_fingerprint: str
    hparams: dict
    hparams_fingerprint: str
    metrics: dict[str, float] = {}
    files: dict[str, str]
    extra: dict = {}


def _file_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _FILE_NAME.match(name):
        return "only letters, digits, '_', '-' and '.' are allowed, not first '.'"
    if not name.endswith(_FILE_SUFFIXES):
        return "only .json and .safetensors files are stored (never pickles)"
    if name == MANIFEST:
        return f"{MANIFEST!r} is the store's own file"
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(fp: str) -> str:
    return fp[:12]


def _file_error(m: Manifest, name: str, actual: str | None = None) -> CorruptAdapterError:
    """A file its manifest lists that is missing (`actual` None) or has another sha256."""
    where = f"{name} of user {m.user_id!r} in task {m.task!r} (version {m.version})"
    if actual is None:
        return CorruptAdapterError(f"{where} is listed in its manifest but missing")
    return CorruptAdapterError(f"{where} does not match its manifest: sha256 {_short(actual)} "
                               f"instead of {_short(m.files[name])}")


def _new_version() -> str:
    """Sortable by time, unique across publishers."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def version_started_ns(version: str) -> int | None:
    """When a version's publish started (time.time_ns()), read from its name; None if not ours."""
    started = version.split("-", 1)[0]
    return int(started) if started.isdigit() else None


# ---------------------------------------------------------------- the store

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
