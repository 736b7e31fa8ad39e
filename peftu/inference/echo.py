"""The log-probability of each of a prompt's own tokens, for completions' `echo` with `logprobs`.

Token t's log-probability is read from the logits at t - 1, so the first
token has none (OpenAI's `null`); special tokens (BOS) are not part of the
echoed text and are left out. This is how evaluation harnesses score a text
through the API (`echo: true, logprobs: k, max_tokens: 0`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftu.bank import AdapterBank
from peftu.inference.rows import slots_context
from peftu.inference.sampling import Picked


@dataclass
class PromptRow:
    """A prompt to read back: its ids, its bank slot, and how many alternatives per token to report."""

    prompt_ids: list[int]
    slot: int
    top: int = 0


@torch.no_grad()
def prompt_logprobs(model, bank: AdapterBank | None, tokenizer, rows: list[PromptRow]) -> list[list[Picked]]:
    """Per row, each non-special prompt token with its log-probability (none for a first token)."""
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right-padded: positions start at 0 in every row
        ids[i, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        mask[i, :len(r.prompt_ids)] = 1
    with slots_context(bank, [r.slot for r in rows]):
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    special = set(tokenizer.all_special_ids)
    out = []
    for i, r in enumerate(rows):
        picked: list[Picked] = []
        for t, token in enumerate(r.prompt_ids):
            if token in special:
                continue
            if t == 0:
                picked.append(Picked(token))
                continue
            dist = logp[i, t - 1]
            top = []
            if r.top:
                values, best = dist.topk(min(r.top, dist.numel()))
                top = list(zip(best.tolist(), values.tolist()))
            picked.append(Picked(token, float(dist[token]), top))
        out.append(picked)
    return out
