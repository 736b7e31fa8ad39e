"""`peftu bench store` at a small N: it runs on both backends, checks its own answers and ends with its JSON."""

from __future__ import annotations

import json

import pytest

from peftu.bench.store import bench_store


@pytest.mark.usefixtures("s3_fake_credentials")
def test_bench_store_on_moto_measures_a_right_plan() -> None:
    r = bench_store(60, "s3", publish=20, concurrency=2)
    assert (r.users, r.backend, r.published) == (60, "s3", 20)
    assert r.index_bytes > 0 and r.publish_ms_per_user > 0 and r.plan_s > 0 and r.list_s > 0


def test_bench_store_command_ends_with_its_json(tmp_path) -> None:
    from tests.test_cli import peftu

    result = peftu("bench", "store", "--users", "40", "--publish", "10", "--backend", "local",
                   "--plot", str(tmp_path / "store.png"), "--json")
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.splitlines()[-1])
    assert {"users", "backend", "publish_ms_per_user", "plan_s", "plan_ms_per_user", "list_s"} <= set(last)
    assert (last["users"], last["backend"]) == (40, "local")
    assert (tmp_path / "store.png").stat().st_size > 0
