"""The reference fit: one user's LoRA with plain PEFT, written out plainly.

This is the loop the published OPPU / PEFT-U code runs per user: wrap the base
with `get_peft_model`, a fresh AdamW, padded mini-batches, loss on the answer
tokens only. It stays simple on purpose: the banked fit is checked against it
(same seed, same data order, same weights) and its speed is the baseline.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from peft import PeftConfig, PeftModel, get_peft_model

from peftu.config import LoraHParams
from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.errors import StoreError
from peftu.evaluation.evaluate import evaluate_user
from peftu.model.encode import collate, encode, minibatches
from peftu.model.lora import lora_config
from peftu.store import AdapterStore
from peftu.store.current import folder_files, publish_adapter, split_current
from peftu.store.task_spec import publish_task_spec


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    """The loss of every optimizer step, in order."""
    steps: int = 0


def lr_lambda(schedule: str, total_steps: int):
    """Learning-rate factor per step: constant, or linear decay to zero."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: max(0.0, 1.0 - step / max(1, total_steps))


def fit_adapter(base: torch.nn.Module, tokenizer, spec: TaskSpec, examples: list[Example],
                hp: LoraHParams, loss_fn=None, progress: str | None = None,
                peft_config: PeftConfig | None = None) -> tuple[PeftModel, FitResult]:
    """Fit one LoRA on `examples`; returns the wrapped model and its losses.

    `base` is modified in place by PEFT; call `release(model)` on the result
    to get the untouched base back for the next user. `loss_fn(model, batch)`
    replaces the model's own loss (the fit benchmark's floor uses the bank's
    answer-token-only loss). `progress` names a progress bar over the steps.
    `peft_config` fits another PEFT method (IA3, prompt or prefix tuning) in
    place of `hp`'s LoRA with the same loop; the other fields of `hp` hold.
    """
    from tqdm import tqdm

    if not examples:
        raise ValueError("cannot fit an adapter on zero examples")
    torch.manual_seed(hp.seed)
    model = get_peft_model(base, peft_config or lora_config(hp))
    encoded = [encode(tokenizer, spec, e.input, e.output, hp.max_len) for e in examples]
    batches = minibatches(len(encoded), hp.batch_size, hp.seed, hp.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.schedule, len(batches)))
    result = FitResult()
    model.train()
    for rows in tqdm(batches, desc=progress, unit="step", disable=progress is None):
        batch = collate([encoded[i] for i in rows], tokenizer.pad_token_id)
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        loss.backward()
        if hp.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
    result.steps = len(batches)
    model.eval()
    return model, result


def release(model: PeftModel) -> torch.nn.Module:
    """The base back from a fitted PEFT model: injected layers (LoRA, IA3) are taken out;
    prompt-learning methods never touched the base, which is simply unwrapped."""
    if model.peft_config[model.active_adapter].is_prompt_learning:
        return model.get_base_model()
    return model.unload()


def adapter_files(model: PeftModel) -> dict[str, bytes]:
    """A fitted PEFT model's adapter (PEFT's README.md stays behind)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return folder_files(tmp)


@dataclass
class FitSummary:
    fitted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Val and test metrics of each fitted user."""

    def merge(self, other: "FitSummary") -> None:
        self.fitted += other.fitted
        self.skipped += other.skipped
        self.failed |= other.failed
        self.metrics |= other.metrics


def evaluate_and_publish(model, tokenizer, spec: TaskSpec, user: UserRecord, files: dict[str, bytes],
                         hp: LoraHParams, store: AdapterStore, base_fp: str) -> dict[str, float]:
    """Score a fitted adapter on the user's val and test examples, then publish it with them."""
    metrics = evaluate_user(model, tokenizer, spec, user)
    publish_adapter(store, spec, user, files, hp, base_fp, metrics)
    return metrics


def fit_users(base: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
              hp: LoraHParams, store: AdapterStore, *, base_fp: str,
              progress: bool = True) -> FitSummary:
    """Fit, evaluate and publish one adapter per user, one after another.

    Users whose adapter is already current are skipped (a re-run resumes);
    a user whose fit fails is recorded with its reason and the rest go on.
    """
    from tqdm import tqdm

    publish_task_spec(store, spec)  # what a replica serves the task's adapters with
    todo, current = split_current(store, spec, users, hp, base_fp)
    summary = FitSummary(skipped=current)
    for user in tqdm(todo, desc=f"fitting {spec.name}", unit="user", disable=not progress):
        try:
            model, _ = fit_adapter(base, tokenizer, spec, user.train, hp)
        except (ValueError, RuntimeError) as e:
            summary.failed[user.user_id] = str(e)
            continue
        try:
            summary.metrics[user.user_id] = evaluate_and_publish(
                model, tokenizer, spec, user, adapter_files(model), hp, store, base_fp)
        except StoreError as e:  # unreachable or full store: nothing half-written, a re-run fits them
            summary.failed[user.user_id] = f"publish failed: {e}"
            continue
        finally:
            model.unload()
        summary.fitted.append(user.user_id)
    return summary
