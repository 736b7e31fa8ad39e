"""A model's answers to a task's inputs: label scoring for classification and rating, generation otherwise."""

from __future__ import annotations

import torch

from peftu.data.schema import TaskSpec
from peftu.model.encode import IGNORE, collate, encode


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
