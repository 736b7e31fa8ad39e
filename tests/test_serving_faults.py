"""The serving app under faults and hostile input, over HTTP on 127.0.0.1.

One app for the module, on its own moto S3 server that the tests stop and start
again (an S3 outage), with room for only eight adapters (eviction under load).
The replica is killed last: the module's other tests need it alive.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.model.base import base_fingerprint
from peftu.store import AdapterStore
from tests.faults import (
    S3Endpoint,
    assert_bank_bounds,
    fake_aws_env,
    kill_one,
    metric,
    processes_titled,
    raw_post,
    soak,
    wait_for,
)

TASK = "synth-cls"
PROMPT = "Review: the lamp was great. Sentiment:"
USERS = [f"u{i:03d}" for i in range(50)]
MAX_ADAPTERS = 8
REPLICA = "ServeReplica:peftu:PeftuServer"


@pytest.fixture(scope="module")
def app(tiny_base):
    """(url, store, S3 endpoint, versions, base) of a running app; Serve, Ray and S3 stop at the end.

    The replica inherits the fake credentials: Ray starts here, after they are set.
    """
    from peftu.serving.local import free_port, local_app

    s3 = S3Endpoint(free_port()).up()
    with fake_aws_env():
        uri = f"s3://{s3.create_bucket(f'peftu-faults-{uuid.uuid4().hex[:10]}')}/store"
        store = AdapterStore.open(uri, endpoint_url=s3.url)
        versions = publish_random_adapters(store, TASK, USERS, tiny_base, std=0.2, seed=3)
        config = {"base": tiny_base, "store": uri, "endpoint_url": s3.url, "task": TASK,
                  "max_adapters": MAX_ADAPTERS, "version_ttl_s": 0.5, "max_prompt_tokens": 64,
                  "max_tokens_limit": 16, "batch_wait_ms": 10, "admin_without_key": True,
                  "user_tokens": False, "body_timeout_s": 2.0}
        try:
            with local_app(config) as url:
                yield url, store, s3, versions, tiny_base
        finally:
            s3.down()


def complete(url: str, user: str | None, *, timeout: float = 60, **options) -> requests.Response:
    body = {"model": f"tiny-test:{user}" if user else "tiny-test", "prompt": PROMPT, "max_tokens": 6,
            "temperature": 0, **options}
    return requests.post(f"{url}/v1/completions", json=body, timeout=timeout)


def answer(r: requests.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_error_names(r: requests.Response, *parts: str) -> None:
    """A 4xx in OpenAI's error shape whose message names each part."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    for part in parts:
        assert part in message, (part, message)


# --- hostile user ids ----------------------------------------------------------------------

HOSTILE_IDS = [
    ("../etc/passwd", "path separator"), ("a\\b", "path separator"), ("..", "relative path"),
    (".", "relative path"), ("x\x00y", "U+0000"), ("\x1b[31mred", "U+001B"), ("a\u202eb", "U+202E"),
    ("zero\u200bwidth", "U+200B"), ("line\u2028sep", "U+2028"), (" padded", "whitespace"),
    ("é" * 200, "longer than 255 bytes"), ("", "empty"),
]


@pytest.mark.parametrize("user, problem", HOSTILE_IDS)
def test_hostile_user_ids_are_refused_naming_the_problem(app, user, problem):
    url, *_ = app
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/score"):
        body = ({"prompt": PROMPT} if path == "/v1/completions" else {"input": "x"} if path == "/v1/score"
                else {"messages": [{"role": "user", "content": "x"}]})
        r = requests.post(f"{url}{path}", json={"model": f"tiny-test:{user}", **body}, timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert_error_names(r, "user id", problem)
    r = requests.post(f"{url}/v1/completions", json={"model": "tiny-test", "prompt": "x"}, timeout=30,
                      headers={"serve_multiplexed_model_id": f"tiny-test:{user}".encode("unicode_escape").decode()})
    assert r.status_code in (200, 400), r.text  # a header cannot carry the raw id; its escaped form is a plain id


@pytest.mark.parametrize("path_id", ["..%2Fetc", "%2E%2E", "x%00y", "%1B%5B31m", "a%E2%80%AEb", "%C3%A9" * 200])
def test_hostile_user_ids_in_admin_paths(app, path_id):
    url, store, *_ = app
    for method, path in (("POST", f"/admin/users/{path_id}/invalidate"), ("DELETE", f"/admin/users/{path_id}")):
        r = requests.request(method, f"{url}{path}", timeout=30)
        assert r.status_code in (400, 404), (path, r.text)  # 404: the router refused the path before us
        if r.status_code == 400:
            assert_error_names(r, "user id")
    assert len(store.list_users(TASK)) >= len(USERS)  # nothing was deleted


# --- hostile adapter files -------------------------------------------------------------------


def _peft_pair(state: dict[str, torch.Tensor], **config) -> dict[str, bytes]:
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    return {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": save(state)}


def _good_state(store: AdapterStore) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    files, _ = store.fetch_bytes(TASK, USERS[0])
    return load(files["adapter_model.safetensors"])


def _huge_header() -> bytes:
    """A safetensors file whose header declares a 2**62-byte tensor over 8 bytes of data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**62]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 8


def hostile_adapters(store: AdapterStore) -> dict[str, dict[str, bytes]]:
    """Files that verify in the store (published for real) but must never reach a bank slot."""
    good = _good_state(store)
    key = next(iter(good))
    good_pair = _peft_pair(good)
    return {
        "wrong-shape": _peft_pair({**good, key: torch.zeros(3, 3)}),
        "int-weights": _peft_pair({k: torch.ones_like(v, dtype=torch.int64) for k, v in good.items()}),
        "nan-weights": _peft_pair({k: torch.full_like(v, math.nan) for k, v in good.items()}),
        "nan-alpha": {**good_pair, "adapter_config.json": b'{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}'},
        "huge-header": {**good_pair, "adapter_model.safetensors": _huge_header()},
        "not-safetensors": {**good_pair, "adapter_model.safetensors": b"\x80\x04\x95pickle"},
        "other-peft-type": {**good_pair, "adapter_config.json": b'{"peft_type": "IA3", "r": 8}'},
        "rank-too-high": _peft_pair({k: v.repeat(4, 1) if "lora_A" in k else v.repeat(1, 4)
                                     for k, v in good.items()}, r=64),
    }


def test_hostile_adapter_files_are_answered_by_the_base_and_poison_no_batch(app):
    """Each hostile adapter is refused at load (counted, logged), its user gets the base; meanwhile
    sampled requests of a good user in the same batches all succeed (a NaN adapter used to fail them)."""
    url, store, _, _, base = app
    fp = base_fingerprint(base)
    hostile = hostile_adapters(store)
    for user, files in hostile.items():
        store.publish(TASK, user, files, base_fingerprint=fp, data_fingerprint="hostile", hparams={})
    errors = metric(url, "peftu_adapter_errors_total")
    plain = answer(complete(url, None))
    with ThreadPoolExecutor(16) as pool:
        sampled = [pool.submit(complete, url, u, temperature=1.0, seed=i)
                   for i, u in enumerate([USERS[1], *hostile] * 2)]
        assert all(f.result().status_code == 200 for f in sampled), [f.result().text for f in sampled]
        for user in hostile:
            r = complete(url, user)
            assert r.status_code == 200, (user, r.status_code, r.text)
            assert r.headers["x-peftu-adapter"] == "none" and answer(r) == plain, user
            assert r.headers["x-peftu-fallback"] in ("corrupt", "incompatible"), user
    assert metric(url, "peftu_adapter_errors_total") - errors == len(hostile)
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"


def test_a_pickle_beside_the_adapter_is_never_loaded(app):
    """A manifest that lists a .bin (pickle) is refused before any file is read."""
    url, store, *_ = app
    user = "pickled"
    publish_random_adapters(store, TASK, [user], app[4], std=0.2, seed=11)
    m = store.manifest(TASK, user)
    folder = f"adapters/{TASK}/{user}/versions/{m.version}"
    store.backend.put(f"{folder}/adapter_model.bin", b"\x80\x04\x95 pickle")
    forged = m.model_copy(update={"files": {**m.files, "adapter_model.bin": "0" * 64}})
    store.backend.put(f"{folder}/manifest.json", forged.model_dump_json().encode())
    before = metric(url, 'peftu_adapter_errors_total{reason="corrupt"}')
    assert complete(url, user).headers["x-peftu-adapter"] == "none"
    assert metric(url, 'peftu_adapter_errors_total{reason="corrupt"}') - before == 1


# --- bad requests, generated -------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: (st.lists(inner, max_size=4)
                                    | st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                     max_leaves=10)
_fields = {
    "model": st.one_of(st.sampled_from(["tiny-test", f"tiny-test:{USERS[2]}", "tiny-test:", "gpt-4", ":x"]),
                       st.text(max_size=40).map(lambda s: f"tiny-test:{s}"), _json),
    "prompt": st.one_of(st.text(max_size=200), _json), "input": st.one_of(st.text(max_size=200), _json),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                          "content": st.text(max_size=50)}), max_size=3), _json),
    "labels": st.one_of(st.lists(st.text(max_size=8), max_size=4), _json),
    "max_tokens": st.one_of(st.integers(-5, 40), _json), "temperature": st.one_of(st.floats(-1, 6), _json),
    "top_p": st.one_of(st.floats(-0.5, 1.5), _json),
    "stop": st.one_of(st.lists(st.text(max_size=70), max_size=6), _json),
    "seed": st.one_of(st.integers(-2, 2**64), _json), "n": st.one_of(st.integers(0, 3), _json),
    "stream": st.booleans(), "user": st.text(max_size=10),
}
_body = st.one_of(
    st.dictionaries(st.sampled_from(sorted(_fields)), st.just(None), max_size=len(_fields)).flatmap(
        lambda keys: st.fixed_dictionaries({k: _fields[k] for k in keys})),
    st.dictionaries(st.text(max_size=12), _json, max_size=4), _json)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/score"]), body=_body,
       raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_generated_requests_get_an_answer_or_a_4xx_naming_the_problem(app, path, body, raw):
    """Arbitrary JSON (and bytes) at every POST route: never a 5xx, never a hang, and every
    rejection is OpenAI's error shape with a message (naming the field when one is at fault)."""
    url, *_ = app
    data = raw if raw is not None else json.dumps(body).encode()
    r = requests.post(f"{url}{path}", data=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (path, data, r.status_code, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"], r.text
        if error["param"] and error["param"] != "body":
            assert error["param"].split(".")[0] in error["message"], r.text


def test_schemathesis_on_every_operation_of_the_openapi_schema(app):
    """Requests schemathesis generates from the app's own schema, valid and invalid ones, for every
    operation: no 5xx, and every 4xx names the problem. (Its pytest plugin does not work with
    pytest 9, so the cases are drawn from its Hypothesis strategies here.)"""
    url, *_ = app
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen = set()

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case) -> None:
        seen.add((case.method, case.path))
        response = case.call(base_url=url, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            assert response.json()["error"]["message"], response.text

    check()
    assert len(seen) >= 6, seen


def test_the_openapi_schema_routes_all_answer_without_5xx(app):
    """Every route the app publishes, called with an empty body / no params: a 2xx or a named 4xx."""
    url, *_ = app
    schema = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/score", "/healthz"} <= set(schema["paths"])
    for path, methods in schema["paths"].items():
        for method in methods:
            r = requests.request(method.upper(), f"{url}{path.replace('{user_id}', 'nobody-here')}",
                                 data=b"{}", headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code < 500, (method, path, r.text)
            if r.status_code >= 400:
                assert r.json()["error"]["message"], (method, path, r.text)


# --- the S3 endpoint goes down while serving ------------------------------------------------------


def _publish_corrupt(store: AdapterStore, user: str, base: str, seed: int) -> str:
    """A new version whose weights no longer match its manifest; its version."""
    version = publish_random_adapters(store, TASK, [user], base, std=0.2, seed=seed)[user]
    store.backend.put(f"adapters/{TASK}/{user}/versions/{version}/adapter_model.safetensors", b"not weights")
    return version


def test_a_bad_new_version_never_replaces_a_good_old_one(app):
    """A corrupt new version: the resident user keeps their loaded one, a cold user gets their previous
    good one, both say so, it is counted once each however often the pointer is re-read, and the next
    good version is picked up."""
    url, store, _, _, base = app
    warm, cold = "flip-warm", "flip-cold"
    first = publish_random_adapters(store, TASK, [warm, cold], base, std=0.2, seed=21)
    before = complete(url, warm)
    assert before.headers["x-peftu-adapter"] == first[warm] and "x-peftu-fallback" not in before.headers
    errors = metric(url, 'peftu_adapter_errors_total{reason="corrupt"}')
    for i, user in enumerate((warm, cold)):
        _publish_corrupt(store, user, base, seed=22 + i)
    kept = wait_for(lambda: (r := complete(url, warm)).headers.get("x-peftu-fallback") == "newer-version-unusable"
                    and r, "the resident user to find the bad version")
    assert kept.headers["x-peftu-adapter"] == first[warm] and answer(kept) == answer(before)
    older = complete(url, cold)
    assert older.headers["x-peftu-adapter"] == first[cold], older.headers
    assert older.headers["x-peftu-fallback"] == "newer-version-unusable"
    until = time.monotonic() + 4 * 0.5  # four version TTLs of requests: the pointer is re-read again and again
    while time.monotonic() < until:
        for user in (warm, cold):
            r = complete(url, user)
            assert r.headers["x-peftu-adapter"] == first[user] and r.headers["x-peftu-fallback"] == \
                "newer-version-unusable"
    assert metric(url, 'peftu_adapter_errors_total{reason="corrupt"}') - errors == 2
    fixed = publish_random_adapters(store, TASK, [warm], base, std=0.2, seed=30)[warm]
    after = wait_for(lambda: (r := complete(url, warm)).headers["x-peftu-adapter"] == fixed and r,
                     "the next good version")
    assert "x-peftu-fallback" not in after.headers


def test_oversized_and_never_finished_bodies_are_refused(app):
    """Over 1 MiB: a declared length is refused before any of it is sent, a chunked body at the limit;
    a body that stops coming is a 408 after body_timeout_s; the replica stays healthy."""
    url = app[0]
    declared = raw_post(url, "Content-Type: application/json\r\nContent-Length: 52428800\r\n", [])
    assert declared.startswith(b"HTTP/1.1 413") and b"52428800 bytes" in declared, declared[:300]
    piece = b"x" * 65536
    chunked = raw_post(url, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
                        [b"%x\r\n%s\r\n" % (len(piece), piece)] * 40)
    assert chunked.startswith(b"HTTP/1.1 413") and b"over 1048576 bytes" in chunked, chunked[:300]
    start = time.monotonic()
    stalled = raw_post(url, "Content-Type: application/json\r\nContent-Length: 1000\r\n", [b'{"model": '])
    assert stalled.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in stalled, stalled[:300]
    assert time.monotonic() - start < 30
    assert answer(complete(url, None))
    assert metric(url, 'peftu_requests_total{endpoint="/v1/completions",status="413"}') >= 2


def test_s3_down_while_serving_resident_users_keep_theirs_others_get_the_base(app):
    """With the store unreachable: a loaded adapter keeps answering; a cold user is answered by the
    base within the bounded retries, with a header naming the store; once S3 is back, it gets its own."""
    url, store, s3, versions, _ = app
    warm, cold = USERS[10], USERS[11]
    requests.post(f"{url}/admin/users/{cold}/invalidate", timeout=10)
    own = answer(complete(url, warm))
    plain = answer(complete(url, None))
    store_errors = metric(url, 'peftu_adapter_errors_total{reason="store"}')
    s3.down()
    try:
        time.sleep(0.6)  # past the version TTL, so the warm user's pointer is due for a re-check
        r = complete(url, warm)
        assert r.headers["x-peftu-adapter"] == versions[warm] and answer(r) == own
        start = time.monotonic()
        r = complete(url, cold, timeout=60)
        took = time.monotonic() - start
        assert r.status_code == 200 and answer(r) == plain and r.headers["x-peftu-adapter"] == "none"
        assert r.headers["x-peftu-fallback"] == "store-unavailable"
        assert took < 30, f"a cold load against a dead store took {took:.0f} s"
        wait_for(lambda: metric(url, 'peftu_adapter_errors_total{reason="store"}') >= store_errors + 2,
                 "the store errors counted")
    finally:
        s3.up()
    r = wait_for(lambda: (r := complete(url, cold)).headers["x-peftu-adapter"] != "none" and r,
                 "the cold user's adapter after the store came back")
    assert r.headers["x-peftu-adapter"] == versions[cold] and "x-peftu-fallback" not in r.headers
    assert store.list_versions(TASK, cold) == [versions[cold]]


# --- load ---------------------------------------------------------------------------------------


def test_short_soak_of_many_users_stays_within_the_bank(app):
    """8 clients for 4 s over 50 users with room for 8 adapters: no errors, eviction keeps the bound."""
    url, *_ = app
    result = soak(url, [f"tiny-test:{u}" for u in USERS], PROMPT, clients=8, seconds=4)
    print(f"short soak: {result['requests']} requests, p50 {result['p50_ms']:.0f} ms, "
          f"p99 {result['p99_ms']:.0f} ms")
    assert result["requests"] > 0 and result["failures"] == [] and result["refused"] == 0, result["failures"][:5]
    assert_bank_bounds(url, MAX_ADAPTERS)


# --- a replica dies under load (last: the others need it) --------------------------------------------


def test_a_killed_replica_under_load_fails_fast_and_the_app_recovers(app):
    """SIGKILL the Serve replica while clients are sending: every in-flight request ends (a 200, or a
    5xx saying so) within its timeout, none hangs; Serve starts a new replica that answers as before."""
    url, *_ = app
    user = USERS[20]
    before = answer(complete(url, user))
    old = {p.pid for p in processes_titled(REPLICA)}
    assert old, "no replica process found"
    outcomes: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                r = complete(url, user, timeout=60)
                outcomes.append(str(r.status_code) if r.status_code != 200 or answer(r) == before else "wrong")
                if r.status_code >= 500:
                    errors.append(r.text[:300])
            except requests.RequestException as e:
                outcomes.append(type(e).__name__)

    clients = [threading.Thread(target=client) for _ in range(6)]
    for t in clients:
        t.start()
    try:
        wait_for(lambda: len(outcomes) >= 6, "requests before the kill")
        assert kill_one(REPLICA) in old
        wait_for(lambda: {p.pid for p in processes_titled(REPLICA)} - old, "a new replica", deadline_s=120)
        wait_for(lambda: complete(url, user).status_code == 200, "the new replica to answer", deadline_s=120)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=90)
    assert not any(t.is_alive() for t in clients), "a request hung"
    assert "wrong" not in outcomes
    assert set(outcomes) <= {"200", "500", "502", "503", "ConnectionError"}, set(outcomes)
    assert answer(complete(url, user)) == before
    assert all(errors), "a 5xx without a body"
    print(f"replica kill: outcomes {dict((o, outcomes.count(o)) for o in set(outcomes))}; 5xx bodies {set(errors)}")
