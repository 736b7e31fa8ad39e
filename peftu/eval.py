"""Metrics and predictions, judged per user and averaged over users.

Classification and rating answers are predicted by scoring every label under
the model (the log-likelihood of `" " + label + EOS` after the prompt) and
taking the best, never by free generation, so an answer is always a label.
Generation tasks decode greedily. Each user's metric is computed on their own
examples; a method's score is the mean over users (macro), overall and per
activity bucket, as PEFT-U and LaMP report it.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from .data.schema import LOWER_IS_BETTER, Example, TaskSpec, UserRecord
from .encode import IGNORE, collate, encode

# --- metrics ------------------------------------------------------------------


def accuracy(preds: list[str], golds: list[str]) -> float:
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(preds: list[str], golds: list[str], labels: list[str] | None = None) -> float:
    """F1 per label, averaged over the labels that occur in golds or predictions."""
    labels = sorted(set(golds) | set(preds)) if labels is None else [
        lab for lab in labels if lab in set(golds) | set(preds)]
    scores = []
    for lab in labels:
        tp = sum(p == lab and g == lab for p, g in zip(preds, golds, strict=True))
        fp = sum(p == lab and g != lab for p, g in zip(preds, golds, strict=True))
        fn = sum(p != lab and g == lab for p, g in zip(preds, golds, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _rating_value(pred: str, gold: float, scale: list[float]) -> float:
    """A prediction as a number; a non-number counts as the worse extreme (as LaMP does)."""
    try:
        value = float(pred.strip())
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    low, high = min(scale), max(scale)
    return low if abs(low - gold) > abs(high - gold) else high


def mae(preds: list[str], golds: list[str], scale: list[float]) -> float:
    errs = [abs(_rating_value(p, float(g), scale) - float(g)) for p, g in zip(preds, golds, strict=True)]
    return sum(errs) / len(errs)


def rmse(preds: list[str], golds: list[str], scale: list[float]) -> float:
    errs = [(_rating_value(p, float(g), scale) - float(g)) ** 2 for p, g in zip(preds, golds, strict=True)]
    return math.sqrt(sum(errs) / len(errs))


def rouge(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (stemmed), via the `rouge-score` package."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(g, p) for p, g in zip(preds, golds, strict=True)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rougeL")}


def task_metrics(spec: TaskSpec, preds: list[str], golds: list[str]) -> dict[str, float]:
    """Every metric of the task's kind, for one user's predictions."""
    if not golds:
        return {}
    if spec.kind == "classification":
        return {"accuracy": accuracy(preds, golds), "f1": macro_f1(preds, golds, spec.labels)}
    if spec.kind == "rating":
        scale = [float(x) for x in spec.labels]
        return {"mae": mae(preds, golds, scale), "rmse": rmse(preds, golds, scale)}
    return rouge(preds, golds)


def macro_average(per_user: dict[str, dict[str, float]], users: list[UserRecord]
                  ) -> dict[str, dict[str, float]]:
    """Mean of each metric over users: `{"all": {...}, "few": {...}, ...}` with `n` users."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for user in users:
        if per_user.get(user.user_id):
            groups["all"].append(per_user[user.user_id])
            groups[user.activity].append(per_user[user.user_id])
    out = {}
    for name, rows in groups.items():
        keys = rows[0].keys()
        out[name] = {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"n": len(rows)}
    return out


def better(metric: str, a: float, b: float) -> bool:
    """Is `a` a better score than `b` under `metric`?"""
    return a < b if metric in LOWER_IS_BETTER else a > b


# --- predictions -------------------------------------------------------------


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its answer tokens (labels not IGNORE)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = labels[:, 1:]
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != IGNORE)).sum(-1)


@torch.no_grad()
def score_labels(model, tokenizer, spec: TaskSpec, inputs: list[str], *,
                 max_len: int = 256, batch_size: int = 64) -> list[str]:
    """The label with the highest log-likelihood after each input's prompt."""
    pairs = [encode(tokenizer, spec, text, label, max_len) for text in inputs for label in spec.labels]
    scores: list[float] = []
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(pairs[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Prompt tuning puts virtual tokens before the input; their logits come first and are no answer's.
        logits = logits[:, -batch["input_ids"].shape[1]:]
        scores += answer_logprobs(logits, batch["labels"]).tolist()
    k = len(spec.labels)
    return [spec.labels[max(range(k), key=lambda j: scores[i * k + j])] for i in range(len(inputs))]


@torch.no_grad()
def generate_answers(model, tokenizer, spec: TaskSpec, inputs: list[str], *,
                     max_len: int = 256, batch_size: int = 32) -> list[str]:
    """Greedy answers, cut at the first newline or EOS."""
    answers = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(inputs), batch_size):
            prompts = [spec.render(t) for t in inputs[i:i + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                              max_length=max_len - spec.max_new_tokens).to(model.device)
            out = model.generate(**batch, max_new_tokens=spec.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            answers += [t.strip().split("\n")[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = old_side
    return answers


def predict(model, tokenizer, spec: TaskSpec, inputs: list[str]) -> list[str]:
    """The model's answers to inputs, the way the task's kind asks."""
    if not inputs:
        return []
    if spec.kind in ("classification", "rating"):
        return score_labels(model, tokenizer, spec, inputs)
    return generate_answers(model, tokenizer, spec, inputs)


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
    from peft import PeftModel
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
