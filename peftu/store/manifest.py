"""What a published version is (its manifest), how versions are named, and how a manifest is checked."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from peftu.errors import CorruptAdapterError
from peftu.store.ids import _file_name_problem, _show
from peftu.store.kinds import Ref


def fingerprint(obj: Any) -> str:
    """sha256 of canonical JSON: equal values give equal fingerprints whatever the key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Manifest(BaseModel):
    """What a published version is: which artifact, its origin, its settings and its files' sums.

    Fields a kind has no use for stay None and are not written; each kind says
    which it needs (`Kind.needs`). A user adapter's manifest reads as it always
    has, plus its `kind`.
    """

    # NaN metrics are real (a diverged fit); write them as NaN rather than null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    kind: str = "adapter"
    """Manifests written before kinds existed are users' adapters."""
    task: str
    user_id: str | None = None
    name: str | None = None
    version: str
    created_at: str
    base_fingerprint: str | None = None
    """The model it runs on (adapters, plug)."""
    encoder_fingerprint: str | None = None
    """PPlug's history encoder (plug, embeddings)."""
    data_fingerprint: str | None = None
    hparams: dict | None = None
    hparams_fingerprint: str | None = None
    metrics: dict[str, float] = {}
    files: dict[str, str]
    extra: dict = {}

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2, exclude_none=True).encode()


def read_manifest(raw: bytes, ref: Ref, version: str, key: str) -> Manifest:
    """The manifest in `raw`, found at `key` for `ref`'s `version`; CorruptAdapterError unless it is
    that version's, lists the kind's files under safe names with well-formed sums, and sets what the
    kind needs."""
    try:
        m = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise CorruptAdapterError(f"manifest {key} is invalid: {e}") from None
    claims = {field: getattr(m, field) for field in ref.identity()} | {"version": m.version}
    if claims != ref.identity() | {"version": version}:
        shown = ", ".join(f"{k} {v!r}" for k, v in claims.items() if v is not None)
        raise CorruptAdapterError(f"manifest {key} claims {shown}")
    for name in ref.kind.files:
        if name not in m.files:
            raise CorruptAdapterError(f"manifest {key} lists no {name}")
    for name, digest in m.files.items():
        problem = _file_name_problem(name)
        if problem:
            raise CorruptAdapterError(f"manifest {key} lists a disallowed file {_show(name)}: {problem}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CorruptAdapterError(f"manifest {key} gives {name} a malformed sha256 {_show(digest)}")
    for field in ref.kind.needs:
        if getattr(m, field) is None:
            raise CorruptAdapterError(f"manifest {key} of a {ref.kind.what} has no {field}")
    return m


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(fp: str | None) -> str:
    return fp[:12] if fp else "none"


def _file_error(ref: Ref, m: Manifest, name: str, actual: str | None = None) -> CorruptAdapterError:
    """A file its manifest lists that is missing (`actual` None) or has another sha256."""
    where = f"{name} of the {ref} (version {m.version})"
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
