"""Is a fitted artifact current, and publishing a user's adapter with the fingerprints that make re-runs skip it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from peftu.config import LoraHParams
from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.store import AdapterStore, Ref, fingerprint
from peftu.store.kinds import ADAPTER, PEFT_FILES


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """The standard PEFT pair from a saved adapter folder, as bytes for the store."""
    return {name: (Path(folder) / name).read_bytes() for name in PEFT_FILES}


def data_fingerprint(spec: TaskSpec, examples: list[Example]) -> str:
    """What an adapter learned from: the prompt template and the training examples."""
    return fingerprint({"prompt": spec.prompt, "train": [[e.id, e.input, e.output] for e in examples]})


def is_current(store: AdapterStore, ref: Ref, *, base_fp: str, data_fp: str, hp: BaseModel) -> bool:
    """Has `ref` a version fitted on the same base and data with the same settings (`hp`: LoRA's, the plug's)?"""
    version = store.latest_artifact(ref)
    if version is None:
        return False
    m = store.artifact_manifest(ref, version)
    return (m.base_fingerprint, m.data_fingerprint, m.hparams_fingerprint) == (
        base_fp, data_fp, fingerprint(hp.model_dump()))


def split_current(store: AdapterStore, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
                  base_fp: str) -> tuple[list[UserRecord], list[str]]:
    """Users that still need a fit, and the ids of those whose adapter is current.

    One read of the task's index (docs/store.md), not one per user: the index
    answers for every user whose pointer has not moved since it was compacted,
    and only the others' pointers are read.
    """
    hp_fp = fingerprint(hp.model_dump())
    fresh = store.current_owners(ADAPTER, spec.name, {
        u.user_id: (base_fp, data_fingerprint(spec, u.train), hp_fp) for u in users})
    return [u for u in users if u.user_id not in fresh], [u.user_id for u in users if u.user_id in fresh]


def publish_adapter(store: AdapterStore, spec: TaskSpec, user: UserRecord, files: dict[str, bytes],
                    hp: LoraHParams, base_fp: str, metrics: dict[str, float]) -> None:
    """A user's fitted adapter into the store, with the fingerprints that make re-runs skip it."""
    store.publish(spec.name, user.user_id, files, base_fingerprint=base_fp,
                  data_fingerprint=data_fingerprint(spec, user.train), hparams=hp.model_dump(),
                  metrics=metrics)
