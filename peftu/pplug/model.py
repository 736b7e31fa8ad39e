"""PPlug (Persona-Plug, arXiv 2409.11901): one trained plug, no per-user weights.

Read top to bottom:

1. Every history item of a user is a frozen encoder vector `h_i` (`encoder.py`).
2. The current input is encoded too: the query `q`.
3. Input-aware attention: `w = softmax(t * <W q, h_i>)` over the user's items,
   so the items that resemble the input weigh most (W starts as the identity,
   `t` is a learnt sharpness).
4. A projector MLP maps each item to the LM's hidden size; the personal
   embedding is `P = sum_i w_i * proj(h_i)`.
5. The soft tokens `[I, P]` (`I`: a trained instruction embedding) go into
   the LM's `inputs_embeds`, between the prompt and the answer.

The paper puts the soft tokens in front of the input. The tiny base learnt in
pre-training, where documents follow each other after an EOS, to ignore what
comes before a prompt: random soft tokens in front changed its answer loss by
1e-4 (0.5347 to 0.5346 on synth-cls), so no gradient could reach the plug.
Right after the prompt, where the answer is predicted from, they are read.

Only the plug's parameters train, once, on all training users; the LM (with or
without a user's LoRA adapter) stays as it is. The plug is kept in the store
as an artifact of its own kind (`kinds.PLUG`, one per task: `plug.json` holds
this config and the sizes, `plug.safetensors` the weights), its manifest
naming the base and the history encoder it was fitted for.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from peftu.config import PPlugConfig
from peftu.model.encode import IGNORE
from peftu.pplug.encoder import HistoryEmbeddings, HistoryEncoder
from peftu.store import AdapterStore, Manifest
from peftu.store.kinds import PLUG

N_SOFT_TOKENS = 2
"""The instruction embedding and the personal embedding."""


def fit_epochs(cfg: PPlugConfig, rows: int, world: int = 1) -> int:
    """`cfg.epochs`, or more where that many would take fewer than `cfg.min_steps` steps."""
    per_epoch = math.ceil(rows / (cfg.batch_size * world))
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch)) if per_epoch else cfg.epochs


class PersonaPlug(nn.Module):
    """History embeddings and the input's embedding in, soft tokens for the LM out."""

    def __init__(self, cfg: PPlugConfig, enc_dim: int, lm_dim: int):
        super().__init__()
        self.cfg, self.enc_dim, self.lm_dim = cfg, enc_dim, lm_dim
        self.query = nn.Linear(enc_dim, enc_dim, bias=False)
        nn.init.eye_(self.query.weight)
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(10.0)))
        self.projector = nn.Sequential(nn.Linear(enc_dim, cfg.projector_hidden), nn.GELU(),
                                       nn.Linear(cfg.projector_hidden, lm_dim))
        self.instruction = nn.Parameter(torch.randn(lm_dim) * 0.02)

    def attention(self, query: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, N]` weights over each row's history items (rows with no items: all zero)."""
        scores = torch.einsum("be,bne->bn", self.query(query), history) * self.log_sharpness.exp()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)

    def forward(self, query: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, 2, lm_dim]`: the instruction and the personal embedding of each row."""
        weights = self.attention(query, history, mask)
        personal = torch.einsum("bn,bnd->bd", weights, self.projector(history))
        return torch.stack([self.instruction.expand_as(personal), personal], dim=1)


# --- feeding soft tokens to the LM ----------------------------------------------------------


def history_batch(histories: list[HistoryEmbeddings], max_history: int, leave_out: list[str | None] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' history vectors padded to one length, and the mask of real items.

    `leave_out[i]` drops that item id from row i: a training example never
    attends to itself in its user's history.
    """
    rows = []
    for i, h in enumerate(histories):
        skip = leave_out[i] if leave_out else None
        keep = [j for j, item in enumerate(h.ids) if item != skip][-max_history:]
        rows.append(h.vectors[keep])
    width = max(1, max(len(r) for r in rows))
    dim = histories[0].vectors.shape[-1]
    vectors, mask = torch.zeros(len(rows), width, dim), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        vectors[i, :len(r)], mask[i, :len(r)] = r, True
    return vectors, mask


@torch.no_grad()
def soft_tokens(plug: PersonaPlug, encoder: HistoryEncoder, queries: list[str], history: HistoryEmbeddings
                ) -> list[torch.Tensor]:
    """One user's soft tokens for each query text (the prompt the LM will read)."""
    device = next(plug.parameters()).device
    vectors, mask = history_batch([history] * len(queries), plug.cfg.max_history)
    return list(plug(encoder.encode(queries).to(device), vectors.to(device), mask.to(device)))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the answer tokens (labels not IGNORE)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


# --- the plug in the store -------------------------------------------------------------------


def plug_files(plug: PersonaPlug) -> dict[str, bytes]:
    """The plug as the files of its kind in the store."""
    meta = {"config": plug.cfg.model_dump(), "enc_dim": plug.enc_dim, "lm_dim": plug.lm_dim}
    state = {k: v.detach().cpu().contiguous() for k, v in plug.state_dict().items()}
    return {"plug.json": json.dumps(meta, indent=2).encode(), "plug.safetensors": save_safetensors(state)}


def load_plug(store: AdapterStore, task: str, *, base_fp: str, encoder_fp: str
              ) -> tuple[PersonaPlug, Manifest]:
    """The task's latest plug, checked: fitted on this base and for this encoder."""
    files, manifest = store.fetch_artifact_bytes(PLUG.of(task), expect_base=base_fp, expect_encoder=encoder_fp)
    meta = json.loads(files["plug.json"])
    plug = PersonaPlug(PPlugConfig(**meta["config"]), meta["enc_dim"], meta["lm_dim"])
    plug.load_state_dict(load_safetensors(files["plug.safetensors"]))
    return plug.eval(), manifest
