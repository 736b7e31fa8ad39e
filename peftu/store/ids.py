"""Ids and keys: what may become a key or a file name in the store, checked before it does."""

from __future__ import annotations

import re
import unicodedata

from peftu.errors import InvalidIdError, StoreError

MANIFEST = "manifest.json"


POINTER = "LATEST"


_TMP_PREFIX = ".peftu-tmp-"
"""Temp files of atomic local writes; no key may use it."""
_MAX_ID_BYTES = 255


# Control and format characters (bidi overrides, zero-width marks), line and
# paragraph separators, and lone surrogates: invisible or terminal-hostile in a
# key, and surrogates cannot even be encoded.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")


_FILE_SUFFIXES = (".json", ".safetensors")


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


def _file_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _FILE_NAME.match(name):
        return "only letters, digits, '_', '-' and '.' are allowed, not first '.'"
    if not name.endswith(_FILE_SUFFIXES):
        return "only .json and .safetensors files are stored (never pickles)"
    if name == MANIFEST:
        return f"{MANIFEST!r} is the store's own file"
    return None
