"""What the loaders share: strict JSON and CSV reading, single-field checks, the report.

Every check raises `DataError` naming the file, the record (or line) and the field.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from peftu.data.schema import TaskSpec, UserRecord
from peftu.data.split import SplitReport
from peftu.errors import DataError

LoadResult = tuple[TaskSpec, list[UserRecord], SplitReport]


def default_name(path: Path, task_name: str | None) -> str:
    """The task name: given, else the data folder's name (PEFT-U keeps one folder per task)."""
    return task_name or path.resolve().parent.name or path.stem


def label_set(labels: set[str], source: Path, field: str) -> list[str]:
    """The sorted label set; a classification task needs two labels to choose between."""
    if len(labels) < 2:
        raise DataError(f"a classification task needs at least two distinct labels, "
                        f"found {sorted(labels)}", source=str(source), field=field)
    return sorted(labels)


def report_of(users: list[UserRecord], users_in: int) -> SplitReport:
    """The counts of users read and kept, and of the kept users' examples."""
    return SplitReport(users_in=users_in, users_kept=len(users),
                       users_dropped=users_in - len(users),
                       train=sum(len(u.train) for u in users),
                       val=sum(len(u.val) for u in users),
                       test=sum(len(u.test) for u in users))


class _JsonObject(dict):
    """A JSON object that remembers keys given twice, which `json` would silently merge."""

    duplicates: list[str]


def _json_object_hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def read_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors name the line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f, object_pairs_hook=_json_object_hook)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=str(path),
                        line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}",
                        source=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", source=str(path)) from None


def read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """All non-blank rows of a CSV file, each with the physical line it starts on."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise DataError(f"malformed CSV: {e}", source=str(path),
                                    line=reader.line_num) from None
                if row:
                    rows.append((start, row))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}",
                        source=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", source=str(path)) from None
    return rows


def json_object(value: Any, source: Path, record: str | None, field: str | None) -> dict:
    """`value` as a JSON object with no key given twice."""
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, found {type(value).__name__}",
                        source=str(source), record=record, field=field)
    duplicates = getattr(value, "duplicates", [])
    if duplicates:
        raise DataError(f"key {duplicates[0]!r} given more than once", source=str(source),
                        record=record, field=duplicates[0])
    return value


def text_field(obj: dict, key: str, source: Path, record: str) -> str:
    """A required, non-blank string field."""
    if key not in obj:
        raise DataError("missing", source=str(source), record=record, field=key)
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, found {type(value).__name__}",
                        source=str(source), record=record, field=key)
    if not value.strip():
        raise DataError("empty", source=str(source), record=record, field=key)
    return value


def id_field(obj: dict, key: str, source: Path, record: str) -> str:
    """A required id: a non-empty string or an integer, as a string."""
    if key not in obj:
        raise DataError("missing", source=str(source), record=record, field=key)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"expected a string or integer id, found {type(value).__name__}",
                        source=str(source), record=record, field=key)
    if not str(value).strip():
        raise DataError("empty", source=str(source), record=record, field=key)
    return str(value)
