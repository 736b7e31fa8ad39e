"""What a published version is (its manifest), and how versions are named."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from peftu.errors import CorruptAdapterError


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
