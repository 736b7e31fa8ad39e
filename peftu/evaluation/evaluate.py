"""Metrics and predictions, judged per user and averaged over users.

Classification and rating answers are predicted by scoring every label under
the model (the log-likelihood of `" " + label + EOS` after the prompt) and
taking the best, never by free generation, so an answer is always a label.
Generation tasks decode greedily. Each user's metric is computed on their own
examples; a method's score is the mean over users (macro), overall and per
activity bucket, as PEFT-U and LaMP report it.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

from peft import PeftModel

from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.evaluation.metrics import task_metrics
from peftu.inference.predict import predict

# --- metrics ------------------------------------------------------------------


# --- predictions -------------------------------------------------------------


def evaluate_examples(model, tokenizer, spec: TaskSpec, examples: list[Example]) -> dict[str, float]:
    """One user's metrics on their examples."""
    preds = predict(model, tokenizer, spec, [e.input for e in examples])
    return task_metrics(spec, preds, [e.output for e in examples])


def evaluate_users(model, tokenizer, spec: TaskSpec, users: list[UserRecord],
                   split: str = "test") -> dict[str, dict[str, float]]:
    """Per-user metrics of one shared model (the base or a global adapter).

    All users' inputs go through the model together, then are scored per user.
    """
    model.eval()
    examples = [(u.user_id, e) for u in users for e in getattr(u, split)]
    preds = predict(model, tokenizer, spec, [e.input for _, e in examples])
    by_user: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for (uid, e), p in zip(examples, preds, strict=True):
        by_user[uid][0].append(p)
        by_user[uid][1].append(e.output)
    return {uid: task_metrics(spec, p, g) for uid, (p, g) in by_user.items()}


def evaluate_adapters(base, tokenizer, spec: TaskSpec, users: list[UserRecord], store,
                      *, base_fp: str, split: str = "test", progress: bool = True
                      ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per-user metrics with each user's own adapter from the store.

    A user without an adapter is answered by the base, as the server would;
    their ids come back as the second value. Every adapter is checked (sha256,
    base fingerprint) before it is used.
    """
    from tqdm import tqdm

    per_user, without = {}, []
    for user in tqdm(users, desc=f"evaluating {spec.name} adapters", unit="user", disable=not progress):
        examples = getattr(user, split)
        if not store.has_adapter(spec.name, user.user_id):
            without.append(user.user_id)
            per_user[user.user_id] = evaluate_examples(base, tokenizer, spec, examples)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            store.fetch(spec.name, user.user_id, dest=Path(tmp), expect_base=base_fp)
            model = PeftModel.from_pretrained(base, tmp)
        try:
            per_user[user.user_id] = evaluate_examples(model, tokenizer, spec, examples)
        finally:
            model.unload()
    return per_user, without


def evaluate_user(model, tokenizer, spec: TaskSpec, user: UserRecord) -> dict[str, float]:
    """The model's metrics on the user's val and test examples (`val_accuracy`, `test_mae`, ...)."""
    metrics = {f"val_{k}": v for k, v in evaluate_examples(model, tokenizer, spec, user.val).items()}
    return metrics | {f"test_{k}": v for k, v in evaluate_examples(model, tokenizer, spec, user.test).items()}
