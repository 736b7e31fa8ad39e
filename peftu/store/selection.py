"""A task's selection record: who answers each user, as a fit writes it and a replica reads it.

The record (store kind `SELECTION`, one per task) is written by
`peftu.fitting.selection.select_fitted` after a fit and read by serving,
which must not import the fitting code: so what a user's entry means lives
here, below both. ``{"task", "users_base": fingerprint, "plug": version, "strength": examples,
"users": {user_id: {"method", "val", "n_val", "prior_curves", "prior_weights",
"prior_weight", "log_prior", "answer", "profile"}}}``: `users_base` is the base the users' adapters
were fitted on (plain or OPPU's merged one), `plug` the task's PPlug plug
when it was chosen (None: none; a new one has everyone scored again), `strength` the
shrinkage the task's users were chosen at (for people), `method` the candidate chosen
on the user's validation split, `val`, `n_val`, `prior_curves` and
`prior_weights` what it was chosen by
(for the next fit's choice and for people; a replica ignores them),
`log_prior` and `answer` (the user's usual label) on label tasks,
`prior_weight` only where the winner is a `<model>+prior` candidate, and
`profile` (the user's profile, put in front of the prompt) only where it is a
`profile+<model>` one.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, TypeAdapter, ValidationError

from peftu.errors import StoreError
from peftu.store.adapter_store import AdapterStore
from peftu.store.kinds import RECORD_FILE, SELECTION

PRIOR = "+prior"
"""The suffix of a candidate that adds the user's label prior to a model's label scores."""
MAJORITY = "majority"
"""The candidate with no model: the user's usual answer."""
PROFILE = "profile+"
"""The prefix of a candidate that puts the user's profile (the entry's `profile`) in front of the prompt."""
RETRIEVAL = "retrieval+"
"""The prefix of a candidate that puts the user's nearest labelled training texts (from their
`neighbors` index) in front of the prompt."""


class UserChoice(BaseModel):
    """One user's entry of the record, as a replica needs it (the validation scores left out)."""

    method: str
    prior_weight: float | None = None
    log_prior: dict[str, float] = {}
    answer: str | None = None
    profile: str | None = None

    @property
    def model(self) -> str:
        """The model part of the winner ("oppu" of "oppu+prior")."""
        return self.method.removesuffix(PRIOR)

    @property
    def uses_prior(self) -> bool:
        return self.method.endswith(PRIOR) and self.prior_weight is not None and bool(self.log_prior)


_USERS = TypeAdapter(dict[str, UserChoice])


class Selection(BaseModel):
    """A parsed selection record: the users' base it was chosen for and each user's choice."""

    version: str | None = None
    users_base: str | None = None
    """None in records written before it was kept: such a record is taken to match any base."""
    users: dict[str, UserChoice] = {}


def calibrated(labels: list[str], scores: list[float], log_prior: dict[str, float], weight: float
               ) -> list[float] | None:
    """Each label's ``log p(label | text) + weight * log_prior[label]``, the score a `+prior` winner
    ranks labels by; None if a label has no prior (labels the selection never saw)."""
    if any(lab not in log_prior for lab in labels):
        return None
    return [s + weight * log_prior[lab] for lab, s in zip(labels, scores)]


def read_selection(store: AdapterStore, task: str, version: str) -> Selection:
    """One version of the task's selection record; a StoreError naming what is wrong with a bad one."""
    ref = SELECTION.of(task)
    files, _ = store.fetch_artifact_bytes(ref, version)
    try:
        raw = json.loads(files[RECORD_FILE])
        users = _USERS.validate_python(raw.get("users", {}))
    except (ValueError, AttributeError, ValidationError) as e:
        raise StoreError(f"the {ref} (version {version}) in {store} is no valid selection record: {e}") from None
    return Selection(version=version, users_base=raw.get("users_base"), users=users)
