"""A task's prompt and labels in the store, so that whoever serves its adapters answers like its fits trained.

Every fit run publishes the `TaskSpec` it read (a record of kind `TASK_SPEC`,
one per task, written atomically like every version); a replica reads it back
when it is not given the data set. A run with the same spec as the latest
writes nothing.
"""

from __future__ import annotations

from pydantic import ValidationError

from peftu.data.schema import TaskSpec
from peftu.errors import NotFoundError, StoreError
from peftu.store.adapter_store import AdapterStore
from peftu.store.kinds import TASK_SPEC


def load_task_spec(store: AdapterStore, task: str) -> TaskSpec | None:
    """The spec the task's latest fit run published; None if no run has."""
    ref = TASK_SPEC.of(task)
    try:
        record = store.get_record(ref)
    except NotFoundError:
        return None
    try:
        return TaskSpec.model_validate(record)
    except ValidationError as e:
        raise StoreError(f"the {ref} in {store} is no valid task spec: {e}") from None


def publish_task_spec(store: AdapterStore, spec: TaskSpec) -> None:
    """Make `spec` the task's spec in the store (nothing is written if it already is)."""
    if load_task_spec(store, spec.name) != spec:
        store.put_record(TASK_SPEC.of(spec.name), spec.model_dump())
