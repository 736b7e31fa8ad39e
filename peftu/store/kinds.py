"""Every kind of artifact the store keeps, where each lives, and the one place namespaces are spelled.

A kind says where its artifacts live (a top folder, then the task, then, for
kinds with one artifact per user or per name, that id), which files every
version must have, and which manifest fields must be set (the fingerprints a
re-run compares). A `Ref` names one artifact: a kind and its ids. Every kind is
published and read by the same protocol (`adapter_store`); docs/store.md shows
the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftu.store.ids import validate_id

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""PEFT's interchange pair: what `PeftModel.from_pretrained` (and vLLM, LoRAX) load."""

_OWNER_WORDS = {"user_id": "user id", "name": "record name"}
"""How messages call the id that names one artifact of a task."""

_FITTED = ("base_fingerprint", "data_fingerprint", "hparams", "hparams_fingerprint")
"""What a fitted artifact's manifest must say: re-runs compare these to skip a fit."""


@dataclass(frozen=True)
class Kind:
    """One kind of artifact: its folder, its files, and what its manifest must carry."""

    name: str
    """As manifests write it ("task-adapter")."""
    what: str
    """For messages ("task adapter")."""
    root: str
    """The store folder holding this kind, "/"-separated."""
    files: tuple[str, ...]
    """Files every version must have (.json ones hold a JSON object)."""
    owner: str | None = None
    """The manifest field naming one artifact of a task ("user_id", "name"), or None: one per task."""
    needs: tuple[str, ...] = ()
    """Manifest fields every version must set."""

    def of(self, task: str, owner: str | None = None) -> Ref:
        """The artifact of this kind for `task` (and the user or name `owner`, where the kind has one)."""
        return Ref(self, task, owner)


@dataclass(frozen=True)
class Ref:
    """One artifact of the store: a kind, a task and, where the kind has one, a user id or a name.

    Its ids are checked when it is made, so a Ref always gives a safe key.
    """

    kind: Kind
    task: str
    owner: str | None = None

    def __post_init__(self) -> None:
        validate_id(self.task, "task name")
        if self.kind.owner is None:
            if self.owner is not None:
                raise ValueError(f"a {self.kind.what} belongs to a task, not to {self.owner!r}")
        else:
            validate_id(self.owner, _OWNER_WORDS[self.kind.owner])  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        """The folder of this artifact in the store: its versions and its LATEST pointer."""
        parts = [self.kind.root, self.task] + ([self.owner] if self.owner is not None else [])
        return "/".join(parts)

    def identity(self) -> dict[str, str | None]:
        """The manifest fields that say which artifact a manifest belongs to."""
        owner = self.kind.owner
        return {"kind": self.kind.name, "task": self.task,
                "user_id": self.owner if owner == "user_id" else None,
                "name": self.owner if owner == "name" else None}

    def __str__(self) -> str:
        if self.kind.owner == "user_id":
            return f"{self.kind.what} of user {self.owner!r} in task {self.task!r}"
        if self.kind.owner == "name":
            return f"{self.kind.what} {self.owner!r} of task {self.task!r}"
        return f"{self.kind.what} of task {self.task!r}"


ADAPTER = Kind("adapter", "adapter", "adapters", PEFT_FILES, "user_id", _FITTED)
"""A user's LoRA adapter: adapters/<task>/<user>/ (the layout servers and PEFT read)."""

TASK_ADAPTER = Kind("task-adapter", "task adapter", "task-adapters", PEFT_FILES, None, _FITTED)
"""One adapter on every user's training data pooled (OPPU's first stage, the global baseline)."""

PLUG = Kind("pplug", "PPlug plug", "pplug/plugs", ("plug.json", "plug.safetensors"), None,
            (*_FITTED, "encoder_fingerprint"))
"""PPlug's trained plug: plug.json its config and sizes, plug.safetensors its weights."""

EMBEDDINGS = Kind("pplug-embeddings", "PPlug history embeddings", "pplug/embeddings",
                  ("embeddings.json", "embeddings.safetensors"), "user_id",
                  ("encoder_fingerprint", "data_fingerprint"))
"""A user's history embedded by PPlug's encoder: embeddings.json the item ids, .safetensors the vectors."""

NEIGHBORS = Kind("neighbors", "labelled neighbours", "neighbors", ("neighbors.json", "neighbors.safetensors"),
                 "user_id", ("encoder_fingerprint", "data_fingerprint"))
"""A user's training texts embedded with their labels (`peftu.neighbors`): neighbors.json the labels,
.safetensors the vectors."""

RECORD_FILE = "record.json"

TUNE_RESULTS = Kind("tune-results", "tune results", "records/tune", (RECORD_FILE,), "name")
"""A Ray Tune search's trials and best configs (name: the run id, or "best")."""

QUALITY_RESULTS = Kind("quality-results", "quality results", "records/quality", (RECORD_FILE,), "name")
"""A `bench quality` report (name: when it ran)."""

RUN_SUMMARY = Kind("run-summary", "run summary", "records/runs", (RECORD_FILE,), "name")
"""A fit job's summary: who was fitted, skipped or failed (name: the run id)."""

TASK_SPEC = Kind("task-spec", "task spec", "records/task-specs", (RECORD_FILE,))
"""A task's TaskSpec (kind, prompt, labels) as its fit runs read it: what a replica serves it with."""

SELECTION = Kind("selection", "per-user selection", "records/selection", (RECORD_FILE,))
"""Who answers each user of a task, chosen on their validation split after a fit (`peftu.fitting.selection`)."""

KINDS = (ADAPTER, TASK_ADAPTER, PLUG, EMBEDDINGS, NEIGHBORS, TUNE_RESULTS, QUALITY_RESULTS, RUN_SUMMARY, TASK_SPEC, SELECTION)
"""Every kind, for what walks them all (`peftu store sweep`)."""

BEST = "best"
"""The tune results a fit applies by default (`peftu fit --config best`)."""


def quality_task(task: str, stage: str = "") -> str:
    """The task name the quality benchmark stores its artifacts under, so a task's real ones are never touched."""
    return f"quality.{task}{'.' + stage if stage else ''}"
