"""The serving app on a local Ray, queried over HTTP on 127.0.0.1; adapters on moto's S3.

One app for the whole module (a replica loads the base once): user tokens on,
an admin key, a short version TTL and room for only four adapters, so
eviction, new versions and deletion all show within a few requests.
"""

from __future__ import annotations

import json
import math
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import requests

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.serving.auth import make_token
from peftu.store import AdapterStore
from tests.faults import FAKE_AWS, fake_aws_env, free_port, metric, wait_for

TASK = "synth-cls"
SECRET, ADMIN = "test-token-secret-of-at-least-32-bytes", "test-admin-key"
PROMPT = "Review: the lamp was great. Sentiment:"
USERS = [f"u{i}" for i in range(8)]


@pytest.fixture(scope="module")
def served(local_ray, tiny_base, s3_server, tmp_path_factory):
    """(base url, store, versions, tiny_base) of a running app; Serve stops at the end."""
    from ray import serve

    from peftu.serving.server import PeftuServer

    with fake_aws_env():
        bucket = f"peftu-serve-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/store"
        store = AdapterStore.open(uri, endpoint_url=s3_server)
        versions = publish_random_adapters(store, TASK, USERS, tiny_base, std=0.2, seed=1)
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = {"base": tiny_base, "store": uri, "endpoint_url": s3_server, "task": TASK,
                      "max_adapters": 4, "version_ttl_s": 1.0, "user_tokens": True, "max_prompt_tokens": 64,
                      "max_tokens_limit": 32, "batch_wait_ms": 20}
            env = {**FAKE_AWS, "PEFTU_TOKEN_SECRET": SECRET, "PEFTU_ADMIN_KEY": ADMIN}
            app = PeftuServer.options(ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}})
            serve.run(app.bind(config), name="peftu", route_prefix="/")
            yield f"http://127.0.0.1:{port}", store, versions, tiny_base
        finally:
            serve.shutdown()


def _auth(user: str | None) -> dict:
    return {"Authorization": f"Bearer {make_token(SECRET, user, 'tiny-test')}"} if user else {}


def complete(url: str, user: str | None, prompt: str = PROMPT, **options) -> requests.Response:
    body = {"model": f"tiny-test:{user}" if user else "tiny-test", "prompt": prompt, "max_tokens": 8,
            "temperature": 0, **options}
    return requests.post(f"{url}/v1/completions", json=body, headers=_auth(user), timeout=60)


def text(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# --- answers -----------------------------------------------------------------------------


def test_each_user_gets_their_own_adapter_and_the_header_says_which(served):
    url, _, versions, _ = served
    base = complete(url, None)
    assert base.headers["x-peftu-adapter"] == "none"
    answers = {}
    for user in USERS[:3]:
        r = complete(url, user)
        assert r.headers["x-peftu-adapter"] == versions[user]
        answers[user] = text(r)
    assert len(set(answers.values()) | {text(base)}) >= 3
    nobody = complete(url, "nobody-here")
    assert nobody.headers["x-peftu-adapter"] == "none" and text(nobody) == text(base)
    header = requests.post(f"{url}/v1/completions", headers={**_auth(USERS[1]),
                           "serve_multiplexed_model_id": f"tiny-test:{USERS[1]}"},
                           json={"model": "tiny-test", "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                           timeout=60)
    assert text(header) == answers[USERS[1]] and header.headers["x-peftu-adapter"] == versions[USERS[1]]


def test_concurrent_users_share_batches_and_get_what_they_get_alone(served):
    url, *_ = served
    users = [None, *USERS[:3]]
    alone = {u: text(complete(url, u)) for u in users}
    batches_before = metric(url, "peftu_batch_users_count")
    users_before = metric(url, "peftu_batch_users_sum")
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda u: (u, text(complete(url, u))), users * 3))
    assert all(answer == alone[u] for u, answer in got)
    batches = metric(url, "peftu_batch_users_count") - batches_before
    assert metric(url, "peftu_batch_users_sum") - users_before > batches  # some batch mixed users


def test_stop_and_max_tokens(served):
    url, *_ = served
    r = complete(url, USERS[0], max_tokens=3)
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 3
    full = text(complete(url, USERS[0], max_tokens=12))
    stop = full[len(full) // 2:][:2]
    cut = complete(url, USERS[0], max_tokens=12, stop=[stop]).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"


def _events(response: requests.Response) -> list:
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streaming_sends_the_same_text_as_one_answer(served):
    url, _, versions, _ = served
    whole = text(complete(url, USERS[2], max_tokens=10))
    r = requests.post(f"{url}/v1/completions", headers=_auth(USERS[2]), stream=True, timeout=60,
                      json={"model": f"tiny-test:{USERS[2]}", "prompt": PROMPT, "max_tokens": 10,
                            "temperature": 0, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-peftu-adapter"] == versions[USERS[2]]
    events = _events(r)
    assert "".join(e["choices"][0]["text"] for e in events) == whole
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completions_and_chat_streaming(served):
    url, *_ = served
    body = {"model": f"tiny-test:{USERS[0]}", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8, "temperature": 0}
    r = requests.post(f"{url}/v1/chat/completions", json=body, headers=_auth(USERS[0]), timeout=60)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == text(complete(url, USERS[0]))
    streamed = requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True},
                             headers=_auth(USERS[0]), stream=True, timeout=60)
    events = _events(streamed)
    assert events[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]


def test_score_ranks_the_task_labels_per_user(served):
    url, *_ = served

    def score(user, **extra):
        r = requests.post(f"{url}/v1/score", headers=_auth(user), timeout=60,
                          json={"model": f"tiny-test:{user}" if user else "tiny-test", "input": "the lamp was great",
                                **extra})
        assert r.status_code == 200, r.text
        return r.json()

    base, own = score(None), score(USERS[0])
    assert [s["label"] for s in base["scores"]] == ["like", "dislike", "neutral"]
    assert base["label"] == max(base["scores"], key=lambda s: s["logprob"])["label"]
    assert [s["logprob"] for s in base["scores"]] != [s["logprob"] for s in own["scores"]]
    assert [s["label"] for s in score(None, labels=["yes", "no"])["scores"]] == ["yes", "no"]


def test_models_healthz_and_metrics(served):
    url, *_ = served
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-test"]
    mine = requests.get(f"{url}/v1/models", headers=_auth("u3"), timeout=10).json()
    assert [m["id"] for m in mine["data"]] == ["tiny-test", "tiny-test:u3"]
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["task"] == TASK
    complete(url, USERS[0])
    for name in ("peftu_requests_total", "peftu_request_latency_seconds_count", "peftu_tokens_total",
                 "peftu_adapter_hits_total", "peftu_adapter_loads_total", "peftu_adapter_load_seconds_count"):
        assert metric(url, name) > 0, name


# --- the cache, versions, deletion ------------------------------------------------------------


def _admin(method: str, url: str, path: str, key: str | None = ADMIN) -> requests.Response:
    return requests.request(method, f"{url}/admin{path}", headers={"x-api-key": key} if key else {}, timeout=30)


def test_the_cache_holds_at_most_four_adapters_and_evicts_the_oldest(served):
    url, *_ = served
    evictions = metric(url, "peftu_adapter_evictions_total")
    for user in USERS[:6]:
        text(complete(url, user))
    resident = _admin("GET", url, "/adapters").json()["users"]
    assert resident == USERS[2:6]
    assert metric(url, "peftu_adapter_evictions_total") > evictions
    again = complete(url, USERS[0])
    assert again.headers["x-peftu-cache"] == "load"


def test_a_new_version_is_picked_up_and_invalidate_is_immediate(served):
    url, store, versions, base = served
    user = USERS[6]
    first = complete(url, user)
    assert first.headers["x-peftu-adapter"] == versions[user]
    new = publish_random_adapters(store, TASK, [user], base, std=0.2, seed=99)[user]
    wait_for(lambda: complete(url, user).headers["x-peftu-adapter"] == new, "the new version")
    assert text(complete(url, user)) != text(first)
    newer = publish_random_adapters(store, TASK, [user], base, std=0.2, seed=100)[user]
    assert _admin("POST", url, f"/users/{user}/invalidate").json()["user"] == user
    assert complete(url, user).headers["x-peftu-adapter"] == newer


def test_deleting_a_user_removes_the_adapter_and_evicts_it(served):
    url, store, *_ = served
    user = USERS[7]
    assert complete(url, user).headers["x-peftu-adapter"] != "none"
    assert user in _admin("GET", url, "/adapters").json()["users"]
    r = _admin("DELETE", url, f"/users/{user}")
    assert r.status_code == 200 and r.json()["deleted_versions"] == 1
    assert user not in _admin("GET", url, "/adapters").json()["users"]
    assert complete(url, user).headers["x-peftu-adapter"] == "none"
    assert not store.has_adapter(TASK, user)
    assert _admin("DELETE", url, f"/users/{user}").status_code == 404


def test_admin_needs_the_key(served):
    url, *_ = served
    assert _admin("GET", url, "/adapters", key=None).status_code == 401
    assert _admin("GET", url, "/adapters", key="wrong").status_code == 401
    assert _admin("POST", url, "/users/..%2F/invalidate").status_code in (400, 404)


# --- broken adapters and bad requests ------------------------------------------------------------


def test_corrupt_or_foreign_adapters_are_never_used(served):
    """A corrupt only version: the base answers. A foreign version over a good one: the good one answers."""
    url, store, _, base = served
    publish_random_adapters(store, TASK, ["tampered", "foreign"], base, seed=5)
    names = store.manifest(TASK, "tampered").files
    version = store.latest_version(TASK, "tampered")
    store.backend.put(f"adapters/{TASK}/tampered/versions/{version}/adapter_model.safetensors", b"not weights")
    manifest = store.manifest(TASK, "foreign")
    folder = f"adapters/{TASK}/foreign/versions/{manifest.version}"
    files = {name: store.backend.get(f"{folder}/{name}") for name in names}
    store.publish(TASK, "foreign", files, base_fingerprint="0" * 64, data_fingerprint="x", hparams={})
    errors = metric(url, "peftu_adapter_errors_total")
    plain = text(complete(url, None))
    tampered = complete(url, "tampered")
    assert tampered.headers["x-peftu-adapter"] == "none" and text(tampered) == plain
    foreign = complete(url, "foreign")
    assert foreign.headers["x-peftu-adapter"] == manifest.version
    assert foreign.headers["x-peftu-fallback"] == "newer-version-unusable"
    assert metric(url, "peftu_adapter_errors_total") - errors == 2
    assert 'reason="corrupt"' in requests.get(f"{url}/metrics", timeout=10).text
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"


def test_user_tokens_are_required_and_bound_to_their_user(served):
    url, *_ = served
    body = {"model": f"tiny-test:{USERS[0]}", "prompt": PROMPT, "max_tokens": 2}
    post = lambda headers: requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)  # noqa: E731
    assert post({}).status_code == 401
    assert post({"Authorization": "Bearer peftu1.dTA.AAAA"}).status_code == 401
    expired = make_token(SECRET, USERS[0], "tiny-test", now=0)
    refused = post({"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
    assert expired.split(".")[2] not in refused.text
    other_model = post({"Authorization": f"Bearer {make_token(SECRET, USERS[0], 'another-model')}"})
    assert other_model.status_code == 401 and "aud must be 'tiny-test'" in other_model.json()["error"]["message"]
    wrong = post(_auth(USERS[1]))
    assert wrong.status_code == 403 and USERS[0] in wrong.json()["error"]["message"]
    assert post(_auth(USERS[0])).status_code == 200


@pytest.mark.parametrize("body, status, names", [
    ('{"model": "tiny-test", "prompt": "x"', 400, "not valid JSON"),
    ('{"model": "tiny-test", "prompt": "x", "temprature": 0}', 400, "temprature"),
    ('{"model": "tiny-test", "prompt": "x", "max_tokens": 33}', 400, "max_tokens"),
    ('{"model": "tiny-test", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "tiny-test", "prompt": "' + "word " * 200 + '"}', 400, "prompt has"),
    ('{"model": "tiny-test:../etc", "prompt": "x"}', 400, "path separator"),
    ('{"model": "tiny-test: spaced", "prompt": "x"}', 400, "whitespace"),
    ('{"model": "gpt-4", "prompt": "x"}', 404, "gpt-4"),
    ('{"prompt": "x"}', 400, "model"),
    ('[1, 2]', 400, "body"),
    ('{"model": "tiny-test", "prompt": "x", "seed": 123456789012345678901234567890}', 400, "seed"),
    ('{"model": "tiny-test", "prompt": "x", "stop": ["", "x"]}', 400, "stop"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(served, body, status, names):
    url, *_ = served
    r = requests.post(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert names in r.json()["error"]["message"]


# --- each user answered by their selected method ----------------------------------------------------


def test_each_user_is_answered_by_the_method_their_selection_record_names(served):
    """A `base` winner gets the base (their adapter unused), an `adapter+prior` winner their adapter with
    their prior added on /v1/score, a `majority` winner their usual label; the headers say which."""
    from peftu.model.base import base_fingerprint
    from peftu.store.kinds import SELECTION

    url, store, _, base = served
    users = ["sel-base", "sel-prior", "sel-usual"]
    versions = publish_random_adapters(store, TASK, users, base, std=0.2, seed=7)

    def score(user, **extra) -> requests.Response:
        r = requests.post(f"{url}/v1/score", headers=_auth(user), timeout=60,
                          json={"model": f"tiny-test:{user}" if user else "tiny-test", "input": "the lamp was great",
                                **extra})
        assert r.status_code == 200, r.text
        return r

    before = {u: score(u) for u in users}  # no record: each user's adapter, as without selection
    assert {r.headers["x-peftu-method"] for r in before.values()} == {"adapter"}
    assert "x-peftu-selected" not in before["sel-prior"].headers
    raw = {s["label"]: s["logprob"] for s in before["sel-prior"].json()["scores"]}
    worst = min(raw, key=raw.get)  # a prior strong enough to turn the adapter's answer to its least likely label
    prior = {lab: math.log(0.98 if lab == worst else 0.01) for lab in raw}
    store.put_record(SELECTION.of(TASK), {"task": TASK, "users_base": base_fingerprint(base), "users": {
        "sel-base": {"method": "base", "val": {"base": 1.0}},
        "sel-prior": {"method": "adapter+prior", "val": {"adapter+prior": 1.0}, "prior_weight": 8.0,
                      "log_prior": prior},
        "sel-usual": {"method": "majority", "val": {"majority": 1.0}, "answer": "neutral", "log_prior": prior}}})
    assert _admin("POST", url, "/users/sel-base/invalidate").status_code == 200  # every replica reads it again

    plain = score(None).json()["scores"]
    by_base = score("sel-base")
    assert by_base.headers["x-peftu-method"] == "base" and by_base.headers["x-peftu-adapter"] == "none"
    assert by_base.json()["scores"] == plain
    generated = complete(url, "sel-base")
    assert generated.headers["x-peftu-method"] == "base" and text(generated) == text(complete(url, None))

    calibrated = score("sel-prior")
    assert calibrated.headers["x-peftu-method"] == "adapter+prior"
    assert calibrated.headers["x-peftu-adapter"] == versions["sel-prior"]
    entries = calibrated.json()["scores"]
    assert {e["label"]: e["logprob"] for e in entries} == pytest.approx(raw, abs=1e-4)
    assert [e["score"] for e in entries] == pytest.approx([e["logprob"] + 8.0 * prior[e["label"]] for e in entries])
    assert calibrated.json()["label"] == worst != max(raw, key=raw.get)
    other_labels = score("sel-prior", labels=["yes", "no"])
    assert (other_labels.headers["x-peftu-method"], other_labels.headers["x-peftu-selected"]) == \
        ("adapter", "adapter+prior")

    usual = score("sel-usual")
    assert usual.headers["x-peftu-method"] == "majority" and usual.json()["label"] == "neutral"
    assert {e["label"]: e["logprob"] for e in usual.json()["scores"]} == pytest.approx(prior)
    written = complete(url, "sel-usual")  # a generation has no usual label: the adapter writes it
    assert (written.headers["x-peftu-method"], written.headers["x-peftu-selected"]) == ("adapter", "majority")
    assert written.headers["x-peftu-adapter"] == versions["sel-usual"]


def test_a_profile_or_retrieval_winner_is_scored_with_it_in_front_as_the_fit_scored_them(served):
    """/v1/score for a `profile+adapter` winner puts the record's profile before the prompt, for a
    `retrieval+adapter` winner their nearest labelled texts (from the index the fit published): the
    same label scores as the fit's candidate (`own_adapter` with those contexts) gave; a generation is
    the adapter's alone."""
    from peftu.data.schema import Example, HistoryItem, UserRecord
    from peftu.data.synthetic import TASKS
    from peftu.fitting.selection import last_index, own_adapter, profiles, retrievals
    from peftu.model.base import base_fingerprint, load_base
    from peftu.pplug.encoder import HistoryEncoder
    from peftu.store.kinds import SELECTION

    url, store, _, base = served
    said, spec, encoder = "the lamp was great", TASKS[TASK], HistoryEncoder()
    model, tokenizer = load_base(base)
    # short texts: the served prompt (max_prompt_tokens 64) is not cut, as the fit's is not
    history = [HistoryItem("h0", "the lamp", "dislike"), HistoryItem("h1", "a chair", "like")]
    for method, contexts in (("profile+adapter", profiles(spec)),
                             ("retrieval+adapter", retrievals(spec, last_index(store, TASK, lambda: encoder),
                                                              lambda: encoder))):
        user = f"sel-{method[:4]}"
        versions = publish_random_adapters(store, TASK, [user], base, std=0.2, seed=8)
        asked = UserRecord(user, history, val=[Example(id="q", input=said, output=spec.labels[0])])
        own = own_adapter(spec, model, tokenizer, store, TASK, base_fingerprint(base), contexts=contexts)
        (want,), _ = own(asked)  # (retrieval: publishes the user's index, as the fit does)
        entry = {"profile": contexts(asked, [said], False)[0]} if method.startswith("profile+") else {}
        store.put_record(SELECTION.of(TASK), {"task": TASK, "users_base": base_fingerprint(base), "users": {
            user: {"method": method, "val": {method: 1.0}} | entry}})
        assert _admin("POST", url, f"/users/{user}/invalidate").status_code == 200

        r = requests.post(f"{url}/v1/score", headers=_auth(user), timeout=60,
                          json={"model": f"tiny-test:{user}", "input": said})
        assert r.status_code == 200, r.text
        assert r.headers["x-peftu-method"] == method and "x-peftu-selected" not in r.headers
        assert r.headers["x-peftu-adapter"] == versions[user]
        assert [e["logprob"] for e in r.json()["scores"]] == pytest.approx(want, abs=1e-4)
        (plain,), _ = own_adapter(spec, model, tokenizer, store, TASK, base_fingerprint(base))(asked)
        assert want != pytest.approx(plain, abs=1e-3)  # what was in front moved the scores
        written = complete(url, user)
        assert (written.headers["x-peftu-method"], written.headers["x-peftu-selected"]) == ("adapter", method)


def test_a_neighbors_winner_is_scored_by_their_nearest_labelled_texts_and_deleted_with_them(served):
    """The fit's index (real encoder) answers /v1/score for a `neighbors` winner; a generation is the
    adapter's; deleting the user removes the index too."""
    from peftu.data.schema import HistoryItem, UserRecord
    from peftu.model.base import base_fingerprint
    from peftu.neighbors.index import user_index
    from peftu.pplug.encoder import HistoryEncoder
    from peftu.store.kinds import NEIGHBORS, SELECTION

    url, store, _, base = served
    user = "sel-near"
    versions = publish_random_adapters(store, TASK, [user], base, std=0.2, seed=8)
    history = [HistoryItem("h0", "the desk lamp was great and very bright", "dislike"),
               HistoryItem("h1", "the chair broke after a single day", "like"),
               HistoryItem("h2", "rude staff and a long wait at the shop", "like")]
    user_index(store, HistoryEncoder(), TASK, UserRecord(user, history))
    store.put_record(SELECTION.of(TASK), {"task": TASK, "users_base": base_fingerprint(base), "users": {
        user: {"method": "neighbors", "val": {"neighbors": 1.0}}}})
    assert _admin("POST", url, f"/users/{user}/invalidate").status_code == 200

    r = requests.post(f"{url}/v1/score", headers=_auth(user), timeout=60,
                      json={"model": f"tiny-test:{user}", "input": "the lamp was great"})
    assert r.status_code == 200, r.text
    assert r.headers["x-peftu-method"] == "neighbors" and r.json()["label"] == "dislike"  # the lamp's label
    shares = {e["label"]: math.exp(e["logprob"]) for e in r.json()["scores"]}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["dislike"] > 0.5 and shares["neutral"] < 0.02
    written = complete(url, user)
    assert (written.headers["x-peftu-method"], written.headers["x-peftu-selected"]) == ("adapter", "neighbors")
    assert written.headers["x-peftu-adapter"] == versions[user]

    assert _admin("DELETE", url, f"/users/{user}").status_code == 200
    assert store.latest_artifact(NEIGHBORS.of(TASK, user)) is None
    # their entry went from the selection record, with every older version that named them
    assert len(store.artifact_versions(SELECTION.of(TASK))) == 1 and user not in store.get_record(
        SELECTION.of(TASK))["users"]
    after = requests.post(f"{url}/v1/score", headers=_auth(user), timeout=60,
                          json={"model": f"tiny-test:{user}", "input": "the lamp was great"})
    assert after.headers["x-peftu-method"] == "base" and "x-peftu-selected" not in after.headers
