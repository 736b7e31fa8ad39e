"""Many users' adapters in a store, fast: random LoRA weights, published for real.

Benchmarks and tests need hundreds of users with distinct adapters; fitting
them would take hours on a CPU. Random A and B (B non-zero, so each adapter
changes the answers) are exported in the PEFT format by the bank and go through
the store's real publish path (manifest, sha256, base fingerprint, pointer).
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig

from peftu.bank import AdapterBank
from peftu.model.base import base_fingerprint, load_base
from peftu.store import AdapterStore
from peftu.store.current import folder_files


def publish_random_adapters(store: AdapterStore, task: str, users: list[str], base: str, *, r: int = 8,
                            alpha: float = 16.0, target_modules: list[str] | None = None, std: float = 0.05,
                            seed: int = 0, progress: bool = False) -> dict[str, str]:
    """Publish one random adapter per user; returns each user's version."""
    from tqdm import tqdm

    model, _ = load_base(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or ["q_proj", "v_proj"])
    bank = AdapterBank(model, 1, config)
    fp = base_fingerprint(base)
    gen = torch.Generator().manual_seed(seed)
    versions = {}
    with tempfile.TemporaryDirectory() as folder:
        for user in tqdm(users, desc="publishing adapters", unit="user", disable=not progress):
            with torch.no_grad():
                for p in bank.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            bank.export_slot(0, folder)
            manifest = store.publish(task, user, folder_files(folder), base_fingerprint=fp,
                                     data_fingerprint="random", hparams={"r": r, "alpha": alpha, "random": True})
            versions[user] = manifest.version
    bank.remove()
    return versions
