"""OPPU's first stage: one task adapter on every training user, merged into the base.

OPPU (One PEFT Per User) first fits a LoRA on the pooled training data of all
users, merges it into the base, and only then fits each user's own adapter on
top. Users' adapters therefore belong to the *merged* base, and their
manifests say so: the base fingerprint they carry covers the base and the task
adapter's weights, so an adapter is never used on a base it was not trained on.

The task adapter is kept in the store like any adapter, under the task
`<task>.task-adapter` and the id `all-users`, with the same fingerprints, so a
re-run reuses it when base, data and hyper-parameters are unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.store import AdapterStore, Manifest
from peftu.store.current import data_fingerprint, folder_files, is_current
from peftu.store.kinds import TASK_ADAPTER_USER, task_adapter_task

log = logging.getLogger("peftu.oppu")


def ensure_task_adapter(base_path: str, spec: TaskSpec, users: list[UserRecord], user_hp: LoraHParams,
                        store: AdapterStore, epochs: int = 1) -> Manifest:
    """The current task adapter of `spec` in the store: fitted and published unless it exists already.

    It takes the users' hyper-parameters but its own number of epochs: it sees
    every user's examples, so one pass is usually enough.
    """
    from peftu.fitting.banked import fit_pack
    from peftu.model.base import base_fingerprint, load_base

    hp = user_hp.model_copy(update={"epochs": epochs})
    key, base_fp = task_adapter_task(spec.name), base_fingerprint(base_path)
    pooled = UserRecord(TASK_ADAPTER_USER, train=[e for u in users for e in u.train])
    data_fp = data_fingerprint(spec, pooled.train)
    if is_current(store, key, TASK_ADAPTER_USER, base_fp=base_fp, data_fp=data_fp, hp=hp):
        log.info("task adapter of %s is current, reusing it", spec.name)
        return store.manifest(key, TASK_ADAPTER_USER)
    if not pooled.train:
        raise ValueError(f"task {spec.name!r} has no training examples for a task adapter")
    log.info("fitting the task adapter of %s on %d examples of %d users", spec.name, len(pooled.train), len(users))
    model, tokenizer = load_base(base_path)
    packed = fit_pack(model, tokenizer, spec, [pooled], hp)
    with tempfile.TemporaryDirectory() as folder:
        packed.bank.export_slot(0, Path(folder))
        losses = packed.results[TASK_ADAPTER_USER].losses
        return store.publish(key, TASK_ADAPTER_USER, folder_files(folder), base_fingerprint=base_fp,
                             data_fingerprint=data_fp, hparams=hp.model_dump(),
                             metrics={"first_loss": losses[0], "final_loss": losses[-1]})


