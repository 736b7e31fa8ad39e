"""The adapter bank: many users' LoRA adapters stacked beside one frozen base.

`layer` holds the math (one banked linear layer), `model` the management
(injecting layers, slots, PEFT import/export), `rows` the generating rows'
weights kept per row while they run, and `optim` the per-slot AdamW.
The banked fit loop that trains a bank is `peftu.fitting.banked`.
"""

from peftu.bank.layer import BankedLoraLinear, SlotContext
from peftu.bank.model import AdapterBank, peft_initial_state
from peftu.bank.optim import SlotAdamW

__all__ = ["AdapterBank", "BankedLoraLinear", "SlotAdamW", "SlotContext", "peft_initial_state"]
