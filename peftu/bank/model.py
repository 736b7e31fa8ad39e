"""The adapter bank: K users' LoRA adapters living in one frozen base model.

`AdapterBank(model, n_slots, lora_config)` replaces the LoRA target modules of
a Hugging Face causal LM (Llama/Qwen2 `q_proj ... down_proj`, GPT-2 `c_attn`,
...) by `BankedLoraLinear` layers; `with bank.rows(slots):` runs the model
with each batch row on its user's adapter. Slots are filled from and exported
to the standard PEFT format, so every adapter the bank trains loads with
`PeftModel.from_pretrained`, and every PEFT LoRA adapter can be served by it
(one of a smaller rank is zero-padded, with its own alpha / r as its slot's scale).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from peftu.bank.layer import BankedLoraLinear, SlotContext

PEFT_PREFIX = "base_model.model."


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex on the full name, a list matches the last name part."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name.split(".")[-1] in targets


def lora_scale(config: dict) -> float:
    """The factor PEFT puts on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def parse_adapter(config_json: bytes | str, weights: bytes, max_rank: int, where: str = "adapter"
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """A PEFT LoRA adapter's two files as (weights, scale); the weights only ever as safetensors.

    Refuses what a bank cannot compute exactly: other PEFT types, DoRA, biases,
    per-module ranks or alphas, and ranks above the bank's.
    """
    try:
        config = json.loads(config_json)
    except ValueError as e:
        raise ValueError(f"{where}: adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: not a LoRA adapter (peft_type {kind!r})")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max_rank:
        raise ValueError(f"{where}: a LoRA adapter of rank 1..{max_rank} is needed, got r={r!r}")
    # NaN or inf here would turn every answer of the adapter's rows into NaN.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    for key, plain in (("use_dora", False), ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {}),
                       ("modules_to_save", None)):
        if config.get(key) not in (plain, None):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported by the bank")
    try:
        state = load_safetensors(weights)
    except SafetensorError as e:
        raise ValueError(f"{where}: adapter_model.safetensors is not a readable safetensors file: {e}") from None
    return state, lora_scale(config)


def read_adapter(folder: Path, max_rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """`parse_adapter` on a PEFT adapter folder."""
    folder = Path(folder)
    return parse_adapter((folder / "adapter_config.json").read_bytes(),
                         (folder / "adapter_model.safetensors").read_bytes(), max_rank, str(folder))


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
        scale = lora_scale({"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora})
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

    def slot_bytes(self) -> int:
        """Memory one slot takes (A and B of every banked layer at the bank's rank)."""
        return sum(layer.lora_A[0].nbytes + layer.lora_B[0].nbytes for layer in self.layers.values())

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, A and B of every banked layer, in a fixed order."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @contextlib.contextmanager
    def rows(self, slots: torch.Tensor | list[int] | int, gathered: dict | None = None,
             runs: list[tuple[int, int, int]] | None = None) -> Iterator[None]:
        """Run the model with batch row i on adapter `slots[i]` (an int: every row on one slot).

        `gathered`: each layer's A and scale * B of these rows, kept while they run
        (`peftu.bank.rows.RowWeights`), instead of gathered at every forward.
        `runs`: a packed forward, one sequence of rows (`SlotContext.runs`).
        """
        if isinstance(slots, int):
            if not 0 <= slots < self.n_slots:
                raise IndexError(f"slot {slots} out of range 0..{self.n_slots - 1}")
        else:
            slots = torch.as_tensor(slots, dtype=torch.long)
            if slots.numel() and (slots.min() < 0 or slots.max() >= self.n_slots):
                raise IndexError(f"slot out of range 0..{self.n_slots - 1}: {slots.tolist()}")
            slots = slots.to(next(iter(self.layers.values())).lora_A.device)
        bad = [slot for _, _, slot in runs or [] if not 0 <= slot < self.n_slots]
        if bad:
            raise IndexError(f"slot out of range 0..{self.n_slots - 1}: {bad}")
        self.ctx.slots, self.ctx.runs, self.ctx.gathered = slots, runs, gathered
        try:
            yield
        finally:
            self.ctx.slots = self.ctx.runs = None
            self.ctx.gathered = None

    # --- PEFT interchange ------------------------------------------------------

    def load_slot(self, slot: int, state: dict[str, torch.Tensor], scale: float | None = None) -> None:
        """Fill a slot from a PEFT LoRA state dict (`...q_proj.lora_A.weight` keys).

        A rank below the bank's is zero-padded; `scale` (alpha / r of that
        adapter) defaults to the bank config's.
        """
        updates = []
        for key, value in state.items():
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if module not in self.layers or kind not in ("A.weight", "B.weight"):
                raise KeyError(f"adapter weight {key!r} fits no banked layer of this model")
            target = self.layers[module].lora_A if kind == "A.weight" else self.layers[module].lora_B
            rank_dim = 0 if kind == "A.weight" else 1
            if not value.is_floating_point():
                raise ValueError(f"adapter weight {key!r} has dtype {value.dtype}, LoRA weights are floats")
            if not torch.isfinite(value).all():
                raise ValueError(f"adapter weight {key!r} holds NaN or infinite values")
            full = tuple(target.shape[1:])
            fits = value.dim() == 2 and all(
                n <= m if d == rank_dim else n == m for d, (n, m) in enumerate(zip(value.shape, full)))
            if not fits:
                raise ValueError(f"adapter weight {key!r} has shape {tuple(value.shape)}, "
                                 f"the bank expects {full} (a smaller rank is padded)")
            updates.append((key, target, value))
        missing = {f"{PEFT_PREFIX}{name}.lora_{k}.weight" for name in self.layers for k in "AB"} - set(state)
        if missing:
            raise KeyError(f"adapter lacks weights for {sorted(missing)[0]} (and {len(missing) - 1} more)")
        ranks = {v.shape[0] if k.endswith("lora_A.weight") else v.shape[1] for k, _, v in updates}
        if len(ranks) > 1:
            raise ValueError(f"adapter mixes ranks {sorted(ranks)} across its weights")
        with torch.no_grad():
            for _, target, value in updates:
                target[slot].zero_()
                target[slot][: value.shape[0], : value.shape[1]].copy_(value.to(target.dtype))
            scale = self.config.lora_alpha / self.config.r if scale is None else scale
            for layer in self.layers.values():
                layer.scales[slot] = scale

    def clear_slot(self, slot: int) -> None:
        """Zero a slot: it then adds nothing (the base model's answer)."""
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()
                layer.scales[slot] = 0.0

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
        state, scale = read_adapter(folder, self.config.r)
        self.load_slot(slot, state, scale)

    def remove(self) -> nn.Module:
        """Put the original modules back; returns the plain base model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer.base)
        self.layers = {}
        return self.model
