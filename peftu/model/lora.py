"""`LoraHParams` as PEFT's `LoraConfig`: here, not in `peftu.config`, which imports no ML library."""

from __future__ import annotations

from peft import LoraConfig

from peftu.config import LoraHParams


def lora_config(hp: LoraHParams) -> LoraConfig:
    """The PEFT config of an adapter with these hyper-parameters (a causal LM's)."""
    return LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=list(hp.target_modules),
                      task_type="CAUSAL_LM")
