"""Generation and label scoring for a batch whose rows belong to different users.

Every row carries its bank slot, so one forward serves rows of many users, each
on its own adapter. `generate_batch` is the static batch: every row joins a
`RunningBatch` (`peftu.inference.running`) at step 0 and the batch decodes until
its last row is done; the server's continuous scheduler drives the same
`RunningBatch` step by step, adding and dropping rows between steps, so there is
one decode path. Each row picks its tokens by its own `Sampling`
(`peftu.inference.sampling`) and stops at its token budget, EOS or a stop string.
A row may bring soft tokens (PPlug's personal embedding) to put after its
prompt; a PEFT prompt-learning model (prompt or prefix tuning) puts its virtual
tokens before every prompt, as in its training. Evaluation, PPlug and the
server all answer through these functions (`peftu.inference.predict` for a task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftu.bank import AdapterBank
from peftu.inference.echo import PromptRow, prompt_logprobs
from peftu.inference.rows import BASE_SLOT, GenResult, GenRow, Piece, slots_context
from peftu.inference.running import RunningBatch
from peftu.inference.soft import plugged_forward
from peftu.model.encode import IGNORE, collate

__all__ = ["BASE_SLOT", "GenResult", "GenRow", "Piece", "ScoreRow", "answer_logprobs", "generate_batch",
           "read_batch", "score_batch"]


@torch.no_grad()
def generate_batch(model, bank: AdapterBank | None, tokenizer, rows: list[GenRow]) -> list[GenResult]:
    """Generate for every row at once, each row on its own slot, with the KV cache."""
    batch = RunningBatch(model, bank, tokenizer)
    states = batch.add(rows)
    while batch.rows:
        batch.step()
    return [st.result for st in states]


@dataclass
class ScoreRow:
    """One request of label scoring: every candidate answer encoded after the prompt."""

    encoded: list[tuple[list[int], int]]
    slot: int
    soft: torch.Tensor | None = None
    """Soft tokens between the prompt and every candidate (PPlug's); None: none."""


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its answer tokens (labels not IGNORE)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = labels[:, 1:]
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != IGNORE)).sum(-1)


@torch.no_grad()
def score_batch(model, bank: AdapterBank | None, tokenizer, rows: list[ScoreRow]) -> list[list[float]]:
    """Log-likelihood of each candidate of each row, all rows in one forward."""
    flat = [pair for r in rows for pair in r.encoded]
    slots = [r.slot for r in rows for _ in r.encoded]
    with slots_context(bank, slots):
        if any(r.soft is not None for r in rows):
            logits, labels = plugged_forward(model, flat, [r.soft for r in rows for _ in r.encoded],
                                             tokenizer.pad_token_id)
        else:
            batch = {k: v.to(model.device) for k, v in collate(flat, tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
    # Prompt tuning puts virtual tokens before the input; their logits come first and are no answer's.
    scores = answer_logprobs(logits[:, -labels.shape[1]:], labels).tolist()
    out, start = [], 0
    for r in rows:
        out.append(scores[start:start + len(r.encoded)])
        start += len(r.encoded)
    return out


def read_batch(model, bank: AdapterBank | None, tokenizer, rows: list[ScoreRow | PromptRow]) -> list:
    """Rows that only read and write no token, in their order: label scores (`ScoreRow`) and an
    echoed prompt's log-probabilities (`PromptRow`), each kind in one forward."""
    out: list = [None] * len(rows)
    for kind, read in ((ScoreRow, score_batch), (PromptRow, prompt_logprobs)):
        at = [i for i, r in enumerate(rows) if isinstance(r, kind)]
        if at:
            for i, result in zip(at, read(model, bank, tokenizer, [rows[i] for i in at]), strict=True):
                out[i] = result
    return out
