"""Ways of personalizing one task, side by side, on the same users and split.

For now: the base model alone, one global adapter fitted on every user's
training data pooled, and one adapter per user, loaded from the store as
serving would (the caller fits them first: the demo through the Ray job).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.evaluation.evaluate import evaluate_adapters, evaluate_users
from peftu.evaluation.metrics import macro_average
from peftu.fitting.reference import fit_global
from peftu.model.base import base_fingerprint, load_base
from peftu.store import AdapterStore


@dataclass
class MethodScores:
    name: str
    scores: dict[str, dict[str, float]]
    """Macro averages: `{"all": {metric: value, "n": users}, "few": ..., ...}`."""


@dataclass
class Comparison:
    spec: TaskSpec
    users: int
    methods: list[MethodScores]

    def value(self, method: str, bucket: str = "all") -> float:
        return next(m for m in self.methods if m.name == method).scores[bucket][self.spec.metric]


def global_hparams(hp: LoraHParams) -> LoraHParams:
    """The global adapter sees every user's data: one epoch of larger batches."""
    return hp.model_copy(update={"epochs": 1, "batch_size": 32, "lr": hp.lr / 2})


def compare(spec: TaskSpec, users: list[UserRecord], base_path: str, store: AdapterStore,
            hp: LoraHParams, split: str = "test", log=print) -> Comparison:
    """Score every method on `split`; per-user adapters must already be in `store`."""
    base, tokenizer = load_base(base_path)
    base_fp = base_fingerprint(base_path)

    log(f"[{spec.name}] base model on {len(users)} users")
    methods = [MethodScores("base", macro_average(evaluate_users(base, tokenizer, spec, users, split), users))]

    log(f"[{spec.name}] fitting one global adapter on all users' training data")
    global_model = fit_global(base, tokenizer, spec, users, global_hparams(hp))
    methods.append(MethodScores("global adapter", macro_average(
        evaluate_users(global_model, tokenizer, spec, users, split), users)))
    base = global_model.unload()

    per_user, without = evaluate_adapters(base, tokenizer, spec, users, store, base_fp=base_fp, split=split)
    if without:
        log(f"[{spec.name}] {len(without)} users have no adapter and are answered by the base")
    methods.append(MethodScores("per-user adapters", macro_average(per_user, users)))
    return Comparison(spec=spec, users=len(users), methods=methods)


def render_table(results: list[Comparison]) -> Table:
    """One row per task and activity bucket, one column per method."""
    names = [m.name for m in results[0].methods]
    table = Table(title="per-user macro average on the test split")
    for col in ["task", "metric", "users", *names]:
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for res in results:
        for bucket in ["all", "few", "some", "many"]:
            if bucket not in res.methods[0].scores:
                continue
            n = res.methods[0].scores[bucket]["n"]
            label = res.spec.name if bucket == "all" else f"  {bucket} history"
            table.add_row(label, res.spec.metric, str(n),
                          *[f"{m.scores[bucket][res.spec.metric]:.3f}" for m in res.methods])
    return table
