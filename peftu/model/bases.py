"""Which base a user's adapter belongs to: the plain base, or OPPU's base with the task adapter merged in."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from peftu.errors import NotFoundError
from peftu.store import AdapterStore, Manifest, fingerprint
from peftu.store.kinds import TASK_ADAPTER_USER, task_adapter_task


def load_users_base(base_path: str, store: AdapterStore, task: str, *, oppu: bool,
                    dtype: torch.dtype = torch.float32):
    """The base users' adapters of `task` belong to: with OPPU the merged one, else the plain base.
    (model, tokenizer, fingerprint), the fingerprint being what their manifests must carry."""
    if oppu:
        return load_merged_base(base_path, store, task, dtype)
    from peftu.model.base import base_fingerprint, load_base

    return *load_base(base_path, dtype), base_fingerprint(base_path)


def load_merged_base(base_path: str, store: AdapterStore, task: str, dtype: torch.dtype = torch.float32):
    """The base with the task's adapter merged in: (model, tokenizer, fingerprint of the merged base)."""
    from peft import PeftModel

    from peftu.model.base import base_fingerprint, load_base

    base_fp = base_fingerprint(base_path)
    model, tokenizer = load_base(base_path, dtype)
    with tempfile.TemporaryDirectory() as folder:
        try:
            _, manifest = store.fetch(task_adapter_task(task), TASK_ADAPTER_USER, dest=Path(folder),
                                      expect_base=base_fp)
        except NotFoundError:
            raise NotFoundError(f"{store} has no OPPU task adapter for task {task!r} "
                                f"(`peftu fit --oppu` fits one)") from None
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return model, tokenizer, merged_fingerprint(base_fp, manifest)


def merged_fingerprint(base_fp: str, task_adapter: Manifest) -> str:
    """What users' adapters of an OPPU run are trained on: the base and the task adapter's weights."""
    return fingerprint({"base": base_fp, "task_adapter": task_adapter.files})
