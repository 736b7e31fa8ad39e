"""Which base a task's users' adapters belong to: the plain base, or OPPU's base with the task adapter merged in.

Every reader of users' adapters asks here: evaluation, serving, the fit
workers. A user's manifest names the base it was fitted on by fingerprint;
OPPU's merged base has a fingerprint of its own (the base's and the task
adapter's weights), so the store itself says which base, and which version of
the task adapter, a task's users were fitted on. Nobody has to be told.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from peftu.errors import NotFoundError, StoreError
from peftu.store import AdapterStore, Manifest, fingerprint
from peftu.store.kinds import TASK_ADAPTER

log = logging.getLogger("peftu.bases")

USERS_LOOKED_AT = 16
"""Users whose manifests `users_task_adapter` reads, at most, to find one fitted on a base it knows."""


def merged_fingerprint(base_fp: str, task_adapter: Manifest) -> str:
    """What users' adapters of an OPPU run are trained on: the base and the task adapter's weights."""
    return fingerprint({"base": base_fp, "task_adapter": task_adapter.files})


def users_task_adapter(store: AdapterStore, task: str, base_fp: str, *, oppu: bool | None = None
                       ) -> Manifest | None:
    """The OPPU task adapter whose merged base `task`'s users' adapters belong to; None: the plain base.

    `oppu` None asks the store: the first user (of the first `USERS_LOOKED_AT`)
    whose adapter was fitted on the plain base or on the base merged with one of
    the task adapter's versions decides; with no users' adapters yet, the latest
    task adapter on this base (an OPPU run publishes it first). True: the latest
    task adapter (what a new OPPU fit trains on); False: the plain base.
    """
    if oppu is False:
        return None
    ref = TASK_ADAPTER.of(task)
    if oppu:
        try:
            return store.artifact_manifest(ref)
        except NotFoundError:
            raise NotFoundError(f"{store} has no OPPU task adapter for task {task!r} "
                                f"(`peftu fit --oppu` fits one)") from None
    merged = {}
    for version in reversed(store.artifact_versions(ref)):  # newest first
        manifest = store.artifact_manifest(ref, version)
        if manifest.base_fingerprint == base_fp:
            merged[merged_fingerprint(base_fp, manifest)] = manifest
    if not merged:
        return None
    for user in store.list_users(task)[:USERS_LOOKED_AT]:
        try:
            fitted_on = store.manifest(task, user).base_fingerprint
        except StoreError as e:  # one unreadable manifest decides nothing
            log.warning("cannot read the manifest of user %r in task %r: %s", user, task, e)
            continue
        if fitted_on == base_fp:
            return None
        if fitted_on in merged:
            return merged[fitted_on]
    return next(iter(merged.values()))


def load_merged_base(base_path: str, store: AdapterStore, task: str, dtype: torch.dtype = torch.float32,
                     version: str | None = None):
    """The base with a version of the task's adapter (default: the latest) merged in:
    (model, tokenizer, fingerprint of the merged base)."""
    from peftu.model.base import base_fingerprint

    return _load_merged(base_path, base_fingerprint(base_path), store, task, dtype, version)


def _load_merged(base_path: str, base_fp: str, store: AdapterStore, task: str, dtype: torch.dtype,
                 version: str | None):
    from peft import PeftModel

    from peftu.model.base import load_base

    model, tokenizer = load_base(base_path, dtype)
    with tempfile.TemporaryDirectory() as folder:
        try:
            _, manifest = store.fetch_artifact(TASK_ADAPTER.of(task), version, dest=Path(folder),
                                               expect_base=base_fp)
        except NotFoundError:
            raise NotFoundError(f"{store} has no OPPU task adapter for task {task!r} "
                                f"(`peftu fit --oppu` fits one)") from None
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return model, tokenizer, merged_fingerprint(base_fp, manifest)


def load_users_base(base_path: str, store: AdapterStore, task: str, *, oppu: bool | None = None,
                    dtype: torch.dtype = torch.float32):
    """The base `task`'s users' adapters belong to (`users_task_adapter` decides; see there for `oppu`):
    (model, tokenizer, fingerprint), the fingerprint being what their manifests must carry."""
    from peftu.model.base import base_fingerprint, load_base

    base_fp = base_fingerprint(base_path)
    task_adapter = users_task_adapter(store, task, base_fp, oppu=oppu)
    if task_adapter is None:
        log.info("users' adapters of %s belong to the plain base %s", task, base_path)
        return *load_base(base_path, dtype), base_fp
    log.info("users' adapters of %s belong to the base merged with OPPU's task adapter (version %s)",
             task, task_adapter.version)
    return _load_merged(base_path, base_fp, store, task, dtype, task_adapter.version)
