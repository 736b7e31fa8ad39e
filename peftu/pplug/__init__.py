"""PPlug (Persona-Plug): a frozen history encoder, a trained plug, soft tokens for a frozen LM.

`encoder` embeds history items (and caches them per user in the store),
`model` is the plug and how its soft tokens enter the LM, `train` fits it on
Ray Train, `evaluate` scores users with it (alone or with their adapters).
"""

from peftu.config import PPlugConfig, PPlugJobConfig
from peftu.pplug.encoder import HistoryEmbeddings, HistoryEncoder, cached_embeddings, user_embeddings
from peftu.pplug.model import PersonaPlug, load_plug
from peftu.pplug.train import fit_plug, run_pplug_job

__all__ = ["HistoryEmbeddings", "HistoryEncoder", "PPlugConfig", "PPlugJobConfig", "PersonaPlug",
           "cached_embeddings", "fit_plug", "load_plug", "run_pplug_job", "user_embeddings"]
