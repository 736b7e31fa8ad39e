"""The pooled fit: one task adapter on every training user (OPPU's first stage, and the global baseline).

OPPU (One PEFT Per User) first fits a LoRA on the pooled training data of all
users, merges it into the base, and only then fits each user's own adapter on
top. Users' adapters therefore belong to the *merged* base, and their
manifests say so: the base fingerprint they carry covers the base and the task
adapter's weights, so an adapter is never used on a base it was not trained on.
The same adapter, used alone, is the non-personal baseline (`bench quality`'s
`global` row): one pooled fit serves both.

The task adapter is kept in the store as its own kind (`kinds.TASK_ADAPTER`,
PEFT's format), with the same fingerprints as users' adapters, so a re-run
reuses it when base, data and hyper-parameters are unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.store import AdapterStore, Manifest
from peftu.store.current import data_fingerprint, folder_files, is_current
from peftu.store.kinds import TASK_ADAPTER

log = logging.getLogger("peftu.oppu")

POOLED = "pooled"
"""The id of the one row of the pooled fit's bank (every user's examples together)."""


def ensure_task_adapter(base_path: str, spec: TaskSpec, users: list[UserRecord], user_hp: LoraHParams,
                        store: AdapterStore, epochs: int = 1) -> Manifest:
    """The current task adapter of `spec` in the store: fitted and published unless it exists already.

    It takes the users' hyper-parameters but its own number of epochs: it sees
    every user's examples, so one pass is usually enough.
    """
    from peftu.fitting.banked import fit_pack
    from peftu.model.base import base_fingerprint, load_base

    hp = user_hp.model_copy(update={"epochs": epochs})
    ref, base_fp = TASK_ADAPTER.of(spec.name), base_fingerprint(base_path)
    pooled = UserRecord(POOLED, train=[e for u in users for e in u.train])
    data_fp = data_fingerprint(spec, pooled.train)
    if is_current(store, ref, base_fp=base_fp, data_fp=data_fp, hp=hp):
        log.info("task adapter of %s is current, reusing it", spec.name)
        return store.artifact_manifest(ref)
    if not pooled.train:
        raise ValueError(f"task {spec.name!r} has no training examples for a task adapter")
    log.info("fitting the task adapter of %s on %d examples of %d users", spec.name, len(pooled.train), len(users))
    model, tokenizer = load_base(base_path)
    packed = fit_pack(model, tokenizer, spec, [pooled], hp)
    with tempfile.TemporaryDirectory() as folder:
        packed.bank.export_slot(0, Path(folder))
        losses = packed.results[POOLED].losses
        return store.publish_artifact(ref, folder_files(folder), base_fingerprint=base_fp, data_fingerprint=data_fp,
                                      hparams=hp.model_dump(), metrics={"first_loss": losses[0],
                                                                        "final_loss": losses[-1]})
