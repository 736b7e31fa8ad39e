"""Two replicas: the app's series add up in Ray's metrics export; a delete or invalidate reaches both.

A Ray of its own (Ray's metrics export port on, which `local_ray` leaves off) and two
replicas; requests without the multiplexing header, so the proxy spreads them over both.
The version TTL is long, so only the broadcast can make the other replica forget a user.
Slow: two replicas each load a base.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.serving.local import free_port
from peftu.store import AdapterStore
from tests.faults import fake_aws_env, wait_for

TASK = "synth-cls"
USERS = [f"m{i}" for i in range(12)]
N = 36

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(tiny_base):
    """(app url, Ray's metrics export url, versions) of an app with two replicas."""
    import ray
    from ray import serve

    from peftu.serving.server import PeftuServer

    export = free_port()
    with fake_aws_env():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=export)
    try:
        with tempfile.TemporaryDirectory(prefix="peftu-metrics-") as store_dir:
            versions = publish_random_adapters(AdapterStore.open(store_dir), TASK, USERS, tiny_base, seed=4)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = {"base": tiny_base, "store": store_dir, "task": TASK, "user_tokens": False,
                      "max_tokens_limit": 8, "max_prompt_tokens": 64, "admin_without_key": True,
                      "version_ttl_s": 600}
            app = PeftuServer.options(num_replicas=2, ray_actor_options={"num_cpus": 1})
            serve.run(app.bind(config), name="peftu", route_prefix="/")
            yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{export}/metrics", versions, store_dir
    finally:
        serve.shutdown()
        ray.shutdown()


def _samples(export_url: str, name: str) -> list:
    """Every sample of one series in Ray's export."""
    text = requests.get(export_url, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_counters_summed_over_replicas_equal_the_requests_sent(two_replicas):
    url, export_url, versions, _ = two_replicas

    def ask(i: int) -> int:
        user = USERS[i % len(USERS)]
        r = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": f"tiny-test:{user}", "prompt": "Review: fine. Sentiment:", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-peftu-adapter"] == versions[user], r.text
        return r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(8) as pool:
        completion_tokens = sum(pool.map(ask, range(N)))

    def counted() -> list | None:
        samples = [s for s in _samples(export_url, "ray_peftu_requests_total")
                   if s.labels.get("endpoint") == "/v1/completions" and s.labels.get("status") == "200"]
        return samples if sum(s.value for s in samples) >= N else None

    samples = wait_for(counted, "Ray's export to count every request", deadline_s=120, poll_s=1)
    per_replica: dict[str, float] = defaultdict(float)
    for s in samples:
        assert s.labels["deployment"] == "PeftuServer" and s.labels["application"] == "peftu"
        per_replica[s.labels["replica"]] += s.value
    assert sum(per_replica.values()) == N
    assert len(per_replica) == 2, f"all requests went to one replica: {dict(per_replica)}"
    tokens = wait_for(lambda: sum(s.value for s in _samples(export_url, "ray_peftu_tokens_total")
                                  if s.labels.get("kind") == "completion") >= completion_tokens or None,
                      "the completion tokens", deadline_s=60, poll_s=1)
    assert sum(s.value for s in _samples(export_url, "ray_peftu_tokens_total")
               if s.labels.get("kind") == "completion") == completion_tokens, tokens
    loads = sum(s.value for s in _samples(export_url, "ray_peftu_adapter_loads_total"))
    hits = sum(s.value for s in _samples(export_url, "ray_peftu_adapter_hits_total"))
    assert loads + hits == N and len(USERS) <= loads <= 2 * len(USERS)
    assert not any("user" in s.labels for s in _samples(export_url, "ray_peftu_requests_total"))


def _ask(url: str, user: str) -> requests.Response:
    r = requests.post(f"{url}/v1/completions", timeout=120, json={
        "model": f"tiny-test:{user}", "prompt": "Review: fine. Sentiment:", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def _on_both_replicas(url: str, user: str, held: bool) -> dict[str, bool]:
    """Ask /admin/adapters until both replicas have answered; whether each holds `user` (loading it
    on the way while `held` is wanted)."""
    seen: dict[str, bool] = {}

    def both() -> bool:
        if held:
            _ask(url, user)
        answer = requests.get(f"{url}/admin/adapters", timeout=30).json()
        seen[answer["replica"]] = user in answer["users"]
        return len(seen) == 2 and all(v == held for v in seen.values())

    wait_for(both, f"both replicas to {'hold' if held else 'have dropped'} user {user}", deadline_s=120, poll_s=0)
    return seen


def test_a_delete_or_invalidate_reaches_every_replica_before_it_answers(two_replicas, tiny_base):
    url, _, versions, store_dir = two_replicas
    user, renewed = USERS[1], USERS[2]
    _on_both_replicas(url, user, held=True)
    r = requests.delete(f"{url}/admin/users/{user}", timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["deleted_versions"] == 1 and r.json()["replicas"] == {"replicas": 2, "applied": 2, "missing": []}
    assert not AdapterStore.open(store_dir).has_adapter(TASK, user)
    for _ in range(12):  # right after the answer, on either replica: never the deleted weights
        assert _ask(url, user).headers["x-peftu-adapter"] == "none"
    assert set(_on_both_replicas(url, user, held=False).values()) == {False}

    _on_both_replicas(url, renewed, held=True)
    new = publish_random_adapters(AdapterStore.open(store_dir), TASK, [renewed], tiny_base, seed=9)[renewed]
    r = requests.post(f"{url}/admin/users/{renewed}/invalidate", timeout=120)
    assert r.status_code == 200 and r.json()["replicas"]["applied"] == 2, r.text
    for _ in range(12):
        assert _ask(url, renewed).headers["x-peftu-adapter"] == new != versions[renewed]
