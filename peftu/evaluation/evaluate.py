"""Predictions judged per user and averaged over users.

Answers come from `peftu.inference.predict`, the batch functions a replica
runs: label scoring for classification and rating (so an answer is always a
label), greedy decoding for generation. A user's own adapter is held in a bank
slot over the base, as a replica holds it, so an evaluated answer is the
answer the server gives. Each user's metric is computed on their own
examples; a method's score is the mean over users (macro), overall and per
activity bucket, as PEFT-U and LaMP report it.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from peft import LoraConfig

from peftu.bank import AdapterBank
from peftu.bank.model import parse_adapter
from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.evaluation.metrics import macro_average, task_metrics
from peftu.inference.generate import BASE_SLOT
from peftu.inference.predict import Soft, predict
from peftu.model.bases import load_users_base
from peftu.store import AdapterStore

T = TypeVar("T")


def evaluate_examples(model, tokenizer, spec: TaskSpec, examples: list[Example]) -> dict[str, float]:
    """One user's metrics on their examples."""
    preds = predict(model, tokenizer, spec, [e.input for e in examples])
    return task_metrics(spec, preds, [e.golds for e in examples])


def evaluate_users(model, tokenizer, spec: TaskSpec, users: list[UserRecord],
                   split: str = "test") -> dict[str, dict[str, float]]:
    """Per-user metrics of one shared model (the base or a global adapter).

    All users' inputs go through the model together, then are scored per user.
    """
    model.eval()
    examples = [(u.user_id, e) for u in users for e in getattr(u, split)]
    preds = predict(model, tokenizer, spec, [e.input for _, e in examples])
    by_user: dict[str, tuple[list[str], list[list[str]]]] = defaultdict(lambda: ([], []))
    for (uid, e), p in zip(examples, preds, strict=True):
        by_user[uid][0].append(p)
        by_user[uid][1].append(e.golds)
    return {uid: task_metrics(spec, p, g) for uid, (p, g) in by_user.items()}


def evaluate_user(model, tokenizer, spec: TaskSpec, user: UserRecord) -> dict[str, float]:
    """The model's metrics on the user's val and test examples (`val_accuracy`, `test_mae`, ...)."""
    metrics = {f"val_{k}": v for k, v in evaluate_examples(model, tokenizer, spec, user.val).items()}
    return metrics | {f"test_{k}": v for k, v in evaluate_examples(model, tokenizer, spec, user.test).items()}


@contextlib.contextmanager
def user_adapter(model: torch.nn.Module, files: dict[str, bytes], where: str
                 ) -> Iterator[tuple[AdapterBank, int]]:
    """`model` with one LoRA adapter (its PEFT files) in a bank slot, as a replica holds it:
    (bank, slot). The model is plain again afterwards."""
    try:
        config = json.loads(files["adapter_config.json"])
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: adapter_config.json is no LoRA config this bank can hold: {e!r}") from None
    bank = AdapterBank(model, BASE_SLOT + 2, lora)
    try:
        bank.clear_slot(BASE_SLOT)
        state, scale = parse_adapter(files["adapter_config.json"], files["adapter_model.safetensors"], lora.r, where)
        bank.load_slot(BASE_SLOT + 1, state, scale)
        yield bank, BASE_SLOT + 1
    finally:
        bank.remove()


def with_user_adapter(base, store: AdapterStore, task: str, user_id: str, answer: Callable[..., T], *,
                      base_fp: str | None) -> tuple[T, bool]:
    """`answer(bank=, slot=)` with the user's own adapter of `task` from the store (checked: sha256,
    base fingerprint) in a bank slot over `base`, or `answer()` on the base if they have none; the
    second value says whether they had one."""
    if not store.has_adapter(task, user_id):
        return answer(), False
    files, _ = store.fetch_bytes(task, user_id, expect_base=base_fp)
    with user_adapter(base, files, f"adapter of user {user_id!r} in task {task!r}") as (bank, slot):
        return answer(bank=bank, slot=slot), True


def predict_user(base, tokenizer, spec: TaskSpec, store: AdapterStore, task: str, user_id: str,
                 inputs: list[str], *, base_fp: str | None, soft: Soft = None) -> tuple[list[str], bool]:
    """A user's answers with their own adapter of `task` from the store, or the base's if they have
    none (`with_user_adapter`)."""
    return with_user_adapter(base, store, task, user_id,
                             lambda **slot: predict(base, tokenizer, spec, inputs, soft=soft, **slot), base_fp=base_fp)


def evaluate_adapters(base, tokenizer, spec: TaskSpec, users: list[UserRecord], store: AdapterStore,
                      *, base_fp: str, split: str = "test", progress: bool = True
                      ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per-user metrics with each user's own adapter from the store.

    A user without an adapter is answered by the base, as the server would;
    their ids come back as the second value.
    """
    from tqdm import tqdm

    base.eval()
    per_user, without = {}, []
    for user in tqdm(users, desc=f"evaluating {spec.name} adapters", unit="user", disable=not progress):
        examples = getattr(user, split)
        preds, own = predict_user(base, tokenizer, spec, store, spec.name, user.user_id,
                                  [e.input for e in examples], base_fp=base_fp)
        if not own:
            without.append(user.user_id)
        per_user[user.user_id] = task_metrics(spec, preds, [e.golds for e in examples])
    return per_user, without


def evaluate_task(base_path: str, store: AdapterStore, spec: TaskSpec, users: list[UserRecord], *,
                  split: str = "test", oppu: bool | None = None) -> dict:
    """`peftu eval`: macro metrics of the base the users' adapters belong to (OPPU's merged one
    where the store says they were fitted on it; `oppu` forces it) and of each user's own adapter."""
    base, tokenizer, base_fp = load_users_base(base_path, store, spec.name, oppu=oppu)
    per_user, without = evaluate_adapters(base, tokenizer, spec, users, store, base_fp=base_fp, split=split)
    return {"task": spec.name, "metric": spec.metric, "split": split,
            "base": macro_average(evaluate_users(base, tokenizer, spec, users, split), users),
            "per_user": macro_average(per_user, users), "users_without_adapter": len(without)}
