"""The reference fit: one user's LoRA with plain PEFT, written out plainly.

This is the loop the published OPPU / PEFT-U code runs per user: wrap the base
with `get_peft_model`, a fresh AdamW, padded mini-batches, loss on the answer
tokens only. It stays simple on purpose: the banked fit is checked against it
(same seed, same data order, same weights) and its speed is the baseline.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field

from .data.schema import Example, TaskSpec, UserRecord
from .encode import collate, encode, minibatches
from .errors import StoreError
from .eval import evaluate_examples
from .store import REQUIRED_FILES, AdapterStore, fingerprint


class LoraHParams(BaseModel):
    """Everything that decides an adapter's weights (its fingerprint covers all of it)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]
    lr: float = Field(2e-2, gt=0)
    """Right for the tiny default base; real bases want ~1e-4 (`peftu tune` searches it)."""
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    """0 turns clipping off."""
    schedule: str = Field("linear", pattern="^(linear|constant)$")
    max_len: int = Field(256, ge=8)
    seed: int = 0

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")


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
    model = get_peft_model(base, peft_config or hp.lora_config())
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


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """The standard PEFT pair from a saved adapter folder, as bytes for the store."""
    return {name: (Path(folder) / name).read_bytes() for name in REQUIRED_FILES}


def adapter_files(model: PeftModel) -> dict[str, bytes]:
    """A fitted PEFT model's adapter (PEFT's README.md stays behind)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return folder_files(tmp)


def data_fingerprint(spec: TaskSpec, examples: list[Example]) -> str:
    """What the adapter learned from: the prompt template and the training examples."""
    return fingerprint({"prompt": spec.prompt, "train": [[e.id, e.input, e.output] for e in examples]})


def is_current(store: AdapterStore, task: str, user_id: str, *, base_fp: str, data_fp: str,
               hp: LoraHParams) -> bool:
    """Has this user an adapter from the same base, data and hyper-parameters?"""
    if not store.has_adapter(task, user_id):
        return False
    m = store.manifest(task, user_id)
    return (m.base_fingerprint, m.data_fingerprint, m.hparams_fingerprint) == (
        base_fp, data_fp, fingerprint(hp.model_dump()))


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


def split_current(store: AdapterStore, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
                  base_fp: str) -> tuple[list[UserRecord], list[str]]:
    """Users that still need a fit, and the ids of those whose adapter is current."""
    todo, current = [], []
    for user in users:
        fresh = is_current(store, spec.name, user.user_id, base_fp=base_fp,
                           data_fp=data_fingerprint(spec, user.train), hp=hp)
        (current.append(user.user_id) if fresh else todo.append(user))
    return todo, current


def evaluate_and_publish(model, tokenizer, spec: TaskSpec, user: UserRecord, files: dict[str, bytes],
                         hp: LoraHParams, store: AdapterStore, base_fp: str) -> dict[str, float]:
    """Score a fitted adapter on the user's val and test examples, then publish it with them."""
    metrics = evaluate_user(model, tokenizer, spec, user)
    publish_adapter(store, spec, user, files, hp, base_fp, metrics)
    return metrics


def evaluate_user(model, tokenizer, spec: TaskSpec, user: UserRecord) -> dict[str, float]:
    """The model's metrics on the user's val and test examples (`val_accuracy`, `test_mae`, ...)."""
    metrics = {f"val_{k}": v for k, v in evaluate_examples(model, tokenizer, spec, user.val).items()}
    return metrics | {f"test_{k}": v for k, v in evaluate_examples(model, tokenizer, spec, user.test).items()}


def publish_adapter(store: AdapterStore, spec: TaskSpec, user: UserRecord, files: dict[str, bytes],
                    hp: LoraHParams, base_fp: str, metrics: dict[str, float]) -> None:
    """A user's fitted adapter into the store, with the fingerprints that make re-runs skip it."""
    store.publish(spec.name, user.user_id, files, base_fingerprint=base_fp,
                  data_fingerprint=data_fingerprint(spec, user.train), hparams=hp.model_dump(),
                  metrics=metrics)


def fit_users(base: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
              hp: LoraHParams, store: AdapterStore, *, base_fp: str,
              progress: bool = True) -> FitSummary:
    """Fit, evaluate and publish one adapter per user, one after another.

    Users whose adapter is already current are skipped (a re-run resumes);
    a user whose fit fails is recorded with its reason and the rest go on.
    """
    from tqdm import tqdm

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


def fit_global(base: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
               hp: LoraHParams) -> PeftModel:
    """One adapter on every user's training examples pooled: the non-personal baseline."""
    pooled = [e for u in users for e in u.train]
    model, _ = fit_adapter(base, tokenizer, spec, pooled, hp, progress=f"global adapter ({len(pooled)} examples)")
    return model
