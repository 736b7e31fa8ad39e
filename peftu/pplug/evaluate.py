"""Users scored with the plug's soft tokens: PPlug alone, or on top of each user's adapter.

Predictions are made as evaluation makes them (`peftu.inference.predict`:
label scoring for classification and rating, greedy decoding for generation),
through the serving engine's batch functions, which take soft tokens per row;
so an evaluated answer is the answer the server would give.
"""

from __future__ import annotations

import torch

from peftu.data.schema import TaskSpec, UserRecord
from peftu.evaluation.evaluate import predict_user
from peftu.evaluation.metrics import task_metrics
from peftu.inference.predict import predict
from peftu.pplug.encoder import HistoryEncoder, user_embeddings
from peftu.pplug.model import PersonaPlug, soft_tokens
from peftu.store import AdapterStore


def user_soft_tokens(plug: PersonaPlug, encoder: HistoryEncoder, store: AdapterStore, spec: TaskSpec, task: str,
                     user: UserRecord, inputs: list[str]) -> list[torch.Tensor]:
    """The user's soft tokens for each input's prompt, from their history embeddings under `task` (the
    store's cache, where serving reads them; embedded and cached on a miss)."""
    history, _ = user_embeddings(store, encoder, task, user)
    return soft_tokens(plug, encoder, [spec.render(text) for text in inputs], history)


def evaluate_pplug(base, tokenizer, spec: TaskSpec, users: list[UserRecord], plug: PersonaPlug,
                   encoder: HistoryEncoder, store: AdapterStore, *, split: str = "test",
                   adapters_task: str | None = None, base_fp: str | None = None, progress: bool = True
                   ) -> dict[str, dict[str, float]]:
    """Per-user metrics (like `evaluate_users`) with the plug's soft tokens.

    `adapters_task` set (`pplug+adapter`, or `pplug+oppu` with the merged base
    as `base` and its fingerprint as `base_fp`): each user's own adapter from
    that task in the store is under the plug too; a user without one gets the
    plug alone. History embeddings come from the store's cache (embedded on a miss).
    """
    from tqdm import tqdm

    base.eval()
    per_user = {}
    for user in tqdm(users, desc=f"evaluating {spec.name} with PPlug", unit="user", disable=not progress):
        examples = getattr(user, split)
        if not examples:
            continue
        inputs = [e.input for e in examples]
        soft = user_soft_tokens(plug, encoder, store, spec, spec.name, user, inputs)
        if adapters_task:
            preds, _ = predict_user(base, tokenizer, spec, store, adapters_task, user.user_id, inputs,
                                    base_fp=base_fp, soft=soft)
        else:
            preds = predict(base, tokenizer, spec, inputs, soft=soft)
        per_user[user.user_id] = task_metrics(spec, preds, [e.output for e in examples])
    return per_user
