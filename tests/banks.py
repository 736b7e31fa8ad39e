"""A serving bank of a few users' random adapters and their plain PEFT references, for unit tests."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from peftu.bank import AdapterBank
from peftu.inference.generate import BASE_SLOT
from peftu.model.base import load_base


def users_bank(base: str) -> Iterator[tuple]:
    """(model, tokenizer, bank, adapter folders): a bank whose slots 1..3 hold three users' random adapters
    of ranks 8, 4 and 2 (alpha varies), slot 0 the base. A generator: the folders go when it resumes."""
    model, tok = load_base(base)
    folders = tempfile.TemporaryDirectory()
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 16.0), (4, 4.0), (2, 8.0)]
    for i, (r, alpha) in enumerate(shapes):
        one = AdapterBank(model, 1, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for p in one.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        one.export_slot(0, Path(folders.name) / f"u{i}")
        one.remove()
    bank = AdapterBank(model, 4, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    bank.clear_slot(BASE_SLOT)
    for i in range(3):
        bank.import_slot(i + 1, Path(folders.name) / f"u{i}")
    yield model, tok, bank, Path(folders.name)
    folders.cleanup()


def peft_reference(base: str, folders: Path) -> Callable[[int], torch.nn.Module]:
    """slot -> that user's PeftModel on a separate copy of the base (the base itself for slot 0)."""
    plain, _ = load_base(base)
    return lambda slot: plain if slot == BASE_SLOT else PeftModel.from_pretrained(plain, str(folders / f"u{slot - 1}"))
