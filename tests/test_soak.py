"""`make test-slow`: a bounded soak of the serving app, 64 clients for 60 s over 1,000 users (loopback).

Room for 64 adapters, so nearly every request of a uniformly drawn user is a
cold load that evicts another: no request may fail or fall back to the base,
the bank stays within its slots, and the replica's memory stops growing once
warm. p50 / p99 latency are printed for docs/reliability.md.
"""

from __future__ import annotations

import tempfile

import pytest

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.serving.local import local_app
from peftu.store import AdapterStore
from tests.faults import assert_bank_bounds, metrics, processes_titled, soak

TASK = "synth-cls"
PROMPT = "Review: the lamp was great. Sentiment:"


@pytest.mark.slow
def test_64_clients_for_60_s_over_1000_users(tiny_base):
    users = [f"user{i:04d}" for i in range(1000)]
    with tempfile.TemporaryDirectory(prefix="peftu-soak-") as store_dir:
        publish_random_adapters(AdapterStore.open(store_dir), TASK, users, tiny_base, std=0.2, seed=7)
        config = {"base": tiny_base, "store": store_dir, "task": TASK, "max_adapters": 64, "max_rank": 8,
                  "max_tokens_limit": 8, "admin_without_key": True, "user_tokens": False}
        with local_app(config) as url:
            models = [f"tiny-test:{u}" for u in users]
            warm = soak(url, models, PROMPT, clients=64, seconds=10)
            (replica,) = processes_titled("ServeReplica:peftu:PeftuServer")
            rss_warm = replica.memory_info().rss
            result = soak(url, models, PROMPT, clients=64, seconds=60)
            rss_end = replica.memory_info().rss
            m = metrics(url)
            assert_bank_bounds(url, 64)
    print(f"soak: {result['requests']} requests in 60 s, p50 {result['p50_ms']:.0f} ms, "
          f"p99 {result['p99_ms']:.0f} ms; loads {m['peftu_adapter_loads_total']:.0f}, evictions "
          f"{m['peftu_adapter_evictions_total']:.0f}; replica RSS {rss_warm / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")
    assert warm["failures"] == [] and result["failures"] == [], (warm["failures"] + result["failures"])[:5]
    assert result["requests"] > 0
    assert rss_end < rss_warm * 1.15, f"the replica grew from {rss_warm} to {rss_end} bytes under a steady load"
