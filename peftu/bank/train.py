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

import contextlib
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.schema import TaskSpec, UserRecord
from ..encode import IGNORE, collate, encode, minibatches
from ..fit import (FitResult, FitSummary, LoraHParams, evaluate_user, folder_files, lr_lambda,
                   publish_adapter, split_current)
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
    trainer: PackTrainer


class PackTrainer:
    """A bank of `n_slots` adapters and its optimizer, used pack after pack.

    This one trains in this process alone. `peftu.bank.zero.ZeroPackTrainer`
    is the same with the rows of each step split over a DeepSpeed group
    (`rank` of `world`), which is why the loop talks to the trainer only
    through `reset_slot`, `backward` and `step`.
    """

    rank, world = 0, 1
    lockstep = False
    """True when every rank of the group must run the same forwards (ZeRO-3 gathers sharded weights in them)."""

    def __init__(self, model: torch.nn.Module, n_slots: int, hp: LoraHParams):
        self.bank = AdapterBank(model, n_slots, hp.lora_config())
        self.opt = SlotAdamW(self.bank.parameters(), n_slots, lr=hp.lr, weight_decay=hp.weight_decay,
                             max_grad_norm=hp.max_grad_norm)

    def full_bank(self, modify: bool = False) -> contextlib.AbstractContextManager:
        """While open, the bank's tensors are whole on this rank (ZeRO-3 shards them otherwise)."""
        return contextlib.nullcontext()

    def reset_slot(self, slot: int, state: dict[str, torch.Tensor], lr_factor) -> None:
        """A new user in `slot`: initial weights, a fresh optimizer state and schedule (inside `full_bank(modify=True)`)."""
        self.bank.load_slot(slot, state)
        self.opt.reset_slot(slot, lr_factor)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of one micro-batch's loss (they add up until `step`)."""
        loss.backward()

    def step(self, active: torch.Tensor, per_user: torch.Tensor) -> torch.Tensor:
        """Step the active slots; returns each user's loss over the whole step."""
        self.opt.step(active)
        self.opt.zero_grad()
        return per_user


def row_answer_tokens(row: tuple[list[int], int]) -> int:
    """How many loss terms an encoded row has (every target after the first position that is an answer)."""
    ids, n_prompt = row
    return len(ids) - max(n_prompt, 1)


def my_rows(lengths: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of a step's rows: dealt round-robin by length, so shares cost about the same."""
    ordered = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return ordered[rank::world]


def my_micro_batches(lengths: list[int], rank: int, world: int, lockstep: bool) -> list[list[int] | None]:
    """This rank's micro-batches of a step (row indices). In lockstep every rank gets as many:
    the short ones are filled with None, a forward made only to join the others' collectives."""
    def groups(r: int) -> list[list[int]]:
        mine = my_rows(lengths, r, world)
        return [[mine[g] for g in group] for group in length_groups([lengths[j] for j in mine])]

    micro: list[list[int] | None] = groups(rank)
    if lockstep:
        micro += [None] * (max(len(groups(r)) for r in range(world)) - len(micro))
    return micro


def fit_pack(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
             hp: LoraHParams, init_state: dict[str, torch.Tensor] | None = None,
             trainer: PackTrainer | None = None, on_epoch_end=None) -> PackFit:
    """Fit one adapter per user of the pack, user k in slot k of the trainer's bank.

    Without a `trainer`, a bank of exactly this pack is made; call
    `.bank.remove()` on the result when done with it. `on_epoch_end(slot,
    epochs_done, fit_result)` is called right after the step that ends one of
    that slot's epochs, so a tuner can score every user after each epoch.
    """
    if any(not u.train for u in users):
        empty = next(u.user_id for u in users if not u.train)
        raise ValueError(f"user {empty!r} has no training examples")
    if init_state is None:
        init_state = peft_initial_state(model, hp.lora_config(), hp.seed)
    trainer = trainer or PackTrainer(model, len(users), hp)
    n_slots = trainer.bank.n_slots
    encoded, plans = [], []
    with trainer.full_bank(modify=True):
        for slot, user in enumerate(users):
            encoded.append([encode(tokenizer, spec, e.input, e.output, hp.max_len) for e in user.train])
            plans.append(minibatches(len(user.train), hp.batch_size, hp.seed, hp.epochs))
            trainer.reset_slot(slot, init_state, lr_lambda(hp.schedule, len(plans[-1])))
    results = {u.user_id: FitResult(steps=len(p)) for u, p in zip(users, plans)}
    device = next(model.parameters()).device

    model.train()
    for i in range(max(len(p) for p in plans)):
        active = [k for k, p in enumerate(plans) if i < len(p)]
        rows, row_slot = [], []
        for k in active:
            rows += [encoded[k][j] for j in plans[k][i]]
            row_slot += [k] * len(plans[k][i])
        counts = torch.zeros(n_slots, dtype=torch.long).index_add_(
            0, torch.tensor(row_slot), torch.tensor([row_answer_tokens(r) for r in rows])).to(device)
        per_user = torch.zeros(n_slots, device=device)
        for group in my_micro_batches([len(ids) for ids, _ in rows], trainer.rank, trainer.world, trainer.lockstep):
            batch = {k: v.to(device) for k, v in collate([rows[j] for j in group or [0]], tokenizer.pad_token_id).items()}
            row_user = torch.tensor([row_slot[j] for j in group or [0]], device=device)
            with trainer.bank.rows(row_user):
                part = answer_token_sums(model, batch, row_user, n_slots) / counts.clamp(min=1)
            if group is None:
                part = part * 0.0
            trainer.backward(part[active].sum())
            per_user += part.detach()
        per_user = trainer.step(torch.tensor(active), per_user)
        for k, loss in zip(active, per_user[active].tolist()):
            results[users[k].user_id].losses.append(loss)
            per_epoch = len(plans[k]) // hp.epochs
            if on_epoch_end and (i + 1) % per_epoch == 0:
                on_epoch_end(k, (i + 1) // per_epoch, results[users[k].user_id])
                model.train()
    model.eval()
    return PackFit(bank=trainer.bank, users=users, results=results, trainer=trainer)


def publish_pack(model: torch.nn.Module, tokenizer, spec: TaskSpec, packed: PackFit, hp: LoraHParams,
                 store: AdapterStore, base_fp: str) -> FitSummary:
    """Evaluate every slot of a fitted pack (the bank answers with that slot) and publish it.

    With a trainer whose evaluation is collective, every rank of the group
    calls this and only its first rank publishes.
    """
    done = FitSummary()
    for slot, user in enumerate(packed.users):
        with tempfile.TemporaryDirectory() as folder, packed.bank.rows(slot):
            with packed.trainer.full_bank():
                packed.bank.export_slot(slot, folder)
            metrics = evaluate_user(model, tokenizer, spec, user)
            if packed.trainer.rank == 0:
                publish_adapter(store, spec, user, folder_files(folder), hp, base_fp, metrics)
                done.metrics[user.user_id] = metrics
        done.fitted.append(user.user_id)
    return done


def plan_packs(store: AdapterStore, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams, base_fp: str,
               pack_size: int, token_budget: int) -> tuple[FitSummary, list[list[UserRecord]]]:
    """What a run has to do: the users to skip or fail at once, and packs of the rest."""
    todo, current = split_current(store, spec, users, hp, base_fp)
    summary = FitSummary(skipped=current)
    for u in todo:
        if not u.train:
            summary.failed[u.user_id] = "cannot fit an adapter on zero examples"
    return summary, pack_users([u for u in todo if u.train], pack_size, hp, token_budget)


def fit_users_banked(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
                     hp: LoraHParams, store: AdapterStore, *, base_fp: str, pack_size: int = 16,
                     token_budget: int = 0, on_pack_done=None) -> FitSummary:
    """The banked counterpart of `peftu.fit.fit_users`: same skips, metrics and store records.

    Each pack is fitted together in one bank (made once, re-used pack after
    pack) and published when it ends. `on_pack_done(summary)` is called after
    each pack with that pack's summary, for progress reporting.
    """
    summary, packs = plan_packs(store, spec, users, hp, base_fp, pack_size, token_budget)
    if not packs:
        return summary
    init_state = peft_initial_state(model, hp.lora_config(), hp.seed)
    trainer = PackTrainer(model, max(len(p) for p in packs), hp)
    return run_packs(model, tokenizer, spec, packs, hp, store, base_fp, trainer, init_state, summary, on_pack_done)


def run_packs(model: torch.nn.Module, tokenizer, spec: TaskSpec, packs: list[list[UserRecord]],
              hp: LoraHParams, store: AdapterStore, base_fp: str, trainer: PackTrainer,
              init_state: dict[str, torch.Tensor], summary: FitSummary, on_pack_done=None) -> FitSummary:
    """Fit and publish pack after pack in the trainer's bank, then take the bank out of the model.

    The trainer's first rank publishes and reports; in lockstep the other
    ranks evaluate with it (their forwards are the group's collectives).
    """
    try:
        for pack in packs:
            packed = fit_pack(model, tokenizer, spec, pack, hp, init_state, trainer)
            if trainer.rank == 0 or trainer.lockstep:
                done = publish_pack(model, tokenizer, spec, packed, hp, store, base_fp)
            if trainer.rank == 0:
                summary.merge(done)
                if on_pack_done:
                    on_pack_done(done)
    finally:
        trainer.bank.remove()
    return summary
