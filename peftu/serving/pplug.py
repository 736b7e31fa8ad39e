"""PPlug in the server: users with cached history embeddings but no adapter get soft tokens.

At replica start the task's plug is loaded from the store (checked against the
served base and the encoder). A request for a user whom the base would answer
(no adapter) looks up the user's history embeddings in the store, where
`peftu pplug fit` and evaluation cached them (`kinds.EMBEDDINGS`); a
user who has them is answered with the plug's soft tokens after the
prompt, the others by the base. Embeddings (or their absence) are kept for the
version TTL, like adapters; a store that cannot be read means the base answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

import torch

from peftu.errors import NotFoundError, StoreError
from peftu.pplug.encoder import HistoryEmbeddings, HistoryEncoder, cached_embeddings
from peftu.pplug.model import load_plug, soft_tokens
from peftu.store import AdapterStore

log = logging.getLogger("peftu.serving")


class PlugServer:
    """The served task's plug, the encoder, and an LRU of users' history embeddings."""

    def __init__(self, store: AdapterStore, task: str, base_fp: str, *, device: str, ttl_s: float,
                 max_users: int = 10_000):
        self.store, self.task, self.ttl_s, self.max_users = store, task, ttl_s, max_users
        self.encoder = HistoryEncoder(device=device)
        try:
            self.plug, manifest = load_plug(store, task, base_fp=base_fp, encoder_fp=self.encoder.fingerprint)
        except NotFoundError:
            raise ValueError(f"pplug is on but {store} has no PPlug for task {task!r}: "
                             f"fit one with `peftu pplug fit`") from None
        self.plug.to(device)
        self.version = manifest.version
        self._histories: OrderedDict[str, tuple[float, HistoryEmbeddings | None]] = OrderedDict()
        self._lock = threading.Lock()  # lookups run in worker threads

    def _history(self, user: str) -> HistoryEmbeddings | None:
        now = time.monotonic()
        with self._lock:
            hit = self._histories.get(user)
            if hit is not None and now - hit[0] < self.ttl_s:
                self._histories.move_to_end(user)
                return hit[1]
        try:
            history = cached_embeddings(self.store, self.encoder.fingerprint, self.task, user)
        except (StoreError, OSError) as e:
            log.warning("cannot read the history embeddings of user %r, the base answers: %s", user, e)
            return None
        with self._lock:
            self._histories[user] = (now, history)
            self._histories.move_to_end(user)
            while len(self._histories) > self.max_users:
                self._histories.popitem(last=False)
        return history

    def _soft_tokens(self, user: str, query: str) -> torch.Tensor | None:
        history = self._history(user)
        if history is None or not history.ids:
            return None
        return soft_tokens(self.plug, self.encoder, [query], history)[0]

    def forget(self, user: str) -> None:
        """Drop the user's cached history (deleted or invalidated): the next request reads the store."""
        with self._lock:
            self._histories.pop(user, None)

    async def soft_tokens(self, user: str, query: str) -> torch.Tensor | None:
        """The user's soft tokens for this prompt, or None (no cached history: the base answers)."""
        return await asyncio.to_thread(self._soft_tokens, user, query)
