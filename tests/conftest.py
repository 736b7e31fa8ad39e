"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.faults import fake_aws_env, free_port

if TYPE_CHECKING:
    from cluster.local import ClusterInfo

# ---------------------------------------------------------------- S3 store fixtures
# A real S3 API over HTTP on loopback: moto's server in a thread, reached by
# boto3 through endpoint_url. Nothing talks to AWS.


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback TCP port with no listener, for servers a test starts (or for a dead endpoint)."""
    return free_port()


@pytest.fixture
def s3_fake_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """Fake AWS credentials in the environment, and nothing from the real ~/.aws."""
    missing = tmp_path_factory.mktemp("aws") / "none"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """One moto S3 server for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _s3_create_bucket(endpoint_url: str) -> str:
    """A new, empty bucket on the server; returns its name."""
    import boto3

    name = f"peftu-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store_uri(s3_server: str, s3_fake_credentials: None) -> str:
    """"s3://<fresh bucket>/<prefix>" on `s3_server` (open it with endpoint_url=s3_server)."""
    return f"s3://{_s3_create_bucket(s3_server)}/stores/test"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path):
    """An empty adapter store on each backend: a local folder, and S3 on moto's server."""
    from peftu.store import AdapterStore

    if request.param == "local":
        return AdapterStore.open(str(tmp_path / "store"))
    return AdapterStore.open(request.getfixturevalue("s3_store_uri"), endpoint_url=request.getfixturevalue("s3_server"))


# ---------------------------------------------------------------- models and homes


@pytest.fixture(autouse=True, scope="session")
def _isolated_peftu_home(tmp_path_factory) -> Iterator[None]:
    """Tests never read or write the user's ~/.cache/peftu."""
    import os

    old = os.environ.get("PEFTU_HOME")
    os.environ["PEFTU_HOME"] = str(tmp_path_factory.mktemp("peftu-home"))
    yield
    if old is None:
        os.environ.pop("PEFTU_HOME", None)
    else:
        os.environ["PEFTU_HOME"] = old


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A small tiny base, built the real way (tokenizer, Llama, pre-training).

    Bound by steps, not time, so it is the same model however busy the machine is.
    """
    from peftu.config import BaseBuildConfig
    from peftu.model.build import build_base

    path = tmp_path_factory.mktemp("base") / "tiny-test"
    cfg = BaseBuildConfig(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                          num_kv_heads=2, users_per_task=200, max_steps=150, max_minutes=60.0)
    build_base(path, cfg, log=lambda *_: None)
    return str(path)


@pytest.fixture(scope="module")
def bank_with_users(tiny_base):
    """(model, tokenizer, bank, adapter folders): slots 1..3 hold three users' random adapters (tests/banks.py)."""
    from tests.banks import users_bank

    yield from users_bank(tiny_base)


@pytest.fixture(scope="module")
def reference(tiny_base, bank_with_users):
    """slot -> that user's PeftModel on a separate copy of the base (the base itself for slot 0)."""
    from tests.banks import peft_reference

    return peft_reference(tiny_base, bank_with_users[3])


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A Ray of this test process for one module: 2 CPUs, no dashboard, never another test's cluster.

    Started with fake AWS credentials and no endpoint from the environment, which its workers
    (and Serve replicas) inherit; the test process's own environment is restored after the start.
    """
    import ray

    with fake_aws_env():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- local Ray cluster (cluster/local.py)
# A real multi-node Ray cluster on this machine: a head and two worker nodes, each its own
# `ray start`, with token auth on. Submit jobs to it with
#   cluster.submit.submit(ray_cluster.dashboard_url, entrypoint, token=ray_cluster.auth_token)
# or run a driver with env={**os.environ, **ray_cluster.env}. Worker i carries the resource
# `node:worker-i`; the head has 0 CPUs, so jobs' tasks run on the two 1-CPU workers.


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[ClusterInfo]:
    """Head (0 CPUs) + 2 worker nodes (1 CPU each), token auth on, a free dashboard port; stopped at the end."""
    import secrets

    from cluster.local import start_cluster, stop_cluster

    port = free_port()
    # Its own token, not ~/.ray/auth_token, which other local Ray sessions on this machine use.
    info = start_cluster(workers=2, cpus_per_node=1, head_cpus=0, dashboard_port=port, auth=True,
                         token=secrets.token_hex(32))
    try:
        yield info
    finally:
        stop_cluster(port)
