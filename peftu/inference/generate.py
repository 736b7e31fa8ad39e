"""Generation and label scoring for a batch whose rows belong to different users.

Every row carries its bank slot; the slots are fixed for the batch, so one
prefill and then one decode step at a time with the KV cache serve all rows,
each on its own adapter. Prompts are left-padded (positions counted from each
row's first real token), finished rows leave the batch and its KV cache, and
each row picks its tokens by its own `Sampling` (`peftu.inference.sampling`)
and stops at its token budget, EOS or a stop string.
A row may bring soft tokens (PPlug's personal embedding) to put after its
prompt: the batch's first forward then reads embeddings instead of token ids.
A PEFT prompt-learning model (prompt or prefix tuning) puts its virtual tokens
before every prompt, as in its training. Evaluation, PPlug and the server all
answer through these two functions (`peftu.inference.predict` for a task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from peftu.bank import AdapterBank
from peftu.inference.sampling import Picked, Picker, Sampling, pick_batch
from peftu.inference.soft import plugged_forward, soft_len, write_soft_tokens
from peftu.model.encode import IGNORE, collate

BASE_SLOT = 0
"""The bank slot kept at zero: rows of users without an adapter."""


@dataclass
class GenRow:
    """One request in a generation batch."""

    prompt_ids: list[int]
    slot: int
    sampling: Sampling
    emit: Callable[[Piece], None] = lambda piece: None
    """Called (from the batch's thread) with each new piece of text; the last one has the finish reason."""
    cancelled: Callable[[], bool] = lambda: False
    soft: torch.Tensor | None = None
    """Soft tokens `[n, hidden]` after the prompt (PPlug's); None: the prompt alone."""


@dataclass
class Piece:
    """New text of a row as it streams, the tokens written since the last piece, and at the end why it stopped."""

    text: str
    finish: str | None
    tokens: list[Picked]


@dataclass
class GenResult:
    text: str
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"."""
    tokens: int
    picked: list[Picked] = field(default_factory=list)
    """Every token the row wrote (EOS included), with log-probabilities where the row asked for them."""


def slots_context(bank: AdapterBank | None, slots: list[int], reuse: bool = False):
    """bank.rows over these slots; the plain base when no row has an adapter."""
    if all(s == BASE_SLOT for s in slots):
        return contextlib.nullcontext()
    return bank.rows(torch.tensor(slots, dtype=torch.long), reuse=reuse)


class _RowState:
    """Tokens and text of one row as it decodes; decides when it is done."""

    def __init__(self, row: GenRow, eos_id: int, decode: Callable[[list[int]], str]):
        self.row, self.eos_id, self.decode = row, eos_id, decode
        self.picker = Picker(row.sampling)
        self.ids: list[int] = []
        self.picked: list[Picked] = []
        self.unsent: list[Picked] = []
        self.sent = ""
        self.result: GenResult | None = None
        self.hold = max((len(x) for x in row.sampling.stop), default=1) - 1

    def push(self, picked: Picked) -> None:
        s = self.row.sampling
        finish = None
        self.picked.append(picked)
        self.unsent.append(picked)
        if picked.token == self.eos_id:
            finish = "stop"
        else:
            self.ids.append(picked.token)
        text = self.decode(self.ids)
        cuts = [text.find(x) for x in s.stop if x and x in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        elif finish is None and len(self.ids) >= s.max_tokens:
            finish = "length"
        elif finish is None and self.row.cancelled():
            finish = "cancelled"
        # Hold back what could be the start of a stop string or a half-decoded character.
        safe = text if finish else text[:len(text) - self.hold].rstrip("\ufffd")
        delta = safe[len(self.sent):] if len(safe) > len(self.sent) else ""
        if delta or finish:
            self.row.emit(Piece(delta, finish, self.unsent))
            self.unsent = []
            self.sent = safe if len(safe) > len(self.sent) else self.sent
        if finish:
            self.result = GenResult(text, finish, len(self.ids), self.picked)


def _prompt_learning(model, n_rows: int) -> tuple[torch.nn.Module, torch.Tensor | None, DynamicCache | None, int]:
    """A PEFT prompt-learning model as the model under it and what goes before every prompt:
    prompt tuning's virtual-token embeddings or prefix tuning's keys and values, and their
    count. Any other model comes back as it is, with nothing before its prompts."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return model, None, None, 0
    n = config.num_virtual_tokens
    if config.peft_type == "PREFIX_TUNING":
        return model.get_base_model(), None, model.get_prompt(n_rows), n
    if config.peft_type in ("PROMPT_TUNING", "P_TUNING"):
        return model.get_base_model(), model.get_prompt(batch_size=n_rows), None, n
    raise ValueError(f"cannot generate with a {config.peft_type} model")


@torch.no_grad()
def generate_batch(model, bank: AdapterBank | None, tokenizer, rows: list[GenRow]) -> list[GenResult]:
    """Generate for every row at once, each row on its own slot, with the KV cache."""
    model, virtual, prefix, n_virtual = _prompt_learning(model, len(rows))
    device = model.device
    pad_id = tokenizer.pad_token_id
    prompts = [r.prompt_ids + [pad_id] * soft_len(r.soft) for r in rows]  # room for soft tokens at the end
    width = max(len(p) for p in prompts)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width + n_virtual), dtype=torch.long)
    mask[:, :n_virtual] = 1  # virtual tokens come first, before the left padding
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, n_virtual + width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if prefix is not None:  # the prefix is in the cache already: positions of the prompt only
        positions = positions[:, n_virtual:]
    step = {"input_ids": ids}
    if virtual is not None or any(r.soft is not None for r in rows):  # the first forward reads embeddings
        embeds = write_soft_tokens(model.get_input_embeddings()(ids), [width - soft_len(r.soft) for r in rows],
                                   [r.soft for r in rows])
        if virtual is not None:
            embeds = torch.cat([virtual.to(device, embeds.dtype), embeds], dim=1)
        step = {"inputs_embeds": embeds}

    def decode(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=True)

    states = [_RowState(r, tokenizer.eos_token_id, decode) for r in rows]
    live = list(range(len(rows)))  # rows still decoding, in KV-cache order
    cache = prefix if prefix is not None else DynamicCache()
    step_pos = positions
    with contextlib.ExitStack() as rows_on:  # re-entered whenever rows leave the batch
        rows_on.enter_context(slots_context(bank, [r.slot for r in rows], reuse=True))
        while live:
            out = model(**step, attention_mask=mask, position_ids=step_pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            picked = pick_batch(out.logits[:, -1], [states[i].picker for i in live])
            for i, p in zip(live, picked):
                states[i].push(p)
            tokens = [p.token for p in picked]
            keep = [k for k, i in enumerate(live) if states[i].result is None]
            if len(keep) < len(live):
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, step_pos = mask[index], step_pos[index]
                tokens = [tokens[k] for k in keep]
                live = [live[k] for k in keep]
                rows_on.close()
                rows_on.enter_context(slots_context(bank, [rows[i].slot for i in live], reuse=True))
            step = {"input_ids": torch.tensor(tokens, device=device).unsqueeze(-1)}
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
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
