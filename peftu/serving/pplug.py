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

import torch

from peftu.errors import NotFoundError
from peftu.pplug.encoder import HistoryEncoder, cached_embeddings
from peftu.pplug.model import load_plug, soft_tokens
from peftu.serving.lookups import UserLookups
from peftu.store import AdapterStore


class PlugServer:
    """The served task's plug, the encoder, and an LRU of users' history embeddings."""

    def __init__(self, store: AdapterStore, task: str, base_fp: str, *, device: str, ttl_s: float,
                 max_users: int = 10_000):
        self.store, self.task = store, task
        self.encoder = HistoryEncoder(device=device)
        try:
            self.plug, manifest = load_plug(store, task, base_fp=base_fp, encoder_fp=self.encoder.fingerprint)
        except NotFoundError:
            raise ValueError(f"pplug is on but {store} has no PPlug for task {task!r}: "
                             f"fit one with `peftu pplug fit`") from None
        self.plug.to(device)
        self.version = manifest.version
        self.histories = UserLookups(lambda user: cached_embeddings(store, self.encoder.fingerprint, task, user),
                                     "history embeddings", "the base answers", ttl_s=ttl_s, max_users=max_users)

    def _soft_tokens(self, user: str, query: str) -> torch.Tensor | None:
        history = self.histories.get(user)
        if history is None or not history.ids:
            return None
        return soft_tokens(self.plug, self.encoder, [query], history)[0]

    def forget(self, user: str) -> None:
        """Drop the user's cached history (deleted or invalidated): the next request reads the store."""
        self.histories.forget(user)

    async def soft_tokens(self, user: str, query: str) -> torch.Tensor | None:
        """The user's soft tokens for this prompt, or None (no cached history: the base answers)."""
        return await asyncio.to_thread(self._soft_tokens, user, query)
