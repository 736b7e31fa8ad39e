"""Users' adapters from the store into bank slots: on demand, checked, bounded.

`acquire(user)` gives a lease on the slot holding the user's current adapter
(loading it on first use), or on the zero slot for a user without one. The
store's version pointer is re-read once a loaded version is older than the TTL,
so a newly published version is picked up without a restart. Loads of
different users run concurrently in threads; loads of one user are coalesced.
A corrupt, foreign or incompatible adapter is logged and counted, and its user
is answered by the base model, unless it has an older good version: a bad new
version never replaces a good old one. A resident user keeps the version they
have; a cold one gets the newest good one of their last few versions; either is
answered with `fallback="newer-version-unusable"`. After the TTL only the pointer
is re-read: the same bad version is not fetched, logged or counted again; a new
one is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from peftu.bank import AdapterBank
from peftu.bank.model import parse_adapter
from peftu.errors import CorruptAdapterError, ForeignAdapterError, NotFoundError, StoreError, StoreUnavailableError
from peftu.inference.generate import BASE_SLOT
from peftu.serving.cache import Entry, SlotCache
from peftu.serving.metrics import Metrics
from peftu.store import AdapterStore
from peftu.store.users import delete_user_data

log = logging.getLogger("peftu.serving")

_MAX_REMEMBERED = 100_000  # users known to have no (usable) adapter
_OLDER_TRIED = 3  # older versions a cold user's bad latest falls back to, newest first
NEWER_UNUSABLE = "newer-version-unusable"


@dataclass
class Lease:
    """The slot a request runs on, held until its batch is done."""

    slot: int
    version: str | None
    """None: the base model answers."""
    entry: Entry | None = None
    loaded_ms: float | None = None
    """Set when this request waited for the adapter's load."""
    pplug: bool = False
    """The base answers with PPlug's soft tokens for this user (no adapter, cached history)."""
    fallback: str | None = None
    """Why the base answers a user who has an adapter: "store-unavailable", "corrupt", "foreign", "incompatible";
    or NEWER_UNUSABLE: an older version of theirs answers because their newest one is unusable."""


@dataclass
class _Absent:
    """A user found to have no usable adapter: answered by the base until `seen` + TTL."""

    seen: float
    fallback: str | None = None
    """None: no adapter at all; else why the one there is unusable (the Lease's fallback)."""
    version: str | None = None
    """The unusable version: while the pointer still names it, it is not fetched again."""
    older_tried: bool = False
    """Its user's older versions were tried too, and none loads."""


class AdapterManager:
    """The bank's slots 1..n hold users' adapters; slot 0 stays zero (the base)."""

    def __init__(self, bank: AdapterBank, store: AdapterStore, task: str, base_fp: str, *,
                 max_bytes: int, ttl_s: float, metrics: Metrics):
        self.bank, self.store, self.task, self.base_fp = bank, store, task, base_fp
        self.ttl_s, self.metrics = ttl_s, metrics
        bank.clear_slot(BASE_SLOT)
        self.slot_bytes = bank.slot_bytes()
        self.cache = SlotCache(list(range(1, bank.n_slots)), max_bytes)
        self._absent: OrderedDict[str, _Absent] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._freed = asyncio.Condition()
        self._refreshing: set[str] = set()
        self._invalidations = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        """When (in `_invalidations`) each recently invalidated user was: a load begun before that is not kept."""

    async def acquire(self, user: str | None) -> Lease:
        """A pinned lease for the user's adapter (the base's slot for None or no adapter)."""
        lease = await self._acquire(user)
        if lease.version is not None and lease.loaded_ms is None:
            self.metrics.adapter_hits.inc()
        return lease

    async def _acquire(self, user: str | None) -> Lease:
        if user is None:
            return Lease(BASE_SLOT, None)
        entry = self.cache.get(user)
        if entry is not None:  # resident: answer now; a stale version is re-checked in the background
            if time.monotonic() - entry.checked_at >= self.ttl_s and user not in self._refreshing:
                self._refreshing.add(user)
                asyncio.get_running_loop().create_task(self._refresh(user))
            return self._lease(entry)
        async with self._lock(user):
            return await self._acquire_locked(user)

    def _lock(self, user: str) -> asyncio.Lock:
        lock = self._locks.get(user)
        if lock is None:
            lock = self._locks[user] = asyncio.Lock()
        return lock

    async def _refresh(self, user: str) -> None:
        """Re-read the user's version pointer; load a new version, drop a deleted one."""
        try:
            async with self._lock(user):
                lease = await self._acquire_locked(user)
            self.release(lease)
        finally:
            self._refreshing.discard(user)

    def release(self, lease: Lease) -> None:
        """Unpin once the lease's batch is done (a load waiting for a slot may go on)."""
        if lease.entry is None:
            return
        self.cache.unpin(lease.entry)
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    async def _acquire_locked(self, user: str) -> Lease:
        now = time.monotonic()
        entry = self.cache.get(user)
        if entry is not None and now - entry.checked_at < self.ttl_s:
            return self._lease(entry)
        if entry is None:
            absent = self._absent.get(user)
            if absent is not None and now - absent.seen < self.ttl_s:
                return Lease(BASE_SLOT, None, fallback=absent.fallback)
            return await self._load(user, None)
        try:
            latest = await asyncio.to_thread(self.store.latest_version, self.task, user)
        except (StoreError, OSError) as e:
            return self._unchecked(user, entry, e)
        if latest is None:
            self.cache.remove(user)
            self._remember_absent(user)
            return Lease(BASE_SLOT, None)
        if latest in (entry.version, entry.unusable):  # current, or still the bad newer one: not fetched again
            entry.checked_at = now
            if latest == entry.version:
                entry.unusable = None
            return self._lease(entry)
        return await self._load(user, latest, entry)

    def _lease(self, entry: Entry, loaded_ms: float | None = None) -> Lease:
        self.cache.pin(entry)
        return Lease(entry.slot, entry.version, entry, loaded_ms=loaded_ms,
                     fallback=NEWER_UNUSABLE if entry.unusable else None)

    def _unchecked(self, user: str, entry: Entry | None, error: Exception) -> Lease:
        """The store could not be read: keep serving what is loaded, else the base."""
        self.metrics.adapter_errors.labels(reason="store").inc()
        log.warning("cannot check the adapter version of user %r: %s", user, error)
        return self._lease(entry) if entry is not None else Lease(BASE_SLOT, None, fallback="store-unavailable")

    def _remember_absent(self, user: str, why: str | None = None, version: str | None = None,
                         older_tried: bool = False) -> None:
        """The user has no usable adapter: answer with the base without asking the store for a TTL."""
        self._absent[user] = _Absent(time.monotonic(), why, version, older_tried)
        self._absent.move_to_end(user)
        while len(self._absent) > _MAX_REMEMBERED:
            self._absent.popitem(last=False)

    async def _load(self, user: str, version: str | None, resident: Entry | None = None) -> Lease:
        """Fetch, verify and read `version` (None: the latest), then fill a slot.

        If it is unusable, an older good version answers: `resident` (the one loaded now), else
        the newest loadable of the few before it in the store.
        """
        lease = await self._load_one(user, version)
        if lease.version is not None or lease.fallback is None:
            return lease
        keep = resident is not None and not resident.retired
        if lease.fallback == "store-unavailable":
            return self._lease(resident) if keep else lease
        bad = self._absent.get(user)  # remembered by _failed, or still the one it remembered
        if bad is None:
            return lease
        if keep:
            self._absent.pop(user, None)
            resident.checked_at, resident.unusable = time.monotonic(), bad.version
            return self._lease(resident)
        if bad.older_tried or bad.version is None:
            return lease
        return await self._older(user, bad) or lease

    async def _older(self, user: str, bad: _Absent) -> Lease | None:
        """The newest loadable of the user's few versions before the bad one (None: none loads)."""
        try:
            versions = await asyncio.to_thread(self.store.list_versions, self.task, user)
        except (StoreError, OSError):
            return None
        before = versions[:versions.index(bad.version)] if bad.version in versions else versions
        for candidate in reversed(before[-_OLDER_TRIED:]):
            lease = await self._load_one(user, candidate, count_errors=False)
            if lease.entry is not None:
                lease.entry.unusable, lease.fallback = bad.version, NEWER_UNUSABLE
                return lease
        self._remember_absent(user, bad.fallback, bad.version, older_tried=True)
        return None

    async def _load_one(self, user: str, version: str | None, *, count_errors: bool = True) -> Lease:
        """One version into a slot; the base's lease, saying why, if it is unusable."""
        start, began = time.monotonic(), self._invalidations
        failed = self._absent.get(user)
        try:  # the pointer, the fetch and the parse in one thread: each hop waits for the event loop
            version, read = await asyncio.to_thread(self._fetch, user, version,
                                                    failed.version if failed is not None else None)
            if read is None:  # still the bad one: not fetched again
                self._remember_absent(user, failed.fallback, version, failed.older_tried)
                return Lease(BASE_SLOT, None, fallback=failed.fallback)
            if isinstance(read, Exception):
                raise read
            state, scale = read
            slot = await self._reserve()
        except NotFoundError:
            self.cache.remove(user)
            self._remember_absent(user)
            return Lease(BASE_SLOT, None)
        except Exception as e:  # noqa: BLE001 - any unusable adapter means: answer with the base
            return self._failed(user, version, e, count_errors)
        try:  # in a thread too: the slot is no running row's, so the fill overlaps the step under way
            await asyncio.to_thread(self.bank.load_slot, slot, state, scale)
        except (KeyError, ValueError) as e:
            self.cache.cancel(slot, self.slot_bytes)
            return self._failed(user, version, e, count_errors)
        self._absent.pop(user, None)
        entry = self.cache.insert(user, version, slot, self.slot_bytes)
        elapsed = time.monotonic() - start
        self.metrics.adapter_loads.inc()
        self.metrics.load_latency.observe(elapsed)
        log.debug("loaded the adapter of user %r (version %s) into slot %d in %.0f ms",
                  user, version, slot, elapsed * 1000)
        lease = self._lease(entry, loaded_ms=elapsed * 1000)
        if self._invalidated.get(user, -1) >= began:  # invalidated while it loaded: this request only
            self.cache.remove(user)
        self.metrics.resident.set(len(self.cache))
        return lease

    def _fetch(self, user: str, version: str | None, bad: str | None
               ) -> tuple[str | None, tuple[dict, float] | Exception | None]:
        """(In a thread.) The version to load (None: the latest) and its weights and scale; None instead
        of them if the latest is `bad`, the version known unusable; the error if it is unusable now."""
        if version is None:  # named first, so that a failure below knows which version failed
            version = self.store.latest_version(self.task, user)
            if version is None:
                raise NotFoundError(f"no adapter for user {user!r}")
            if version == bad:
                return version, None
        try:
            return version, self._read(user, version)
        except Exception as e:  # noqa: BLE001 - the caller decides what an unusable version means
            return version, e

    def _read(self, user: str, version: str) -> tuple[dict, float]:
        files, _ = self.store.fetch_bytes(self.task, user, version, expect_base=self.base_fp)
        return parse_adapter(files["adapter_config.json"], files["adapter_model.safetensors"],
                             self.bank.config.r, f"adapter of user {user!r} ({version})")

    async def _reserve(self) -> int:
        """A slot for one more adapter, waiting while running batches pin every slot."""
        async with self._freed:
            while True:
                before = self.cache.evictions
                slot = self.cache.reserve(self.slot_bytes)
                self.metrics.adapter_evictions.inc(self.cache.evictions - before)
                if slot is not None:
                    return slot
                await self._freed.wait()

    def _failed(self, user: str, version: str | None, error: Exception, count: bool = True) -> Lease:
        """Log and count an unusable version (once: it is remembered); what answers instead is _load's choice."""
        reason = ("corrupt" if isinstance(error, CorruptAdapterError) else
                  "foreign" if isinstance(error, ForeignAdapterError) else
                  "store" if isinstance(error, (StoreUnavailableError, OSError)) else "incompatible")
        fallback = "store-unavailable" if reason == "store" else reason
        if count:
            self.metrics.adapter_errors.labels(reason=reason).inc()
            log.error("the adapter of user %r (version %s) is unusable (%s): %s",
                      user, version or "latest", reason, error)
        if reason != "store":  # a store outage is retried on the next request
            self._remember_absent(user, fallback, version)
        return Lease(BASE_SLOT, None, fallback=fallback)

    def invalidate(self, user: str) -> bool:
        """Forget the user's loaded adapter: the next request re-reads the store.

        A request already running keeps its (pinned) slot to the end; a load that began before
        this call answers the request that waited for it and is then dropped.
        """
        self._absent.pop(user, None)
        self._invalidated[user] = self._invalidations
        self._invalidated.move_to_end(user)
        self._invalidations += 1
        while len(self._invalidated) > _MAX_REMEMBERED:
            self._invalidated.popitem(last=False)
        removed = self.cache.remove(user)
        self.metrics.resident.set(len(self.cache))
        return removed

    async def delete(self, user: str) -> int:
        """Delete the user's data from the store (`delete_user_data`) and from this replica; versions removed."""
        try:
            removed = await asyncio.to_thread(delete_user_data, self.store, self.task, user)
        finally:
            self.invalidate(user)
        return removed

    def resident(self) -> list[str]:
        return self.cache.users()
