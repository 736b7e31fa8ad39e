"""The store: per-user adapters and the project's other artifacts, in a folder or an S3 bucket.

`ids` checks what becomes a key, `backends` holds the bytes (local, S3),
`manifest` says what a version is, `adapter_store` publishes and reads versions
atomically, `kinds` names every kind of artifact and its namespace, and
`current` decides whether a user's adapter is current.
"""

from peftu.store.adapter_store import AdapterStore
from peftu.store.backends import Backend, LocalBackend, S3Backend, open_backend
from peftu.store.ids import REQUIRED_FILES, validate_id
from peftu.store.manifest import Manifest, fingerprint, version_started_ns

__all__ = [
    "REQUIRED_FILES", "AdapterStore", "Backend", "LocalBackend", "Manifest", "S3Backend",
    "fingerprint", "open_backend", "validate_id", "version_started_ns",
]
