"""The adapter bank: K users' LoRA adapters living in one frozen base model.

`AdapterBank(model, n_slots, lora_config)` replaces the LoRA target modules of
a Hugging Face causal LM (Llama/Qwen2 `q_proj ... down_proj`, GPT-2 `c_attn`,
...) by `BankedLoraLinear` layers; `with bank.rows(slots):` runs the model
with each batch row on its user's adapter. Slots are filled from and exported
to the standard PEFT format, so every adapter the bank trains loads with
`PeftModel.from_pretrained`, and every PEFT LoRA adapter can be served by it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .layer import BankedLoraLinear, SlotContext

PEFT_PREFIX = "base_model.model."


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex on the full name, a list matches the last name part."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name.split(".")[-1] in targets


def peft_initial_state(model: nn.Module, config: LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA weights PEFT starts a fit from after `torch.manual_seed(seed)`.

    The reference fit seeds, then calls `get_peft_model`; doing the same here
    (and unloading again) gives the bank the very same starting point.
    """
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model.unload()
    return state


class AdapterBank:
    """Stacked LoRA adapters of `n_slots` users inside `model` (modified in place)."""

    def __init__(self, model: nn.Module, n_slots: int, config: LoraConfig):
        if config.lora_dropout:
            raise ValueError("the bank trains without LoRA dropout (set dropout to 0)")
        self.model = model
        self.n_slots = n_slots
        self.config = config
        self.ctx = SlotContext()
        self.layers: dict[str, BankedLoraLinear] = {}
        scale = config.lora_alpha / config.r
        for name, module in list(model.named_modules()):
            if name and _matches(name, config.target_modules) and not isinstance(module, BankedLoraLinear):
                banked = BankedLoraLinear(module, n_slots, config.r, scale, self.ctx)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, banked)
                self.layers[name] = banked
        if not self.layers:
            raise ValueError(f"no module of the model matches target_modules={config.target_modules}")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in self.layers.values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, A and B of every banked layer, in a fixed order."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor | list[int] | int) -> Iterator[None]:
        """Run the model with batch row i on adapter `slots[i]` (an int: every row on one slot)."""
        if isinstance(slots, int):
            if not 0 <= slots < self.n_slots:
                raise IndexError(f"slot {slots} out of range 0..{self.n_slots - 1}")
        else:
            slots = torch.as_tensor(slots, dtype=torch.long)
            if slots.numel() and (slots.min() < 0 or slots.max() >= self.n_slots):
                raise IndexError(f"slot out of range 0..{self.n_slots - 1}: {slots.tolist()}")
            slots = slots.to(next(iter(self.layers.values())).lora_A.device)
        self.ctx.slots = slots
        try:
            yield
        finally:
            self.ctx.slots = None

    # --- PEFT interchange ------------------------------------------------------

    def load_slot(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Fill a slot from a PEFT LoRA state dict (`...q_proj.lora_A.weight` keys)."""
        seen = set()
        for key, value in state.items():
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if module not in self.layers or kind not in ("A.weight", "B.weight"):
                raise KeyError(f"adapter weight {key!r} fits no banked layer of this model")
            layer = self.layers[module]
            target = layer.lora_A if kind == "A.weight" else layer.lora_B
            if tuple(value.shape) != tuple(target.shape[1:]):
                raise ValueError(f"adapter weight {key!r} has shape {tuple(value.shape)}, "
                                 f"the bank expects {tuple(target.shape[1:])}")
            with torch.no_grad():
                target[slot].copy_(value.to(target.dtype))
            seen.add(key)
        missing = {f"{PEFT_PREFIX}{name}.lora_{k}.weight" for name in self.layers for k in "AB"} - seen
        if missing:
            raise KeyError(f"adapter lacks weights for {sorted(missing)[0]} (and {len(missing) - 1} more)")

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """A slot's weights as a PEFT LoRA state dict."""
        state = {}
        for name, layer in self.layers.items():
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[slot].detach().clone().contiguous()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[slot].detach().clone().contiguous()
        return state

    def export_slot(self, slot: int, folder: Path, base_name_or_path: str = "") -> None:
        """Write a slot as `adapter_config.json` + `adapter_model.safetensors`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.base_model_name_or_path = base_name_or_path or None
        self.config.save_pretrained(str(folder))
        save_file(self.slot_state(slot), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    def import_slot(self, slot: int, folder: Path) -> None:
        """Fill a slot from a PEFT adapter folder (only safetensors is ever read)."""
        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("peft_type") != "LORA" or config.get("r") != self.config.r:
            raise ValueError(f"{folder}: a LoRA adapter of rank {self.config.r} is needed, "
                             f"got {config.get('peft_type')} r={config.get('r')}")
        self.load_slot(slot, load_file(str(folder / "adapter_model.safetensors")))

    def remove(self) -> nn.Module:
        """Put the original modules back; returns the plain base model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer.base)
        self.layers = {}
        return self.model
