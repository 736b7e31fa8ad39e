"""A task's answers, the way the server gives them: label scoring or greedy generation.

Classification and rating inputs are answered by scoring every label after
the task's prompt (`score_batch`) and taking the best, so an answer is always
a label. Generation inputs are decoded greedily (`generate_batch`) with
`answer_sampling`: the task's token budget, stopped at the first newline.
Both run through the same batch functions as a replica, on the same bank
slots; a client asking the server the same way (`/v1/score`, or
`/v1/completions` with the rendered prompt and these settings) gets the same
answer.
"""

from __future__ import annotations

import torch

from peftu.bank import AdapterBank
from peftu.data.schema import TaskSpec
from peftu.inference.generate import BASE_SLOT, GenResult, GenRow, ScoreRow, generate_batch, score_batch
from peftu.inference.sampling import Sampling
from peftu.model.encode import encode

Soft = list[torch.Tensor | None] | None
"""Per input, soft tokens after its prompt (PPlug's); None: no input has any."""


def answer_sampling(spec: TaskSpec) -> Sampling:
    """How a task's free-text answer is decoded: greedy, the task's budget, one line."""
    return Sampling(max_tokens=spec.max_new_tokens, temperature=0.0, stop=["\n"])


def answer_text(result: GenResult) -> str:
    """A generation as the task's answer."""
    return result.text.strip()


def _soft(soft: Soft, n: int) -> list[torch.Tensor | None]:
    return [None] * n if soft is None else soft


def label_logprobs(model, tokenizer, spec: TaskSpec, inputs: list[str], *, bank: AdapterBank | None = None,
                   slot: int = BASE_SLOT, soft: Soft = None, max_len: int = 256, batch_size: int = 16
                   ) -> list[list[float]]:
    """Each input's log-likelihood of every label (in `spec.labels` order) after its prompt."""
    rows = [ScoreRow([encode(tokenizer, spec, text, label, max_len) for label in spec.labels], slot, p)
            for text, p in zip(inputs, _soft(soft, len(inputs)), strict=True)]
    return [s for i in range(0, len(rows), batch_size)
            for s in score_batch(model, bank, tokenizer, rows[i:i + batch_size])]


def score_labels(model, tokenizer, spec: TaskSpec, inputs: list[str], *, bank: AdapterBank | None = None,
                 slot: int = BASE_SLOT, soft: Soft = None, max_len: int = 256, batch_size: int = 16) -> list[str]:
    """The label with the highest log-likelihood after each input's prompt."""
    scores = label_logprobs(model, tokenizer, spec, inputs, bank=bank, slot=slot, soft=soft, max_len=max_len,
                            batch_size=batch_size)
    return [spec.labels[max(range(len(s)), key=s.__getitem__)] for s in scores]


def generate_answers(model, tokenizer, spec: TaskSpec, inputs: list[str], *, bank: AdapterBank | None = None,
                     slot: int = BASE_SLOT, soft: Soft = None, max_len: int = 256, batch_size: int = 16
                     ) -> list[str]:
    """Greedy answers (`answer_sampling`); a prompt too long for `max_len` loses its beginning."""
    keep = max_len - spec.max_new_tokens
    rows = [GenRow(tokenizer(spec.render(text), add_special_tokens=True)["input_ids"][-keep:], slot,
                   answer_sampling(spec), soft=p)
            for text, p in zip(inputs, _soft(soft, len(inputs)), strict=True)]
    return [answer_text(r) for i in range(0, len(rows), batch_size)
            for r in generate_batch(model, bank, tokenizer, rows[i:i + batch_size])]


def predict(model, tokenizer, spec: TaskSpec, inputs: list[str], *, bank: AdapterBank | None = None,
            slot: int = BASE_SLOT, soft: Soft = None) -> list[str]:
    """The model's answers to inputs, the way the task's kind asks (on `bank`'s `slot` if given)."""
    if not inputs:
        return []
    answer = score_labels if spec.kind in ("classification", "rating") else generate_answers
    return answer(model, tokenizer, spec, inputs, bank=bank, slot=slot, soft=soft)
