"""Loading a base causal LM and fingerprinting it: all a reader of a base needs (no training)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftu.paths import peftu_home

BUILD_INFO = "peftu_base.json"


def default_base_dir() -> Path:
    """Where `peftu base build` puts the tiny base unless told otherwise."""
    return peftu_home() / "base" / "tiny-llama"


def load_base(path_or_id: str | Path, dtype: torch.dtype = torch.float32):
    """Load a base causal LM and its tokenizer (any `from_pretrained` id or path)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=dtype)
    model.eval()
    return model, tokenizer


def base_fingerprint(path_or_id: str | Path) -> str:
    """A stable id of the base's weights, config and tokenizer.

    Adapters record it; the store refuses to load an adapter onto another base.
    A local folder is hashed file by file; a hub id is its name and revision.
    """
    path = Path(path_or_id)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors") and f.name != BUILD_INFO:
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    else:
        from transformers import AutoConfig
        revision = getattr(AutoConfig.from_pretrained(str(path_or_id)), "_commit_hash", "")
        h.update(f"{path_or_id}@{revision}".encode())
    return h.hexdigest()
