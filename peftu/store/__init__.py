"""The store: per-user adapters and the project's other artifacts, in a folder or an S3 bucket.

`ids` checks what becomes a key, `backends` holds the bytes (local, S3),
`kinds` names every kind of artifact (its folder, files and required manifest
fields) and the benchmark's namespace, `manifest` says what a version is,
`adapter_store` publishes and reads versions of every kind atomically, and
`current` decides whether a fitted artifact is current.
"""

from peftu.store.adapter_store import AdapterStore
from peftu.store.backends import Backend, LocalBackend, S3Backend, open_backend
from peftu.store.ids import validate_id
from peftu.store.kinds import Kind, Ref
from peftu.store.manifest import Manifest, fingerprint, version_started_ns

__all__ = [
    "AdapterStore", "Backend", "Kind", "LocalBackend", "Manifest", "Ref", "S3Backend",
    "fingerprint", "open_backend", "validate_id", "version_started_ns",
]
