"""Deleting a user for good: every artifact of theirs, and their entry in the task's selection record.

Below serving and the CLI (which must not load torch to delete): a replica's
`DELETE /admin/users/<id>` and `peftu store delete` both call `delete_user_data`.
"""

from __future__ import annotations

from peftu.errors import NotFoundError
from peftu.store.adapter_store import AdapterStore
from peftu.store.kinds import EMBEDDINGS, NEIGHBORS, SELECTION

PER_USER_DATA = (EMBEDDINGS, NEIGHBORS)
"""The kinds besides the adapter that hold what a user's data made: PPlug's embeddings of their history,
their labelled neighbours."""


def delete_user_data(store: AdapterStore, task: str, user: str) -> int:
    """Remove every version of the user's adapter, their cached PPlug history embeddings, their labelled
    neighbours and their entry in the selection record (`forget_selected`); adapter versions removed.
    NotFoundError if the user has no adapter."""
    removed = store.delete_user(task, user)
    for kind in PER_USER_DATA:
        try:
            store.delete_artifact(kind.of(task, user))
        except NotFoundError:
            pass
    forget_selected(store, task, user)
    return removed


def forget_selected(store: AdapterStore, task: str, user: str) -> None:
    """The task's selection record without the user's entry (their scores, label prior and profile), and
    no older version that still holds it."""
    ref = SELECTION.of(task)
    try:
        record = store.get_record(ref)
    except NotFoundError:
        return
    if user in record.get("users", {}):
        store.put_record(ref, record | {"users": {u: c for u, c in record["users"].items() if u != user}})
    store.gc_versions(task, keep=1, kind=SELECTION)  # older versions may name them too
