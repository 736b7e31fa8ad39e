"""The tiny base: built for real, loaded only through from_pretrained, fingerprinted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from peftu.model.base import BUILD_INFO, base_fingerprint, load_base


def test_pretraining_lowers_validation_perplexity(tiny_base):
    info = json.loads((Path(tiny_base) / BUILD_INFO).read_text())
    assert info["ppl_after"] < info["ppl_before"] / 10
    assert info["parameters"] > 100_000


def test_base_loads_with_from_pretrained_and_encodes_any_text(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert isinstance(model, LlamaForCausalLM)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "Café déjà vu — 用户 #42 🙂"
    assert tok.decode(tok(text)["input_ids"]) == text
    _, tokenizer = load_base(tiny_base)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_fingerprint_is_stable_and_follows_the_weights(tiny_base, tmp_path):
    assert base_fingerprint(tiny_base) == base_fingerprint(tiny_base)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert base_fingerprint(copy) == base_fingerprint(tiny_base)
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert base_fingerprint(copy) != base_fingerprint(tiny_base)
