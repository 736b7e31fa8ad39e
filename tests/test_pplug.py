"""PPlug: the offline encoder, the plug, its fit (locally and on Ray Train), its store records, serving.

Kept lean: four generated users cut to a few examples each, one Ray session
for the Ray Train fit and the Serve app.
"""

from __future__ import annotations

import dataclasses

import pytest
import requests
import torch

from peftu.config import PPlugConfig, PPlugJobConfig
from peftu.data.synthetic import generate
from peftu.pplug.encoder import HistoryEncoder, cached_embeddings, user_embeddings
from peftu.pplug.model import PersonaPlug, fit_epochs, load_plug, plug_files
from peftu.pplug.train import embed_users, fit_plug, mean_loss, plug_data_fingerprint, run_pplug_job
from peftu.store import AdapterStore
from peftu.store.kinds import EMBEDDINGS, PLUG

TASK = "synth-cls"
CFG = PPlugConfig(projector_hidden=64, batch_size=8, lr=1e-2, epochs=2, min_steps=12)
STEPS = 12
"""4 users x 8 training rows = 4 steps an epoch: 2 epochs are too few for min_steps, 3 are taken."""


@pytest.fixture(scope="module")
def encoder() -> HistoryEncoder:
    return HistoryEncoder()


@pytest.fixture(scope="module")
def users():
    """Four users of synth-cls with eight training examples (their history) and four test examples."""
    spec, users, _ = generate(TASK, 4, seed=5)
    cut = [dataclasses.replace(u, train=u.train[:8], history=u.history[:8], test=u.test[:4]) for u in users]
    return spec, cut


def test_encoder_loads_offline_and_similar_sentences_are_closer(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vectors = encoder.encode(["the cat sits on the mat", "a cat is lying on a rug", "stock prices fell sharply today"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[1, 0] > sims[1, 2] + 0.2
    assert len(encoder.fingerprint) == 64


def test_attention_follows_the_input(encoder):
    torch.manual_seed(0)
    plug = PersonaPlug(CFG, encoder.dim, 32)
    history = encoder.encode(["my cat loves the sofa", "the market and the bank raised taxes",
                              "the striker scored a goal"]).unsqueeze(0).expand(2, -1, -1)
    queries = encoder.encode(["a kitten sleeping on a couch", "inflation and wages in the economy"])
    mask = torch.ones(2, 3, dtype=torch.bool)
    weights = plug.attention(queries, history, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert weights[0].argmax() == 0 and weights[1].argmax() == 1
    soft = plug(queries, history, mask)
    assert soft.shape == (2, 2, 32)
    assert torch.equal(soft[0, 0], soft[1, 0]) and not torch.allclose(soft[0, 1], soft[1, 1])
    masked = plug.attention(queries, history, torch.tensor([[True, False, True]] * 2))
    assert (masked[:, 1] == 0).all()


def test_embeddings_are_cached_and_a_changed_history_embeds_again(encoder, users, s3_server, s3_store_uri):
    store = AdapterStore.open(s3_store_uri, endpoint_url=s3_server)
    user = users[1][0]
    first, cached = user_embeddings(store, encoder, TASK, user)
    assert not cached and first.ids == [h.id for h in user.history] and first.vectors.shape == (8, 384)
    again, cached = user_embeddings(store, encoder, TASK, user)
    assert cached and torch.equal(again.vectors, first.vectors)
    changed = dataclasses.replace(user, history=[dataclasses.replace(user.history[0], output="dislike"
                                                 if user.history[0].output != "dislike" else "like"),
                                                 *user.history[1:6]])
    fresh, cached = user_embeddings(store, encoder, TASK, changed)
    assert not cached and fresh.vectors.shape == (6, 384)
    assert not torch.allclose(fresh.vectors[0], first.vectors[0]) and torch.allclose(fresh.vectors[1], first.vectors[1])
    served = cached_embeddings(store, encoder.fingerprint, TASK, user.user_id)
    assert torch.equal(served.vectors, fresh.vectors)
    assert cached_embeddings(store, encoder.fingerprint, TASK, "nobody") is None


def test_fit_trains_only_the_plug_lowers_the_loss_and_reloads_identically(tiny_base, encoder, users, tmp_path):
    from peftu.model.base import base_fingerprint, load_base

    spec, members = users
    base, tokenizer = load_base(tiny_base)
    store = AdapterStore.open(str(tmp_path / "store"))
    histories = embed_users(store, encoder, TASK, members)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(CFG.seed)
    untrained = PersonaPlug(CFG, encoder.dim, base.config.hidden_size)
    loss_before = mean_loss(base, untrained, tokenizer, encoder, spec, members, histories, CFG)

    plug, losses = fit_plug(base, tokenizer, encoder, spec, members, histories, CFG)
    assert len(losses) == STEPS and fit_epochs(CFG, 32) == 3 and fit_epochs(CFG, 32, world=2) == 6
    assert fit_epochs(CFG.model_copy(update={"min_steps": 0}), 32) == CFG.epochs
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())
    assert all(not torch.equal(p, q) for p, q in zip(plug.parameters(), untrained.parameters()))
    loss_after = mean_loss(base, plug, tokenizer, encoder, spec, members, histories, CFG)
    assert loss_after < loss_before - 0.01, (loss_before, loss_after)

    base_fp = base_fingerprint(tiny_base)
    store.publish_artifact(PLUG.of(TASK), plug_files(plug), base_fingerprint=base_fp,
                           encoder_fingerprint=encoder.fingerprint, data_fingerprint="d", hparams=CFG.model_dump())
    reloaded, _ = load_plug(store, TASK, base_fp=base_fp, encoder_fp=encoder.fingerprint)
    query, vectors = encoder.encode(["a post about the band"]), histories[members[0].user_id].vectors[None]
    mask = torch.ones(vectors.shape[:2], dtype=torch.bool)
    assert torch.equal(reloaded(query, vectors, mask), plug(query, vectors, mask))
    from peftu.errors import ForeignAdapterError
    with pytest.raises(ForeignAdapterError):
        load_plug(store, TASK, base_fp=base_fp, encoder_fp="another-encoder")


# --- Ray Train and Ray Serve -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(local_ray, tiny_base, users, tmp_path_factory):
    """(store uri, job) after a Ray Train fit of the plug on all four users."""
    spec, members = users
    uri = str(tmp_path_factory.mktemp("pplug-store"))
    job = PPlugJobConfig(store=uri, base=tiny_base, plug=CFG, workers=1)
    manifest, reused = run_pplug_job(job, spec, members)
    assert not reused
    return uri, job, manifest


def test_ray_train_fit_publishes_the_plug_and_a_rerun_reuses_it(fitted, users, encoder):
    uri, job, manifest = fitted
    spec, members = users
    store = AdapterStore.open(uri)
    assert manifest.metrics["steps"] == STEPS and manifest.metrics["epochs"] == 3 and manifest.extra["users"] == 4
    assert manifest.encoder_fingerprint == encoder.fingerprint
    assert set(store.artifact_owners(EMBEDDINGS, TASK)) == {u.user_id for u in members}
    again, reused = run_pplug_job(job, spec, members)
    assert reused and again.version == manifest.version
    fewer = [dataclasses.replace(members[0], train=members[0].train[:7]), *members[1:]]
    edited = [dataclasses.replace(members[0], history=members[0].history[:7]), *members[1:]]
    prints = {plug_data_fingerprint(spec, m, encoder.fingerprint) for m in (members, fewer, edited)}
    assert manifest.data_fingerprint in prints and len(prints) == 3  # other data: no reuse


def test_served_user_with_history_but_no_adapter_gets_pplug(fitted, users, tiny_base):
    from ray import serve

    from peftu.bench.fake_adapters import publish_random_adapters
    from peftu.serving.local import free_port
    from peftu.serving.server import PeftuServer

    uri, _, _ = fitted
    _, members = users
    store = AdapterStore.open(uri)
    with_adapter, plug_won = members[0].user_id, members[3].user_id
    versions = publish_random_adapters(store, TASK, [with_adapter, plug_won], tiny_base, std=0.2, seed=1)
    # The selection chose PPlug over plug_won's own adapter: the base answers them with the plug.
    from peftu.model.base import base_fingerprint
    from peftu.store.kinds import SELECTION

    store.put_record(SELECTION.of(TASK), {"task": TASK, "users_base": base_fingerprint(tiny_base),
                                          "users": {plug_won: {"method": "pplug"}}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        config = {"base": tiny_base, "store": uri, "task": TASK, "pplug": True, "user_tokens": False}
        serve.run(PeftuServer.bind(config), name="peftu", route_prefix="/")
        url = f"http://127.0.0.1:{port}"

        def score(model: str) -> requests.Response:
            r = requests.post(f"{url}/v1/score", json={"model": model, "input": "my uncle laughed at the band"},
                              timeout=60)
            assert r.status_code == 200, r.text
            return r

        def complete(model: str) -> requests.Response:
            r = requests.post(f"{url}/v1/completions", timeout=60, json={
                "model": model, "prompt": "Post: the chef and the oven\nReaction:", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            return r

        base = score("tiny-test")
        plugged = score(f"tiny-test:{members[1].user_id}")
        assert base.headers["x-peftu-adapter"] == "none" and plugged.headers["x-peftu-adapter"] == "pplug"
        assert plugged.json()["scores"] != base.json()["scores"]
        nobody = score("tiny-test:nobody")
        assert nobody.headers["x-peftu-adapter"] == "none" and nobody.json()["scores"] == base.json()["scores"]
        adapted = score(f"tiny-test:{with_adapter}")
        assert adapted.headers["x-peftu-adapter"] == versions[with_adapter]
        chosen = score(f"tiny-test:{plug_won}")
        assert (chosen.headers["x-peftu-adapter"], chosen.headers["x-peftu-method"]) == ("pplug", "pplug")
        assert complete(f"tiny-test:{plug_won}").headers["x-peftu-adapter"] == "pplug"
        generated = complete(f"tiny-test:{members[2].user_id}")
        assert generated.headers["x-peftu-adapter"] == "pplug"
        assert complete("tiny-test:nobody").headers["x-peftu-adapter"] == "none"
    finally:
        serve.shutdown()
