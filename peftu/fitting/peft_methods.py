"""PEFT-U's other per-user methods through plain PEFT: IA3, prompt tuning, prefix tuning.

Each user gets their own module of the method, fitted on their training split
by the one reference loop (`peftu.fitting.reference.fit_adapter`, given the method's PEFT
config in place of a LoRA) and scored on their test split, one user after
another, as PEFT-U runs them.

Soft tokens need far larger steps than LoRA's weights (prompt tuning's
authors train them at 0.3): at LoRA's 2e-2 a user's few steps move the
label scores by hundredths of a nat and every answer stays the base's. So
prompt and prefix tuning take their own learning rate (`SOFT_TOKEN_LR`,
measured on the tiny base: synth-rating MAE 0.71 -> 0.51 and 0.54 over 8
users, against no change at 2e-2); IA3 takes the run's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import IA3Config, PeftConfig, PrefixTuningConfig, PromptTuningConfig

from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.evaluation.evaluate import evaluate_examples
from peftu.fitting.reference import fit_adapter, release

VIRTUAL_TOKENS = 8
"""Soft tokens of prompt and prefix tuning: PEFT-U's order of magnitude, short next to the tiny base's 256."""

SOFT_TOKEN_LR = {"prompt-tuning": 1.0, "prefix-tuning": 0.3}
"""The learning rate of each soft-token method, in place of the run's (LoRA's) one."""

PEFT_METHODS: dict[str, Callable[[], PeftConfig]] = {
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),
    "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
    "prefix-tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
}


def fit_and_score_users(base: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
                        hp: LoraHParams, method: str, split: str = "test", progress: bool = True
                        ) -> dict[str, dict[str, float]]:
    """One `method` module per user, fitted on their train split; their metrics on `split`.

    The base comes back unchanged after every user. Prompt and prefix tuning
    are fitted at their own learning rate (`SOFT_TOKEN_LR`). A user without training
    examples is left out (no row), as the fit would refuse them.
    """
    from tqdm import tqdm

    if method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; choose one of {sorted(PEFT_METHODS)}")
    if method in SOFT_TOKEN_LR:
        hp = hp.model_copy(update={"lr": SOFT_TOKEN_LR[method]})
    per_user = {}
    for user in tqdm(users, desc=f"{method} per user", unit="user", disable=not progress):
        if not user.train:
            continue
        model, _ = fit_adapter(base, tokenizer, spec, user.train, hp, peft_config=PEFT_METHODS[method]())
        try:
            per_user[user.user_id] = evaluate_examples(model, tokenizer, spec, getattr(user, split))
        finally:
            base = release(model)
    return per_user
