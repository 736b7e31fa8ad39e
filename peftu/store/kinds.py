"""Every kind of thing the store keeps, and the one place their namespaces are spelled."""

from __future__ import annotations

TASK_ADAPTER_USER = "all-users"


def task_adapter_task(task: str) -> str:
    """Where a task's adapter lives in the store (a task name of its own: it is no user's)."""
    return f"{task}.task-adapter"


PLUG_USER = "all-users"


def plug_task(task: str) -> str:
    """Where a task's plug lives in the store (a task name of its own: it is no user's)."""
    return f"{task}.pplug"


def embeddings_task(task: str) -> str:
    """Where a task's history embeddings live in the store (a task name of their own)."""
    return f"{task}.pplug-embeddings"
