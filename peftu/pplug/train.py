"""Training the plug once on every training user, on Ray Train.

The base and the encoder stay frozen; only the plug's parameters get
gradients, from the loss on the answer tokens of every training example, its
user's history (minus the example itself) feeding the plug. Each Ray Train
worker takes its slice of every global batch, and `prepare_model` wraps the
plug in DDP when there are several workers, so their gradients are averaged.
Worker 0 publishes the fitted plug with the fingerprints of the base, the
encoder, the data and the config: a re-run with the same ones reuses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from peftu.config import PPlugConfig, PPlugJobConfig
from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.inference.soft import plugged_forward
from peftu.model.encode import encode, epoch_order
from peftu.pplug.encoder import HistoryEmbeddings, HistoryEncoder, item_text, user_embeddings
from peftu.pplug.model import PersonaPlug, answer_loss, fit_epochs, history_batch, plug_files
from peftu.store import AdapterStore, Manifest, fingerprint
from peftu.store.kinds import PLUG

log = logging.getLogger("peftu.pplug")

Row = tuple[str, Example]
"""A training example and its user's id."""


def step_rows(n: int, batch_size: int, seed: int, epochs: int, rank: int = 0, world: int = 1
              ) -> list[list[int]]:
    """This worker's rows of every step: global batches of `batch_size * world` in a seeded
    order, cut into one slice per worker. A worker whose slice of the last batch is empty
    takes the epoch's first rows, so every worker steps (DDP needs all of them) the same number of times."""
    steps = []
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch)
        for start in range(0, n, batch_size * world):
            mine = order[start + rank * batch_size: start + (rank + 1) * batch_size]
            steps.append(mine or order[:batch_size])
    return steps


def batch_loss(base, plug, tokenizer, encoder: HistoryEncoder, spec: TaskSpec, rows: list[Row],
               histories: dict[str, HistoryEmbeddings], cfg: PPlugConfig) -> torch.Tensor:
    """The answer-token loss of `rows` with their plug soft tokens in front."""
    device = base.device
    queries = encoder.encode([spec.render(e.input) for _, e in rows]).to(device)
    vectors, mask = history_batch([histories[uid] for uid, _ in rows], cfg.max_history, [e.id for _, e in rows])
    soft = plug(queries, vectors.to(device), mask.to(device))
    encoded = [encode(tokenizer, spec, e.input, e.output, cfg.max_len) for _, e in rows]
    return answer_loss(*plugged_forward(base, encoded, list(soft), tokenizer.pad_token_id))


def training_rows(users: list[UserRecord]) -> list[Row]:
    return [(u.user_id, e) for u in users for e in u.train]


def fit_plug(base, tokenizer, encoder: HistoryEncoder, spec: TaskSpec, users: list[UserRecord],
             histories: dict[str, HistoryEmbeddings], cfg: PPlugConfig, *, rank: int = 0, world: int = 1,
             wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> tuple[PersonaPlug, list[float]]:
    """A plug fitted on every training example of `users`; the loss of each step.

    `wrap` is where Ray Train's `prepare_model` puts the plug into DDP; every
    worker starts from the same seeded plug.
    """
    rows = training_rows(users)
    if not rows:
        raise ValueError(f"task {spec.name!r} has no training examples to fit a plug on")
    base.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    plug = PersonaPlug(cfg, encoder.dim, base.config.hidden_size).to(base.device)
    model = wrap(plug)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    losses = []
    model.train()
    for step in step_rows(len(rows), cfg.batch_size, cfg.seed, fit_epochs(cfg, len(rows), world), rank, world):
        loss = batch_loss(base, model, tokenizer, encoder, spec, [rows[i] for i in step], histories, cfg)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return plug.eval(), losses


@torch.no_grad()
def mean_loss(base, plug, tokenizer, encoder: HistoryEncoder, spec: TaskSpec, users: list[UserRecord],
              histories: dict[str, HistoryEmbeddings], cfg: PPlugConfig) -> float:
    """The plug's mean answer-token loss over every training example of `users` (batch-weighted)."""
    rows = training_rows(users)
    steps = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    total = sum(batch_loss(base, plug, tokenizer, encoder, spec, s, histories, cfg).item() * len(s) for s in steps)
    return total / len(rows)


def plug_data_fingerprint(spec: TaskSpec, users: list[UserRecord], encoder_fp: str) -> str:
    """What a plug learnt from: the prompt, every user's training examples and history, the encoder."""
    return fingerprint({"prompt": spec.prompt, "encoder": encoder_fp, "users": [
        [u.user_id, [[e.id, e.input, e.output] for e in u.train], [item_text(h) for h in u.history]]
        for u in users]})


def embed_users(store: AdapterStore, encoder: HistoryEncoder, task: str, users: list[UserRecord],
                rank: int = 0, world: int = 1) -> dict[str, HistoryEmbeddings]:
    """Every user's history embeddings; each worker embeds its share, then all read the store's cache."""
    for user in users[rank::world]:
        user_embeddings(store, encoder, task, user)
    if world > 1:
        torch.distributed.barrier()
    return {u.user_id: user_embeddings(store, encoder, task, u)[0] for u in users}


# --- the Ray Train job ------------------------------------------------------------------------


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: embed its share of histories, fit the plug, worker 0 publishes it."""
    import ray.train
    import ray.train.torch

    from peftu.model.base import base_fingerprint, load_base

    job, spec = PPlugJobConfig.model_validate(config["job"]), TaskSpec(**config["spec"])
    cfg = job.plug
    users = [UserRecord.from_row(row) for row in ray.train.get_dataset_shard("users").iter_rows()]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    store = AdapterStore.open(job.store, endpoint_url=job.endpoint_url)
    base, tokenizer = load_base(job.base)
    base.to(device)
    encoder = HistoryEncoder(job.encoder or None, device)
    histories = embed_users(store, encoder, spec.name, users, rank, world)
    started = time.monotonic()
    plug, losses = fit_plug(base, tokenizer, encoder, spec, users, histories, cfg, rank=rank, world=world,
                            wrap=ray.train.torch.prepare_model)
    epochs = fit_epochs(cfg, len(training_rows(users)), world)
    per_epoch = max(1, len(losses) // epochs)
    metrics = {"first_loss": losses[0], "final_epoch_loss": sum(losses[-per_epoch:]) / per_epoch,
               "steps": len(losses), "epochs": epochs, "seconds": time.monotonic() - started}
    if rank == 0:
        store.publish_artifact(PLUG.of(spec.name), plug_files(plug), base_fingerprint=base_fingerprint(job.base),
                               encoder_fingerprint=encoder.fingerprint, data_fingerprint=config["data_fingerprint"],
                               hparams=cfg.model_dump(), metrics=metrics,
                               extra={"users": len(users), "examples": len(training_rows(users)), "workers": world})
    ray.train.report(metrics)


def run_pplug_job(job: PPlugJobConfig, spec: TaskSpec, users: list[UserRecord]) -> tuple[Manifest, bool]:
    """The task's plug in the store: fitted on Ray Train unless a current one exists; and whether it was reused."""
    from peftu.fitting.job import start_run, users_trainer
    from peftu.model.base import base_fingerprint
    from peftu.pplug.encoder import default_encoder_path
    from peftu.store.current import is_current

    store = AdapterStore.open(job.store, endpoint_url=job.endpoint_url)
    data_fp = plug_data_fingerprint(spec, users, base_fingerprint(job.encoder or default_encoder_path()))
    ref = PLUG.of(spec.name)
    if is_current(store, ref, base_fp=base_fingerprint(job.base), data_fp=data_fp, hp=job.plug):
        log.info("the PPlug of %s is current, reusing it", spec.name)
        return store.artifact_manifest(ref), True
    loop_config = {"job": job.model_dump(), "spec": spec.model_dump(), "data_fingerprint": data_fp}
    trainer = users_trainer(_worker_loop, loop_config, [u.to_row() for u in users], run_id=start_run("pplug"),
                            workers=job.workers, use_gpu=job.use_gpu, cpus_per_worker=job.cpus_per_worker,
                            split=False)  # every worker needs every user's history
    log.info("fitting the PPlug of %s on %d users (%d examples), %d worker(s)", spec.name, len(users),
             len(training_rows(users)), job.workers)
    trainer.fit()
    return store.artifact_manifest(ref), False
