"""Errors a user can act on.

Every error peftu raises on purpose derives from `PeftuError`; the CLI prints
its message (never a traceback) and exits non-zero. Messages name what was
wrong: the file, line or record, the field, the user id, the store key.
"""

from __future__ import annotations


class PeftuError(Exception):
    """An error with a message meant for the person running peftu."""


class DataError(PeftuError):
    """Malformed input data: says which file, which line or record, which field."""

    def __init__(self, message: str, *, source: str | None = None,
                 line: int | None = None, record: str | None = None,
                 field: str | None = None):
        where = []
        if source:
            where.append(str(source))
        if line is not None:
            where.append(f"line {line}")
        if record is not None:
            where.append(f"record {record!r}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.source, self.line, self.record, self.field = source, line, record, field


class InvalidIdError(PeftuError):
    """A user id or task name that cannot be used as a store key component."""


class StoreError(PeftuError):
    """Something went wrong in the adapter store."""


class StoreUnavailableError(StoreError):
    """The store's backend (an S3 endpoint, a disk) could not be reached or written."""


class NotFoundError(StoreError):
    """A task, user, version or object that the store does not have."""


class CorruptAdapterError(StoreError):
    """An adapter whose files do not match the sha256 sums in its manifest."""


class ForeignAdapterError(StoreError):
    """An adapter fitted on another base model than the one loaded."""
