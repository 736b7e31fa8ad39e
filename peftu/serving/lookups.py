"""Per-user reads from the store that a replica keeps for a while: a bounded LRU with a time to live.

PPlug's history embeddings and the labelled neighbours of users whose winner
is `neighbors` are read the same way: once per user and TTL (absence too, so
a user without any costs one read per TTL), forgotten on an invalidate or a
delete, and a store that cannot be read answers None (the caller falls back)
without being remembered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from peftu.errors import StoreError

log = logging.getLogger("peftu.serving")
T = TypeVar("T")


class UserLookups(Generic[T]):
    """`read(user)` per user, kept `ttl_s` seconds, at most `max_users` (least recently used go first)."""

    def __init__(self, read: Callable[[str], T | None], what: str, fallback: str, *, ttl_s: float,
                 max_users: int = 10_000):
        self.read, self.what, self.fallback, self.ttl_s, self.max_users = read, what, fallback, ttl_s, max_users
        self._kept: OrderedDict[str, tuple[float, T | None]] = OrderedDict()
        self._lock = threading.Lock()  # lookups run in worker threads

    def get(self, user: str) -> T | None:
        now = time.monotonic()
        with self._lock:
            hit = self._kept.get(user)
            if hit is not None and now - hit[0] < self.ttl_s:
                self._kept.move_to_end(user)
                return hit[1]
        try:
            found = self.read(user)
        except (StoreError, OSError) as e:
            log.warning("cannot read the %s of user %r, %s: %s", self.what, user, self.fallback, e)
            return None
        with self._lock:
            self._kept[user] = (now, found)
            self._kept.move_to_end(user)
            while len(self._kept) > self.max_users:
                self._kept.popitem(last=False)
        return found

    def forget(self, user: str) -> None:
        """Drop what is kept for the user (deleted or invalidated): the next lookup reads the store."""
        with self._lock:
            self._kept.pop(user, None)
