"""Each user answered by the method that won on their validation split (the task's selection record).

A fit publishes the record (`peftu.fitting.selection.select_fitted`; schema in
`peftu.store.selection`); every replica keeps the latest one in memory and
re-reads the store's pointer once it is older than `version_ttl_s` (in the
background, as adapters are), or at the next request after an admin
invalidate or delete reached it. A record chosen for another users' base (its
`users_base` is not the base this replica serves) is not used. Per user:

- `base` / `global`: the replica's base answers, the user's adapter is not
  loaded. A replica holds one base: the plain one, or OPPU's merged one where
  the task's users were fitted on it. So on a plain replica `global` is
  answered by the plain base, on an OPPU replica `base` by the merged one
  (the header says so);
- `oppu` / `adapter` (the user's own adapter on OPPU's merged base / on the
  plain base): the user's adapter, as without a record;
- `majority`: on `/v1/score` the user's usual label is the answer and the
  user's label prior gives the scores (no model runs); a generation is
  answered as without a record (the model has no "usual answer" to write);
- `neighbors`: on `/v1/score` the user's labels on their training texts
  nearest the request's (`peftu.serving.neighbors`; the model answers if
  their index cannot be read); a generation is answered as without a record;
- `pplug`: the base with PPlug's soft tokens from the user's history, their
  adapter not loaded (a replica without `pplug` on, or a user without cached
  history, gets the base alone);
- `profile+oppu` / `profile+adapter`: the user's adapter, and on `/v1/score`
  their profile (from the record) on its own line in front of the prompt; a
  generation is the adapter alone (the client wrote its prompt);
- `retrieval+oppu` / `retrieval+adapter`: the same with the user's nearest
  labelled training texts, each with its label (from their `neighbors`
  index), in front of the prompt; without an index the adapter alone;
- `<model>+prior`: that model, and on `/v1/score` each label ranked by
  ``log p(label | text) + w * log prior_user(label)``; a generation has no
  labels to rank, so it is the model alone.

Every answer says what answered in `x-peftu-method`, and where that is not
what the user's record chose (an adapter that did not load, a prior that does
not know the request's labels, a generation for a `+prior` winner), the
choice in `x-peftu-selected`. A user without a record (or not in it) is
answered exactly as before: their adapter if they have one, else the base.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from peftu.errors import StoreError
from peftu.inference.generate import BASE_SLOT
from peftu.pplug.encoder import HistoryEncoder
from peftu.serving.adapters import Lease
from peftu.serving.neighbors import NeighborsServer
from peftu.store import AdapterStore
from peftu.store.kinds import SELECTION, TASK_ADAPTER
from peftu.store.selection import MAJORITY, PRIOR, PROFILE, RETRIEVAL, Selection, UserChoice, calibrated, read_selection

log = logging.getLogger("peftu.serving")

BASE_MODELS = ("base", "global")
"""Winners answered by the replica's base, without the user's adapter."""
NEIGHBORS = "neighbors"
"""The winner that scores labels by the user's labels on their nearest training texts (`peftu.neighbors`)."""
PPLUG = "pplug"
"""The winner answered by the base with PPlug's soft tokens from the user's history, without their adapter."""


def serves_merged(store: AdapterStore, task: str, users_fp: str) -> bool:
    """Is the replica's base OPPU's merged one (a version of the task adapter makes `users_fp`)?"""
    from peftu.model.bases import merged_fingerprint

    ref = TASK_ADAPTER.of(task)
    try:
        return any(merged_fingerprint(m.base_fingerprint, m) == users_fp
                   for m in (store.artifact_manifest(ref, v) for v in store.artifact_versions(ref)))
    except (StoreError, OSError) as e:
        log.warning("cannot tell whether task %r is served on OPPU's merged base (%s): taking the plain base", task, e)
        return False


@dataclass
class Scored:
    """A `/v1/score` answer: the label, each label's entry, the lease (for the adapter headers), the method."""

    label: str
    scores: list[dict]
    lease: Lease
    headers: dict[str, str]


@dataclass
class Route:
    """How one request is answered: the user who asked, their choice (None: no record), the replica's base."""

    asked: str | None
    choice: UserChoice | None
    merged: bool
    neighbors: NeighborsServer | None = None

    @property
    def user(self) -> str | None:
        """Whom the engine answers as: None (the base's slot) for a base or global winner."""
        return None if self.choice is not None and self.choice.model in BASE_MODELS else self.asked

    @property
    def adapter(self) -> bool:
        """Whether the user's adapter is loaded: not for a base, global or PPlug winner."""
        return self.choice is None or self.choice.model not in (*BASE_MODELS, PPLUG)

    def used(self, lease: Lease, via: str = "") -> str:
        """What answered, in the record's names (`via`: the prefix of what was in front of the prompt)."""
        name = (("oppu" if self.merged else "adapter") if lease.version is not None else
                "pplug" if lease.pplug else "global" if self.merged else "base")
        return via + name

    def headers(self, used: str) -> dict[str, str]:
        """`x-peftu-method`, and `x-peftu-selected` where the record chose something else."""
        out = {"x-peftu-method": used}
        if self.choice is not None and self.choice.method != used:
            out["x-peftu-selected"] = self.choice.method
        return out

    def generation_headers(self, lease: Lease) -> dict[str, str]:
        return self.headers(self.used(lease))

    def _majority(self, labels: list[str]) -> list[float] | None:
        """The user's prior as the labels' scores, where `majority` won and knows every label asked about."""
        c = self.choice
        if c is None or c.method != MAJORITY or c.answer not in labels:
            return None
        return calibrated(labels, [0.0] * len(labels), c.log_prior, 1.0)

    async def _context(self, engine, text: str) -> tuple[str, str]:
        """What goes before the prompt and its candidate prefix: the record's profile for a `profile+`
        winner, the user's nearest labelled texts for a `retrieval+` one (none without their index)."""
        c = self.choice
        if c is not None and c.model.startswith(RETRIEVAL) and self.neighbors is not None:
            shown = await self.neighbors.retrieved(self.asked, text, engine.spec)
            return (shown, RETRIEVAL) if shown else ("", "")
        if c is not None and c.model.startswith(PROFILE) and c.profile:
            return c.profile, PROFILE
        return "", ""

    async def score(self, engine, text: str, labels: list[str]) -> Scored:
        """The labels ranked for this user as their choice says (see the module doc)."""
        prior = self._majority(labels)
        if prior is not None:
            return Scored(self.choice.answer, [{"label": lab, "logprob": p} for lab, p in zip(labels, prior)],
                          Lease(BASE_SLOT, None), self.headers(MAJORITY))
        c = self.choice
        voted = (await self.neighbors.scores(self.asked, text, labels)
                 if c is not None and c.model == NEIGHBORS and self.neighbors is not None else None)
        if voted is not None:
            scores, lease, used = voted, Lease(BASE_SLOT, None), NEIGHBORS
        else:
            context, via = await self._context(engine, text)
            scores, lease = await engine.score(self.user, text, labels, adapter=self.adapter, context=context)
            used = self.used(lease, via)
        ranked = calibrated(labels, scores, c.log_prior, c.prior_weight) if (
            c is not None and c.uses_prior and used == c.model) else None
        entries = [{"label": lab, "logprob": s} for lab, s in zip(labels, scores)]
        if ranked is not None:
            entries = [e | {"score": r} for e, r in zip(entries, ranked)]
        by = ranked if ranked is not None else scores
        best = max(range(len(labels)), key=by.__getitem__)
        return Scored(labels[best], entries, lease, self.headers(used + PRIOR if ranked is not None else used))


class Selections:
    """One replica's copy of the task's selection record, kept fresh like adapter versions."""

    def __init__(self, store: AdapterStore, task: str, users_fp: str, *, ttl_s: float, device: str = "cpu",
                 encoder: HistoryEncoder | None = None):
        """`encoder`: the replica's sentence encoder if it has one loaded (PPlug's), else loaded on `device`
        at the first `neighbors` request."""
        self.store, self.task, self.users_fp, self.ttl_s = store, task, users_fp, ttl_s
        self.merged = serves_merged(store, task, users_fp)
        self.neighbors = NeighborsServer(store, task, ttl_s=ttl_s, device=device, encoder=encoder)
        self._record = Selection()
        self._users: dict[str, UserChoice] = {}
        self._asked = 0  # invalidations so far
        self._read = -1  # the invalidations there had been when the last read began (-1: never read)
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._background: asyncio.Task | None = None

    def invalidate(self) -> None:
        """Read the store's record again before the next request is answered."""
        self._asked += 1

    def forget(self, user: str) -> None:
        """The user's data changed or went: read the record again, and their neighbours when next asked."""
        self.invalidate()
        self.neighbors.forget(user)

    async def route(self, user: str | None) -> Route:
        if user is None:
            return Route(None, None, self.merged, self.neighbors)
        if self._read < self._asked:  # never read, or invalidated since: this request waits for the store
            async with self._lock:
                if self._read < self._asked:
                    await self._refresh()
        elif time.monotonic() - self._read_at >= self.ttl_s and self._background is None:
            self._background = asyncio.get_running_loop().create_task(self._refresh_later())
        return Route(user, self._users.get(user), self.merged, self.neighbors)

    async def _refresh_later(self) -> None:
        try:
            async with self._lock:
                await self._refresh()
        finally:
            self._background = None

    async def _refresh(self) -> None:
        """Re-read the pointer, and the record if it names a new version; a store that fails keeps the old."""
        began = self._asked
        try:
            version = await asyncio.to_thread(self.store.latest_artifact, SELECTION.of(self.task))
            if version != self._record.version:
                record = Selection() if version is None else await asyncio.to_thread(
                    read_selection, self.store, self.task, version)
                self._record, self._users = record, self._usable(record)
        except (StoreError, OSError) as e:
            log.warning("cannot read the selection record of task %r (%s): answering as its last one says",
                        self.task, e)
        self._read, self._read_at = began, time.monotonic()

    def _usable(self, record: Selection) -> dict[str, UserChoice]:
        if record.users_base not in (None, self.users_fp):
            log.warning("the selection record of task %r (version %s) was chosen for another users' base (%s, "
                        "this replica serves %s): not used; a fit on this base writes a new one",
                        self.task, record.version, record.users_base[:12], self.users_fp[:12])
            return {}
        log.info("selection record of task %r: version %s, %d users", self.task, record.version, len(record.users))
        return record.users
