"""Where the store's bytes live: a local folder or an S3 bucket, behind one small interface."""

from __future__ import annotations

import abc
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from peftu.errors import NotFoundError, StoreError, StoreUnavailableError
from peftu.store.ids import _TMP_PREFIX, _check_key, _check_prefix

# Local temp files live next to their target (so os.replace is atomic); keys may
# not use this prefix, so a listing can always tell them apart.
# Errors S3 answers when it is overloaded rather than refusing the request.
_S3_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                  "ServiceUnavailable", "InternalError"}


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

    def delete_many(self, keys: list[str]) -> None:
        """Remove these objects (missing ones are not an error); S3 takes 1,000 a request."""
        for key in keys:
            self.delete(key)

    @abc.abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and a tag that changes whenever it is replaced (S3: its ETag); None if missing."""

    @abc.abstractmethod
    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap: store `data` only if the object still has `tag` (None: only if there is no
        object yet). False, and nothing written, when another writer got there first."""

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


def _write_atomic(path: Path, fill: Callable[[IO[bytes]], Any], *, exclusive: bool = False) -> bool:
    """Write `path` through a temp file in its directory: fsync, then os.replace (`exclusive`: os.link,
    which refuses to replace an existing file: False then, and nothing written).

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
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StoreUnavailableError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)
    return True


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy a file through `_write_atomic`: an OSError out of here is one reading `source`
    (failed writes are StoreUnavailableError already)."""
    with open(source, "rb") as src:
        _write_atomic(target, lambda f: shutil.copyfileobj(src, f))


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
        data = self._read(key)
        if data is None:
            raise NotFoundError(f"no object {key!r} in {self.root}")
        return data

    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
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

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        data = self._read(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """A new object by os.link (atomic, and it refuses an existing name); a replacement under an
        exclusive flock of a lock file next to the object (hidden from listings like temp files, and
        kept while the object is), so racing writers in any process take turns; readers never
        need the lock (os.replace)."""
        path = self._path(key)
        if tag is None:
            return _write_atomic(path, lambda f: f.write(data), exclusive=True)
        lock = path.parent / f"{_TMP_PREFIX}lock-{path.name}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise StoreUnavailableError(f"cannot lock {path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = self.get_tagged(key)
            if (now[1] if now else None) != tag:
                return False
            self.put(key, data)
            return True
        finally:
            os.close(fd)  # closing drops the lock

    def put_file(self, key: str, path: Path) -> None:
        try:
            _copy_atomic(Path(path), self._path(key))
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror or e}") from e

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            _copy_atomic(source, Path(path))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"no object {key!r} in {self.root}") from None
        except OSError as e:
            raise StoreUnavailableError(f"cannot read {source}: {e.strerror or e}") from e

    def describe(self) -> str:
        return str(self.root)


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

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        try:
            with self._call("reading", key):
                answer = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
                return answer["Body"].read(), answer["ETag"]
        except NotFoundError:
            return None

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """S3's conditional writes: If-Match on the ETag read, If-None-Match: * for a new object.
        S3 answers 412 when the condition fails, 409 when a concurrent conditional write won, and
        404 when If-Match names an object since deleted."""
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            with self._call("writing", key):
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except NotFoundError:
            return False
        except StoreError as e:
            cause = e.__cause__
            if isinstance(cause, ClientError) and (
                    cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)
                    or cause.response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                                       "ConditionalRequestConflict")):
                return False
            raise
        return True

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
        self._delete_full(self._list_full(prefix), prefix)

    def delete_many(self, keys: list[str]) -> None:
        self._delete_full([self._key(k) for k in keys], keys[0] if keys else "")

    def _delete_full(self, keys: list[str], prefix: str) -> None:
        """Delete full S3 keys, 1,000 a request (DeleteObjects' most); `prefix` for messages."""
        for start in range(0, len(keys), 1000):
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


