"""The adapter bank: many users' LoRA adapters stacked beside one frozen base.

`layer` holds the math (one banked linear layer), `model` the management
(injecting layers, slots, PEFT import/export), `optim` the per-slot AdamW, and
`train` the banked fit loop.
"""

from peftu.bank.layer import BankedLoraLinear, SlotContext
from peftu.bank.model import AdapterBank, peft_initial_state
from peftu.bank.optim import SlotAdamW
from peftu.fitting.banked import (
           PackFit,
           PackTrainer,
           answer_token_loss,
           fit_pack,
           fit_stream,
           largest_first,
           slot_count,
)

__all__ = ["AdapterBank", "BankedLoraLinear", "PackFit", "PackTrainer", "SlotAdamW", "SlotContext",
           "answer_token_loss", "fit_pack", "fit_stream", "largest_first", "peft_initial_state", "slot_count"]
