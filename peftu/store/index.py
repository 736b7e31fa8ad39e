"""A per-task index of the published artifacts of one kind: who has one, which version, which fingerprints.

Pointers stay the truth; the index only saves reading them one by one. It is
a snapshot plus change marks (docs/store.md, "The index")::

    indexes/<kind root>/<task>/snapshot.json.gz          every owner's version and fingerprints
    indexes/<kind root>/<task>/changes/<owner>/<stamp>   a pointer is about to move (publish)
    indexes/<kind root>/<task>/changes/<owner>/<stamp>.del   ... or to go (delete)

Every pointer change marks first, so at any time each owner's snapshot entry
is the truth or the owner has a mark. A reader lists the marks (one request
per 1,000), then reads the snapshot (one request), then reads the truth
(pointer and manifest, concurrently) of the marked owners only. Compaction
folds the marked owners' truth into a new snapshot (a conditional write, so
racing compactors cannot lose each other's work) and deletes the marks it
saw resolved: the pointer at or past the mark (deleted, for a delete mark),
or the mark older than `STALE_MARK_S` (its writer is dead). A missing
snapshot is rebuilt from a full scan of the pointers.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from peftu.errors import CorruptAdapterError, StoreError
from peftu.store.backends import Backend
from peftu.store.ids import validate_id
from peftu.store.kinds import Kind
from peftu.store.manifest import Manifest, version_started_ns

log = logging.getLogger("peftu.store")

INDEX_ROOT = "indexes"
SNAPSHOT = "snapshot.json.gz"
DELETE_MARK = ".del"
FORMAT = 1

READ_THREADS = 16
"""How many per-owner reads (pointer, manifest) run at once: bounded, so a big task cannot open
thousands of connections, and enough to hide a round trip's latency."""

COMPACT_AT = 1000
"""A reader that resolved this many marks writes them into the snapshot (compaction)."""

STALE_MARK_S = 3600.0
"""A mark this old whose pointer change never came: its writer died (the same bound as `peftu store sweep`)."""


@dataclass(frozen=True)
class Entry:
    """One owner's published version, and what it was made from (what a re-run compares)."""

    version: str
    base_fingerprint: str | None = None
    encoder_fingerprint: str | None = None
    data_fingerprint: str | None = None
    hparams_fingerprint: str | None = None

    @classmethod
    def of(cls, m: Manifest) -> Entry:
        return cls(m.version, m.base_fingerprint, m.encoder_fingerprint, m.data_fingerprint, m.hparams_fingerprint)

    def fits(self, base: str | None, data: str | None, hparams: str | None, encoder: str | None = None) -> bool:
        return (self.base_fingerprint, self.data_fingerprint, self.hparams_fingerprint, self.encoder_fingerprint) \
            == (base, data, hparams, encoder)


@dataclass(frozen=True)
class Mark:
    owner: str
    stamp: str
    deleted: bool

    def resolved(self, entry: Entry | None, now_ns: int) -> bool:
        """Has the pointer change this mark announced happened (or will it never happen)?"""
        started = version_started_ns(self.stamp) or 0
        if now_ns - started > STALE_MARK_S * 1e9:
            return True
        if self.deleted:
            return entry is None or entry.version > self.stamp
        return entry is not None and entry.version >= self.stamp


def encode_snapshot(entries: dict[str, Entry]) -> bytes:
    """gzip'd JSON; the fingerprints most owners share (base, encoder, hparams) are written once."""
    shared: dict[tuple, int] = {}
    rows = {}
    for owner, e in sorted(entries.items()):
        key = (e.base_fingerprint, e.encoder_fingerprint, e.hparams_fingerprint)
        rows[owner] = [e.version, e.data_fingerprint, shared.setdefault(key, len(shared))]
    doc = {"format": FORMAT, "shared": [list(k) for k in shared], "entries": rows}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=5, mtime=0)


def decode_snapshot(raw: bytes, where: str) -> dict[str, Entry]:
    try:
        doc = json.loads(gzip.decompress(raw))
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, not {FORMAT}")
        shared = doc["shared"]
        return {owner: Entry(version, shared[i][0], shared[i][1], data, shared[i][2])
                for owner, (version, data, i) in doc["entries"].items()}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CorruptAdapterError(f"index snapshot {where} is unreadable: {e}") from None


class TaskIndex:
    """The index of one kind in one task. `read_truth(owner)` reads an owner's pointer and manifest
    (None: nothing published); `scan_owners()` lists every owner with a pointer (the slow full scan)."""

    def __init__(self, backend: Backend, kind: Kind, task: str, read_truth: Callable[[str], Entry | None],
                 scan_owners: Callable[[], list[str]]):
        self.backend, self.kind = backend, kind
        self.key = f"{INDEX_ROOT}/{kind.root}/{validate_id(task, 'task name')}"
        self._read_truth, self._scan_owners = read_truth, scan_owners

    def mark(self, owner: str, stamp: str, *, deleted: bool = False) -> None:
        """Before a pointer moves (or goes): readers must not trust the snapshot's entry for `owner`."""
        self.backend.put(f"{self.key}/changes/{owner}/{stamp}{DELETE_MARK if deleted else ''}", b"")

    def _marks(self) -> list[Mark]:
        prefix = f"{self.key}/changes/"
        marks = []
        for key in self.backend.list(f"{self.key}/changes"):
            owner, _, name = key[len(prefix):].partition("/")
            deleted = name.endswith(DELETE_MARK)
            marks.append(Mark(owner, name[: -len(DELETE_MARK)] if deleted else name, deleted))
        return marks

    def truths(self, owners: Iterable[str]) -> dict[str, Entry | None]:
        """Each owner's entry read from its pointer and manifest, `READ_THREADS` at a time."""
        owners = sorted(set(owners))
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(owners)))) as pool:
            return dict(zip(owners, pool.map(self._read_truth, owners)))

    def state(self, *, compact_at: int = COMPACT_AT) -> dict[str, Entry]:
        """Every owner's current entry: the snapshot, with the marked owners read from their pointers.

        Marks are listed before the snapshot is read: a compactor that writes a snapshot and
        deletes marks in between leaves marks this reader saw or a snapshot that has them.
        """
        marks = self._marks()
        tagged = self.backend.get_tagged(f"{self.key}/{SNAPSHOT}")
        if tagged is None:
            entries = {o: e for o, e in self.truths(self._scan_owners()).items() if e is not None}
            changed = self.truths({m.owner for m in marks} - set(entries))
        else:
            entries = decode_snapshot(tagged[0], f"{self.key}/{SNAPSHOT}")
            changed = self.truths({m.owner for m in marks})
        for owner, entry in changed.items():
            if entry is None:
                entries.pop(owner, None)
            else:
                entries[owner] = entry
        if (tagged is None and (entries or marks)) or (marks and len(marks) >= compact_at):
            truth = {o: entries.get(o) for o in {m.owner for m in marks}}
            self._compact(entries, tagged[1] if tagged else None, marks, truth)
        return entries

    def compact(self) -> dict[str, Entry]:
        """Fold every mark into the snapshot now (the fit job does once its workers are done)."""
        return self.state(compact_at=0)

    def _compact(self, entries: dict[str, Entry], tag: str | None, marks: list[Mark],
                 truth: dict[str, Entry | None]) -> None:
        """Best effort: a reader without write access, or one that loses the race to another
        compactor, leaves the index as it was (slower to read, never wrong)."""
        try:
            if not self.backend.put_if(f"{self.key}/{SNAPSHOT}", encode_snapshot(entries), tag):
                return
            now = time.time_ns()
            self.backend.delete_many([f"{self.key}/changes/{m.owner}/{m.stamp}{DELETE_MARK if m.deleted else ''}"
                                      for m in marks if m.resolved(truth.get(m.owner), now)])
        except StoreError as e:
            log.warning("could not compact the index %s: %s", self.key, e)

    def size(self) -> int:
        """Bytes of the snapshot (0 if there is none)."""
        tagged = self.backend.get_tagged(f"{self.key}/{SNAPSHOT}")
        return len(tagged[0]) if tagged else 0
