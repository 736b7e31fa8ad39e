"""What every method of the benchmark is given: the task, its users, the base, a store and the settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.store import AdapterStore
from peftu.store.kinds import quality_task

PerUser = dict[str, dict[str, float]]
"""A method's result: each user's test metrics, by user id."""


@dataclass
class QualityContext:
    """The run's task and users, the base, the store and the settings, shared by every method."""

    spec: TaskSpec
    users: list[UserRecord]
    base_path: str
    store: AdapterStore
    hp: LoraHParams
    store_uri: str = ""
    """The store's URI, for Ray Train workers (PPlug's fit) that open it themselves."""
    endpoint_url: str | None = None
    k: int = 4
    pplug_steps: int = 300
    """PPlug's `min_steps`: the fewest steps its plug is fitted for."""
    progress: bool = True
    log: Callable[[str], None] = print
    notes: dict = field(default_factory=dict)
    """What methods leave for the results beside their rows (`selected`'s per-user choices)."""
    _base: tuple | None = field(default=None, repr=False)

    def base(self) -> tuple[torch.nn.Module, object]:
        """The plain base and its tokenizer, loaded once (methods hand it back unchanged)."""
        if self._base is None:
            from peftu.model.base import load_base

            self._base = load_base(self.base_path)
        return self._base

    def store_spec(self, spec: TaskSpec, stage: str = "") -> TaskSpec:
        """`spec` under the benchmark's own store name, so real adapters of the task are never touched."""
        return spec.model_copy(update={"name": quality_task(spec.name, stage)})
