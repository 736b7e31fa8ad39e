"""The banked fit: K users' adapters trained together, exactly as K separate fits.

Read top to bottom, it is the reference loop of `peftu/fit.py` for K users at
once:

1. Users are packed K at a time, similar training-set sizes together so the
   pack finishes together (and a token budget caps the union batch).
2. Every slot starts from PEFT's initial weights for the seed, and every user
   visits their examples in the same seeded mini-batch order as the reference.
3. Banked step i is the union of each user's own i-th mini-batch. The loss is
   the sum over users of each user's mean answer-token loss, so slot k's
   gradient is exactly user k's own. Logits are computed only where there are
   answer tokens, which is most of the saving on a CPU. The union runs as
   micro-batches of rows of about one length (little padding) whose gradients
   add up; each user's loss is still divided by their answer-token count over
   the whole step.
4. `SlotAdamW` steps only the users present in the step, with per-user
   clipping and learning-rate schedules.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.schema import TaskSpec, UserRecord
from ..encode import IGNORE, collate, encode, minibatches
from ..fit import (FitResult, FitSummary, LoraHParams, evaluate_and_publish, folder_files, lr_lambda,
                   split_current)
from ..store import AdapterStore
from .model import AdapterBank, peft_initial_state
from .optim import SlotAdamW


def pack_users(users: list[UserRecord], pack_size: int, hp: LoraHParams,
               token_budget: int = 0) -> list[list[UserRecord]]:
    """Group users K at a time, similar sizes together.

    `token_budget` (0: none) caps a pack's union batch at roughly that many
    tokens: each user adds `batch_size * max_len` worst-case tokens.
    """
    per_user = hp.batch_size * hp.max_len
    size = pack_size if token_budget <= 0 else max(1, min(pack_size, token_budget // per_user))
    ordered = sorted(users, key=lambda u: (len(u.train), u.user_id))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


MICRO_BATCH_MIN_TOKENS = 512
"""A micro-batch smaller than this takes in longer rows: a tiny forward costs more
in per-op overhead than the padding it saves."""


def length_groups(lengths: list[int], min_tokens: int = MICRO_BATCH_MIN_TOKENS) -> list[list[int]]:
    """Row indices grouped shortest first, one length per group unless a group is too small."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = groups[-1] if groups else None
        if last and (lengths[i] == lengths[last[-1]] or len(last) * lengths[last[-1]] < min_tokens):
            last.append(i)
        else:
            groups.append([i])
    return groups


def _token_user(row_user: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The user of every answer token that `keep` selects."""
    return row_user.to(keep.device).unsqueeze(1).expand_as(keep)[keep]


def answer_token_counts(batch: dict[str, torch.Tensor], row_user: torch.Tensor,
                        n_users: int) -> torch.Tensor:
    """How many answer tokens each user has in the batch, `[n_users]`."""
    keep = batch["labels"][:, 1:] != IGNORE
    return torch.bincount(_token_user(row_user, keep), minlength=n_users)


def answer_token_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      row_user: torch.Tensor, n_users: int) -> torch.Tensor:
    """Each user's summed cross-entropy over their answer tokens, `[n_users]`.

    The LM head runs only where a label follows (the prompt's logits are never
    made), and the backbone skips the last position, which is only a target. An
    all-ones mask is dropped: it means the same as none, and none lets
    attention take its plain causal kernel.
    """
    input_ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    hidden = model.base_model(input_ids=input_ids,
                              attention_mask=None if bool(mask.all()) else mask).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[keep])
    ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    return torch.zeros(n_users, dtype=ce.dtype, device=ce.device).index_add(0, _token_user(row_user, keep), ce)


def answer_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      row_user: torch.Tensor, n_users: int) -> torch.Tensor:
    """Each user's mean cross-entropy over their answer tokens, `[n_users]`."""
    sums = answer_token_sums(model, batch, row_user, n_users)
    return sums / answer_token_counts(batch, row_user, n_users).to(sums.device).clamp(min=1)


@dataclass
class PackFit:
    """A fitted pack: the bank (slot k is users[k]) and each user's losses."""

    bank: AdapterBank
    users: list[UserRecord]
    results: dict[str, FitResult]


def fit_pack(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
             hp: LoraHParams, init_state: dict[str, torch.Tensor] | None = None) -> PackFit:
    """Fit one adapter per user of the pack; call `.bank.remove()` when done with it."""
    if any(not u.train for u in users):
        empty = next(u.user_id for u in users if not u.train)
        raise ValueError(f"user {empty!r} has no training examples")
    if init_state is None:
        init_state = peft_initial_state(model, hp.lora_config(), hp.seed)
    bank = AdapterBank(model, len(users), hp.lora_config())
    opt = SlotAdamW(bank.parameters(), len(users), lr=hp.lr, weight_decay=hp.weight_decay,
                    max_grad_norm=hp.max_grad_norm)
    encoded, plans = [], []
    for slot, user in enumerate(users):
        bank.load_slot(slot, init_state)
        encoded.append([encode(tokenizer, spec, e.input, e.output, hp.max_len) for e in user.train])
        plans.append(minibatches(len(user.train), hp.batch_size, hp.seed, hp.epochs))
        opt.reset_slot(slot, lr_lambda(hp.schedule, len(plans[-1])))
    results = {u.user_id: FitResult(steps=len(p)) for u, p in zip(users, plans)}
    device = next(model.parameters()).device

    model.train()
    for i in range(max(len(p) for p in plans)):
        active = [k for k, p in enumerate(plans) if i < len(p)]
        rows, row_slot = [], []
        for k in active:
            rows += [encoded[k][j] for j in plans[k][i]]
            row_slot += [k] * len(plans[k][i])
        micro = []
        for group in length_groups([len(ids) for ids, _ in rows]):
            batch = collate([rows[j] for j in group], tokenizer.pad_token_id)
            micro.append(({k: v.to(device) for k, v in batch.items()},
                          torch.tensor([row_slot[j] for j in group], device=device)))
        counts = sum(answer_token_counts(batch, row_user, len(users)) for batch, row_user in micro)
        per_user = torch.zeros(len(users), device=device)
        for batch, row_user in micro:
            with bank.rows(row_user):
                part = answer_token_sums(model, batch, row_user, len(users)) / counts.clamp(min=1)
            part[active].sum().backward()
            per_user += part.detach()
        opt.step(torch.tensor(active))
        opt.zero_grad()
        for k, loss in zip(active, per_user[active].tolist()):
            results[users[k].user_id].losses.append(loss)
    model.eval()
    return PackFit(bank=bank, users=users, results=results)


def fit_users_banked(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
                     hp: LoraHParams, store: AdapterStore, *, base_fp: str, pack_size: int = 16,
                     token_budget: int = 0, on_pack_done=None) -> FitSummary:
    """The banked counterpart of `peftu.fit.fit_users`: same skips, metrics and store records.

    Each pack is fitted together; when it ends, every slot is evaluated (the
    bank answers with that slot) and published. `on_pack_done(summary)` is
    called after each pack with that pack's summary, for progress reporting.
    """
    todo, current = split_current(store, spec, users, hp, base_fp)
    summary = FitSummary(skipped=current)
    empty = [u for u in todo if not u.train]
    for u in empty:
        summary.failed[u.user_id] = "cannot fit an adapter on zero examples"
    init_state = peft_initial_state(model, hp.lora_config(), hp.seed)
    for pack in pack_users([u for u in todo if u.train], pack_size, hp, token_budget):
        done = FitSummary()
        packed = fit_pack(model, tokenizer, spec, pack, hp, init_state)
        try:
            for slot, user in enumerate(pack):
                with tempfile.TemporaryDirectory() as folder, packed.bank.rows(slot):
                    packed.bank.export_slot(slot, folder)
                    done.metrics[user.user_id] = evaluate_and_publish(
                        model, tokenizer, spec, user, folder_files(folder), hp, store, base_fp)
                done.fitted.append(user.user_id)
        finally:
            packed.bank.remove()
        summary.merge(done)
        if on_pack_done:
            on_pack_done(done)
    return summary
