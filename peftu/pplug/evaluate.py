"""Users scored with the plug's soft tokens: PPlug alone, or on top of each user's adapter.

Predictions are made the way `peftu.eval` makes them (label scoring for
classification and rating, greedy decoding for generation), through the
serving engine's batch functions, which take soft tokens per row; so an
evaluated answer is the answer the server would give.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from peftu.data.schema import TaskSpec, UserRecord
from peftu.evaluation.metrics import task_metrics
from peftu.inference.generate import BASE_SLOT, GenRow, Sampling, ScoreRow, generate_batch, score_batch
from peftu.model.encode import encode
from peftu.pplug.encoder import HistoryEncoder, user_embeddings
from peftu.pplug.model import PersonaPlug, soft_tokens
from peftu.store import AdapterStore


def predict_plugged(model, tokenizer, spec: TaskSpec, texts: list[str], soft: list[torch.Tensor], *,
                    max_len: int = 256, batch_size: int = 16) -> list[str]:
    """Answers to `texts`, row i with soft tokens `soft[i]` after its prompt."""
    if spec.kind in ("classification", "rating"):
        rows = [ScoreRow([encode(tokenizer, spec, t, label, max_len) for label in spec.labels], BASE_SLOT, p)
                for t, p in zip(texts, soft, strict=True)]
        scores = [s for i in range(0, len(rows), batch_size)
                  for s in score_batch(model, None, tokenizer, rows[i:i + batch_size])]
        return [spec.labels[max(range(len(s)), key=s.__getitem__)] for s in scores]
    keep = max_len - spec.max_new_tokens
    rows = [GenRow(tokenizer(spec.render(t), add_special_tokens=True)["input_ids"][-keep:], BASE_SLOT,
                   Sampling(max_tokens=spec.max_new_tokens), soft=p)
            for t, p in zip(texts, soft, strict=True)]
    results = [r for i in range(0, len(rows), batch_size)
               for r in generate_batch(model, None, tokenizer, rows[i:i + batch_size])]
    return [r.text.strip().split("\n")[0].strip() for r in results]


def evaluate_pplug(base, tokenizer, spec: TaskSpec, users: list[UserRecord], plug: PersonaPlug,
                   encoder: HistoryEncoder, store: AdapterStore, *, split: str = "test",
                   adapters_task: str | None = None, base_fp: str | None = None, progress: bool = True
                   ) -> dict[str, dict[str, float]]:
    """Per-user metrics (like `peftu.eval.evaluate_users`) with the plug's soft tokens.

    `adapters_task` set (`pplug+adapter`, or `pplug+oppu` with the merged base
    as `base` and its fingerprint as `base_fp`): each user's own adapter from
    that task in the store is under the plug too; a user without one gets the
    plug alone. History embeddings come from the store's cache (embedded on a miss).
    """
    from peft import PeftModel
    from tqdm import tqdm

    base.eval()
    per_user = {}
    for user in tqdm(users, desc=f"evaluating {spec.name} with PPlug", unit="user", disable=not progress):
        examples = getattr(user, split)
        if not examples:
            continue
        history, _ = user_embeddings(store, encoder, spec.name, user)
        soft = soft_tokens(plug, encoder, [spec.render(e.input) for e in examples], history)
        model = base
        if adapters_task and store.has_adapter(adapters_task, user.user_id):
            with tempfile.TemporaryDirectory() as tmp:
                store.fetch(adapters_task, user.user_id, dest=Path(tmp), expect_base=base_fp)
                model = PeftModel.from_pretrained(base, tmp)
        try:
            preds = predict_plugged(model, tokenizer, spec, [e.input for e in examples], soft)
        finally:
            if model is not base:
                model.unload()
        per_user[user.user_id] = task_metrics(spec, preds, [e.output for e in examples])
    return per_user
