"""`/v1/score` for users whose winner is `neighbors` (their labels on their nearest training texts) or
`retrieval+` (those texts and labels before the prompt).

The fit published each such user's index (`peftu.neighbors`, store kind
`NEIGHBORS`); a replica reads it at the user's first score request (kept for
the version TTL, like adapters) and embeds only the request's text with the
sentence encoder, loaded at the first such request. No index, or one that
cannot be read, answers None: the caller asks the model instead.
"""

from __future__ import annotations

import asyncio
import threading

from peftu.data.schema import TaskSpec
from peftu.neighbors.index import LabelIndex, stored_index
from peftu.pplug.encoder import HistoryEncoder
from peftu.serving.lookups import UserLookups
from peftu.store import AdapterStore


class NeighborsServer:
    """The encoder (loaded once needed, or PPlug's where the replica has it) and an LRU of users' label
    indexes."""

    def __init__(self, store: AdapterStore, task: str, *, ttl_s: float, device: str = "cpu",
                 encoder: HistoryEncoder | None = None):
        self.device = device
        self._encoder = encoder
        self._lock = threading.Lock()
        self.indexes: UserLookups[LabelIndex] = UserLookups(
            lambda user: stored_index(store, self.encoder().fingerprint, task, user), "labelled neighbours",
            "the model answers", ttl_s=ttl_s)

    def encoder(self) -> HistoryEncoder:
        with self._lock:  # first requests may come at once, from worker threads
            if self._encoder is None:
                self._encoder = HistoryEncoder(device=self.device)
            return self._encoder

    def _scores(self, user: str, text: str, labels: list[str]) -> list[float] | None:
        index = self.indexes.get(user)
        if index is None or not index.labels:
            return None
        return index.scores(self.encoder().encode([text]), labels)[0]

    def _retrieved(self, user: str, text: str, spec: TaskSpec) -> str | None:
        index = self.indexes.get(user)
        if index is None or not index.texts:
            return None
        return index.retrieved(spec, self.encoder().encode([text]))[0]

    async def retrieved(self, user: str, text: str, spec: TaskSpec) -> str | None:
        """The user's nearest labelled texts as `spec` asks them, for before the prompt, or None (no index,
        or one stored without its texts)."""
        return await asyncio.to_thread(self._retrieved, user, text, spec)

    async def scores(self, user: str, text: str, labels: list[str]) -> list[float] | None:
        """Each label's log vote share among the user's nearest labelled texts, or None (no index)."""
        return await asyncio.to_thread(self._scores, user, text, labels)

    def forget(self, user: str) -> None:
        self.indexes.forget(user)
