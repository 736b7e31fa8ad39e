"""Saving and loading a task's users as a Hugging Face `datasets` Parquet file.

A saved task is a folder (local or `s3://bucket/prefix`) holding
`users.parquet` (one row per user: id, history, train, val, test) and
`task.json` (the TaskSpec). `task.json` is written last and marks the data set
as complete, so a reader never loads half a data set; locally the whole folder
is built aside and renamed into place. Ray Data reads the same Parquet file.

On S3, `endpoint_url` names an S3-compatible endpoint (MinIO, moto), as the
commands' `--endpoint-url` does for the store; without it boto3 reads
`AWS_ENDPOINT_URL` or talks to AWS.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from pydantic import ValidationError

from peftu.data.schema import TaskSpec, UserRecord
from peftu.errors import DataError, NotFoundError

if TYPE_CHECKING:
    from peftu.store import Backend

datasets.disable_progress_bars()  # one Parquet file per task: its bars are noise

USERS_FILE = "users.parquet"
TASK_FILE = "task.json"

_ITEM = {"id": datasets.Value("string"), "text": datasets.Value("string"),
         "output": datasets.Value("string")}
_EXAMPLE = {"id": datasets.Value("string"), "input": datasets.Value("string"),
            "output": datasets.Value("string"), "also": datasets.List(datasets.Value("string"))}
FEATURES = datasets.Features({
    "user_id": datasets.Value("string"),
    "history": datasets.List(_ITEM),
    "train": datasets.List(_EXAMPLE),
    "val": datasets.List(_EXAMPLE),
    "test": datasets.List(_EXAMPLE),
})
_BEFORE_ALSO = datasets.Features({**FEATURES, **{s: datasets.List({k: v for k, v in _EXAMPLE.items() if k != "also"})
                                                for s in ("train", "val", "test")}})
"""The columns of data sets saved before examples had `also` (still read: their examples have none)."""


def _is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3(uri: str | Path, endpoint_url: str | None) -> Backend:
    from peftu.store import open_backend

    return open_backend(str(uri), endpoint_url=endpoint_url)


def _write_local(folder: Path, spec: TaskSpec, users: list[UserRecord]) -> None:
    datasets.Dataset.from_list([u.to_row() for u in users], features=FEATURES).to_parquet(
        str(folder / USERS_FILE))
    (folder / TASK_FILE).write_text(spec.model_dump_json(indent=2))


def save_task(uri: str | Path, spec: TaskSpec, users: list[UserRecord], *, endpoint_url: str | None = None) -> None:
    """Save a task's users to a folder or an `s3://` prefix, all or nothing."""
    _no_duplicates([u.user_id for u in users], None)
    if _is_s3(str(uri)):
        backend = _s3(uri, endpoint_url)
        with tempfile.TemporaryDirectory() as tmp:
            _write_local(Path(tmp), spec, users)
            backend.delete(TASK_FILE)  # unmark while the data changes
            backend.put_file(USERS_FILE, Path(tmp) / USERS_FILE)
            backend.put_file(TASK_FILE, Path(tmp) / TASK_FILE)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_local(staging, spec, users)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _parse_spec(text: str | bytes, source: str) -> TaskSpec:
    try:
        return TaskSpec.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise DataError(err["msg"], source=source, field=field) from None


def load_spec(uri: str | Path, *, endpoint_url: str | None = None) -> TaskSpec:
    """Only the task of a saved data set: a cheap check that `uri` is one before long work starts."""
    with _saved_files(uri, endpoint_url, (TASK_FILE,)) as (folder, display):
        return _read_spec(folder, display)


@contextmanager
def _saved_files(uri: str | Path, endpoint_url: str | None, names: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
    """The local folder holding a saved task's files (for `s3://`, a temporary copy of `names`) and how
    to name it in errors."""
    if not _is_s3(str(uri)):
        yield Path(uri), str(uri)
        return
    backend = _s3(uri, endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                backend.get_file(name, Path(tmp) / name)
            except NotFoundError:
                pass  # reported by the reader, as for a local folder
        yield Path(tmp), str(uri).rstrip("/")


def load_task(uri: str | Path, *, endpoint_url: str | None = None) -> tuple[TaskSpec, list[UserRecord]]:
    """Load a task saved by `save_task` (folder or `s3://` prefix)."""
    with _saved_files(uri, endpoint_url, (TASK_FILE, USERS_FILE)) as (folder, display):
        return _read_spec(folder, display), _read_users(folder, display)


def load_user_ids(uri: str | Path, *, endpoint_url: str | None = None) -> tuple[TaskSpec, list[str]]:
    """A saved task and its user ids, in saved order, from the `user_id` column alone: what a fit job's
    driver hands out, so that its memory does not grow with the users' histories (`load_users`)."""
    with _saved_files(uri, endpoint_url, (TASK_FILE, USERS_FILE)) as (folder, display):
        spec = _read_spec(folder, display)
        source = f"{display}/{USERS_FILE}"
        table = _parquet(folder / USERS_FILE, source, columns=["user_id"])
        ids = table.column("user_id").to_pylist()
    for i, user_id in enumerate(ids):
        if not user_id:
            raise DataError("empty or null", source=source, record=f"row {i}", field="user_id")
    _no_duplicates(ids, source)
    return spec, ids


def load_users(uri: str | Path, user_ids: list[str], *, endpoint_url: str | None = None) -> list[UserRecord]:
    """Just these users of a saved task, in the order given: a worker's own share, read from the
    Parquet file with a filter on `user_id` (only the row groups that hold them are decoded)."""
    import pyarrow.compute as pc

    with _saved_files(uri, endpoint_url, (USERS_FILE,)) as (folder, display):
        users = _read_users(folder, display, pc.field("user_id").isin(user_ids))
    by_id = {u.user_id: u for u in users}
    missing = [u for u in user_ids if u not in by_id]
    if missing:
        raise DataError(f"{len(missing)} user(s) not in the data set, e.g. {missing[0]!r}",
                        source=f"{display}/{USERS_FILE}", field="user_id")
    return [by_id[u] for u in user_ids]


def _read_spec(folder: Path, display: str) -> TaskSpec:
    task_file = folder / TASK_FILE
    if not task_file.is_file():
        raise DataError("missing; is this a data set saved by `peftu data`?", source=f"{display}/{TASK_FILE}")
    return _parse_spec(task_file.read_bytes(), f"{display}/{TASK_FILE}")  # bytes: bad UTF-8 is a JSON error


def _parquet(path: Path, source: str, **read):
    """`pyarrow.parquet.read_table(path, **read)`, or a DataError naming the file."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError("missing; is this a data set saved by `peftu data`?", source=source)
    try:
        return pq.read_table(path, **read)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"not a readable Parquet file ({e})", source=source) from None


def _read_users(folder: Path, display: str, where=None) -> list[UserRecord]:
    """The users of `users.parquet` (those `where` selects), checked: every column of the saved
    types, no null ids or texts, no duplicate ids."""
    source = f"{display}/{USERS_FILE}"
    table = datasets.Dataset(_parquet(folder / USERS_FILE, source, filters=where))
    missing = set(FEATURES) - set(table.column_names)
    if missing:
        raise DataError("column missing", source=source, field=min(missing))
    saved = getattr(table.features["train"], "feature", {})
    try:
        table = table.select_columns(list(FEATURES)).cast(FEATURES if "also" in saved else _BEFORE_ALSO)
    except Exception as e:  # noqa: BLE001 - pyarrow's cast errors: the columns hold the wrong types
        raise DataError(f"columns do not have the saved types ({e})", source=source) from None
    users = [checked_row(row, source) for row in table]
    _no_duplicates([u.user_id for u in users], source)
    return users


def _no_duplicates(ids: list[str], source: str | None) -> None:
    seen: set[str] = set()
    for user_id in ids:
        if user_id in seen:
            raise DataError("duplicate user id", source=source, record=user_id, field="user_id")
        seen.add(user_id)


def checked_row(row: dict, source: str) -> UserRecord:
    """A user row (a dict as pyarrow reads it, here or in a fit worker) as a UserRecord, with every id and
    text present: Parquet strings may be null."""
    if not row["user_id"]:
        raise DataError("empty or null", source=source, record=str(row["user_id"]), field="user_id")
    for column in ("history", "train", "val", "test"):
        for i, item in enumerate(row[column] or []):
            for key, value in item.items():
                if value is None:
                    raise DataError("null", source=source, record=f"{row['user_id']} / {column} / {i}", field=key)
    return UserRecord.from_row(row)
