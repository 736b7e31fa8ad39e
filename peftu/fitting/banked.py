"""The banked fit: K users' adapters trained together, exactly as K separate fits.

Read top to bottom, it is the reference loop of `peftu/fitting/reference.py` for K users at
once:

1. K users train at once, one per slot of the bank (a token budget can cap K).
   Users stream through the slots largest first: when a user's fit ends the
   slot is published and handed to the next user, so steps stay full.
2. Every slot starts from PEFT's initial weights for the seed, and every user
   visits their examples in the same seeded mini-batch order as the reference.
3. A banked step is the union of each slot's user's own next mini-batch. The loss is
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
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peftu.bank.model import AdapterBank, peft_initial_state
from peftu.bank.optim import SlotAdamW
from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.errors import StoreError
from peftu.evaluation.evaluate import evaluate_user
from peftu.fitting.reference import FitResult, FitSummary, lr_lambda
from peftu.model.encode import IGNORE, collate, encode, minibatches
from peftu.model.lora import lora_config
from peftu.store import AdapterStore
from peftu.store.current import data_fingerprint, folder_files, is_current, publish_adapter, split_current
from peftu.store.kinds import ADAPTER

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

    This one trains in this process alone. `peftu.fitting.zero.ZeroPackTrainer`
    is the same with the rows of each step split over a DeepSpeed group
    (`rank` of `world`), which is why the loop talks to the trainer only
    through `reset_slot`, `backward` and `step`.
    """

    rank, world = 0, 1
    lockstep = False
    """True when every rank of the group must run the same forwards (ZeRO-3 gathers sharded weights in them)."""

    def __init__(self, model: torch.nn.Module, n_slots: int, hp: LoraHParams):
        self.bank = AdapterBank(model, n_slots, lora_config(hp))
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


def require_examples(users: list[UserRecord]) -> None:
    empty = next((u.user_id for u in users if not u.train), None)
    if empty is not None:
        raise ValueError(f"user {empty!r} has no training examples")


@dataclass
class _Slot:
    """The user a slot is training now: their encoded rows, mini-batch plan and steps taken."""

    user: UserRecord
    encoded: list[tuple[list[int], int]]
    plan: list[list[int]]
    taken: int = 0


def fit_stream(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
               trainer: PackTrainer, init_state: dict[str, torch.Tensor], on_user_done=None,
               on_epoch_end=None) -> tuple[dict[str, FitResult], int]:
    """Fit one adapter per user, the users flowing through the trainer's slots in the given order.

    The first users take the slots; as soon as a user's last step is taken,
    `on_user_done(slot, user, fit_result)` is called (the slot still holds
    their adapter) and the next user takes the slot over with fresh weights,
    optimizer state and schedule. Steps so stay full until the queue runs dry,
    and each slot is still exactly its user's own fit. `on_epoch_end(slot,
    epochs_done, fit_result)` is called right after the step that ends one of
    that slot's epochs, so a tuner can score every user after each epoch.
    Returns every user's losses and the number of banked steps taken.
    """
    require_examples(users)
    queue, n_slots = deque(users), trainer.bank.n_slots
    slots: list[_Slot | None] = [None] * n_slots
    results: dict[str, FitResult] = {}

    def refill(free: list[int]) -> None:
        with trainer.full_bank(modify=True):
            for slot in free:
                slots[slot] = None
                if queue:
                    user = queue.popleft()
                    slots[slot] = _Slot(user, [encode(tokenizer, spec, e.input, e.output, hp.max_len)
                                               for e in user.train],
                                        minibatches(len(user.train), hp.batch_size, hp.seed, hp.epochs))
                    trainer.reset_slot(slot, init_state, lr_lambda(hp.schedule, len(slots[slot].plan)))
                    results[user.user_id] = FitResult(steps=len(slots[slot].plan))

    refill(list(range(n_slots)))
    device = next(model.parameters()).device
    model.train()
    steps = 0
    while any(slots):
        active = [k for k, s in enumerate(slots) if s is not None]
        rows, row_slot = [], []
        for k in active:
            batch_rows = slots[k].plan[slots[k].taken]
            rows += [slots[k].encoded[j] for j in batch_rows]
            row_slot += [k] * len(batch_rows)
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
        steps += 1
        finished = []
        for k, loss in zip(active, per_user[active].tolist()):
            slot = slots[k]
            result = results[slot.user.user_id]
            result.losses.append(loss)
            slot.taken += 1
            per_epoch = len(slot.plan) // hp.epochs
            if on_epoch_end and slot.taken % per_epoch == 0:
                on_epoch_end(k, slot.taken // per_epoch, result)
            if slot.taken == len(slot.plan):
                finished.append(k)
                if on_user_done:
                    on_user_done(k, slot.user, result)
        if finished:
            refill(finished)
        model.train()
    model.eval()
    return results, steps


def fit_pack(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
             hp: LoraHParams, init_state: dict[str, torch.Tensor] | None = None,
             trainer: PackTrainer | None = None, on_epoch_end=None) -> PackFit:
    """Fit one adapter per user of the pack, user k in slot k of the trainer's bank.

    Without a `trainer`, a bank of exactly this pack is made; call
    `.bank.remove()` on the result when done with it. The slots keep their
    users' adapters after the fit (`fit_stream` with no one waiting).
    """
    require_examples(users)
    if init_state is None:
        init_state = peft_initial_state(model, lora_config(hp), hp.seed)
    trainer = trainer or PackTrainer(model, len(users), hp)
    if len(users) > trainer.bank.n_slots:
        raise ValueError(f"a pack of {len(users)} users does not fit a bank of {trainer.bank.n_slots} slots")
    results, _ = fit_stream(model, tokenizer, spec, users, hp, trainer, init_state, on_epoch_end=on_epoch_end)
    return PackFit(bank=trainer.bank, users=users, results=results, trainer=trainer)


def publish_slot(model: torch.nn.Module, tokenizer, spec: TaskSpec, trainer: PackTrainer, slot: int,
                 user: UserRecord, hp: LoraHParams, store: AdapterStore, base_fp: str) -> FitSummary:
    """Evaluate a fitted slot (the bank answers with it) and publish it as the user's adapter.

    With a trainer whose evaluation is collective, every rank of the group
    calls this and only its first rank publishes. A user whose adapter became
    current while it trained (published by a worker of an earlier attempt that
    outlived its group's restart) is skipped, not published twice. A user
    whose publish fails (the store is unreachable or full, after the backend's
    own retries) is recorded as failed with the reason and the fit goes on:
    restarting the worker would refit every user in flight into the same
    broken store. The publish protocol leaves no partial version behind; a
    re-run fits that user.
    """
    done = FitSummary(fitted=[user.user_id])
    with tempfile.TemporaryDirectory() as folder, trainer.bank.rows(slot):
        with trainer.full_bank():
            trainer.bank.export_slot(slot, folder)
        metrics = evaluate_user(model, tokenizer, spec, user)
        if trainer.rank == 0:
            try:
                if is_current(store, ADAPTER.of(spec.name, user.user_id), base_fp=base_fp,
                              data_fp=data_fingerprint(spec, user.train), hp=hp):
                    return FitSummary(skipped=[user.user_id])  # a worker of an earlier attempt got there first
                publish_adapter(store, spec, user, folder_files(folder), hp, base_fp, metrics)
            except StoreError as e:
                return FitSummary(failed={user.user_id: f"publish failed: {e}"})
            done.metrics[user.user_id] = metrics
    return done


def slot_count(pack_size: int, hp: LoraHParams, token_budget: int = 0) -> int:
    """How many users train at once: `pack_size`, fewer if `token_budget` (0: none) caps the
    union batch at roughly that many tokens (each user adds `batch_size * max_len` worst-case tokens)."""
    return pack_size if token_budget <= 0 else max(1, min(pack_size, token_budget // (hp.batch_size * hp.max_len)))


def largest_first(users: list[UserRecord]) -> list[UserRecord]:
    """The order users take the slots in: the last to start are the smallest, so the
    final steps, when the slots empty one by one, are few."""
    return sorted(users, key=lambda u: (-len(u.train), u.user_id))


def plan_users(store: AdapterStore, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
               base_fp: str) -> tuple[FitSummary, list[UserRecord]]:
    """What a run has to do: the users to skip or fail at once, and the rest `largest_first`."""
    todo, current = split_current(store, spec, users, hp, base_fp)
    summary = FitSummary(skipped=current)
    for u in todo:
        if not u.train:
            summary.failed[u.user_id] = "cannot fit an adapter on zero examples"
    return summary, largest_first([u for u in todo if u.train])


def fit_users_banked(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
                     hp: LoraHParams, store: AdapterStore, *, base_fp: str, pack_size: int = 16,
                     token_budget: int = 0, on_progress=None,
                     planned: tuple[FitSummary, list[UserRecord]] | None = None) -> FitSummary:
    """The banked counterpart of `peftu.fitting.reference.fit_users`: same skips, metrics and store records.

    Users stream through one bank of `slot_count(pack_size, ...)` slots and
    each is published as soon as their fit ends. `on_progress(summary)` is
    called with every published user's summary, for progress reporting.
    `planned`: `plan_users`' answer for `users`, where the caller planned already.
    """
    summary, todo = planned or plan_users(store, spec, users, hp, base_fp)
    if not todo:
        return summary
    init_state = peft_initial_state(model, lora_config(hp), hp.seed)
    trainer = PackTrainer(model, min(len(todo), slot_count(pack_size, hp, token_budget)), hp)
    return run_stream(model, tokenizer, spec, todo, hp, store, base_fp, trainer, init_state, summary, on_progress)


def run_stream(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
               hp: LoraHParams, store: AdapterStore, base_fp: str, trainer: PackTrainer,
               init_state: dict[str, torch.Tensor], summary: FitSummary, on_progress=None) -> FitSummary:
    """Stream the users through the trainer's bank, publishing each as they finish, then take the bank out.

    The trainer's first rank publishes and reports; in lockstep the other
    ranks evaluate with it (their forwards are the group's collectives).
    """
    def publish(slot: int, user: UserRecord, _result: FitResult) -> None:
        if trainer.rank == 0 or trainer.lockstep:
            done = publish_slot(model, tokenizer, spec, trainer, slot, user, hp, store, base_fp)
        if trainer.rank == 0:
            summary.merge(done)
            if on_progress:
                on_progress(done)

    try:
        fit_stream(model, tokenizer, spec, users, hp, trainer, init_state, on_user_done=publish)
    finally:
        trainer.bank.remove()
    return summary
