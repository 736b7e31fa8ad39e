"""Which users' adapters sit in which bank slots: an LRU bounded by count and bytes.

Pure bookkeeping, no I/O and no tensors, so it is unit-tested alone. An entry
is pinned while a batch that uses its slot is queued or running; a pinned entry
is never evicted, and one replaced or removed while pinned is *retired*: its
slot and bytes come back only when its last pin goes. So a new version or a
deletion never changes weights under a running forward.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class Entry:
    """One adapter in the bank."""

    user: str
    version: str
    slot: int
    nbytes: int
    checked_at: float = field(default_factory=time.monotonic)
    """When the store's pointer last said this version is current."""
    pins: int = 0
    retired: bool = False
    unusable: str | None = None
    """A newer version that failed to load: this older one answers until the pointer moves on."""


class SlotCache:
    """LRU map from user to `Entry` over a fixed set of slots and a byte budget."""

    def __init__(self, slots: list[int], max_bytes: int):
        if not slots:
            raise ValueError("the cache needs at least one slot")
        self.max_bytes = max_bytes
        self._free = list(reversed(slots))
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user: str) -> bool:
        return user in self._entries

    def users(self) -> list[str]:
        """Resident users, least recently used first."""
        return list(self._entries)

    def get(self, user: str) -> Entry | None:
        """The user's entry, now the most recently used; None if not resident."""
        entry = self._entries.get(user)
        if entry is not None:
            self._entries.move_to_end(user)
        return entry

    def reserve(self, nbytes: int) -> int | None:
        """A free slot with room for `nbytes` more, evicting unpinned LRU entries.

        None when pinned entries hold everything (try again after an unpin).
        Raises ValueError if `nbytes` could never fit.
        """
        if nbytes > self.max_bytes:
            raise ValueError(f"an adapter of {nbytes} bytes exceeds the cache budget of {self.max_bytes} bytes")
        for user, entry in list(self._entries.items()):
            if self._free and self.bytes + nbytes <= self.max_bytes:
                break
            if entry.pins == 0:
                self._drop(user)
                self.evictions += 1
        if not self._free or self.bytes + nbytes > self.max_bytes:
            return None
        self.bytes += nbytes  # held for the slot until insert() or cancel()
        return self._free.pop()

    def cancel(self, slot: int, nbytes: int) -> None:
        """Give back a reserved slot that was not filled (the load failed)."""
        self.bytes -= nbytes
        self._free.append(slot)

    def insert(self, user: str, version: str, slot: int, nbytes: int) -> Entry:
        """Record a filled reserved slot; the user's previous entry, if any, is removed."""
        self.remove(user)
        entry = Entry(user, version, slot, nbytes)
        self._entries[user] = entry
        return entry

    def remove(self, user: str) -> bool:
        """Forget a user (invalidation, deletion); their slot frees once unpinned."""
        if user not in self._entries:
            return False
        self._drop(user)
        return True

    def pin(self, entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if entry.retired and entry.pins == 0:
            self._release(entry)

    def _drop(self, user: str) -> None:
        entry = self._entries.pop(user)
        entry.retired = True
        if entry.pins == 0:
            self._release(entry)

    def _release(self, entry: Entry) -> None:
        self.bytes -= entry.nbytes
        self._free.append(entry.slot)
