"""Helpers the tests share: free ports, polling, fake AWS, and fault injection.

The fault injection mocks nothing: an S3 endpoint goes down because its server stops
listening, a Ray worker or Serve replica dies because its process gets SIGKILL.
(Fixtures built on these live in conftest.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import boto3
import psutil
import pytest
import requests

from peftu.serving.local import free_port as free_port  # the project's one, re-exported for the tests

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, deadline_s: float = 60.0, poll_s: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy; fail naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")


FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def fake_aws_env() -> Iterator[None]:
    """Fake credentials and no endpoint or profile from the environment, for module-scoped fixtures
    (a Ray started inside passes them on to its workers)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_AWS.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        yield


class S3Endpoint:
    """A moto S3 server on a fixed loopback port that can go down and come back.

    moto keeps its buckets in the process, so what was stored before `down()`
    is there again after `up()`: an outage, not a data loss.
    """

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server = None

    def up(self) -> S3Endpoint:
        from moto.server import ThreadedMotoServer

        if self._server is None:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def create_bucket(self, name: str) -> str:
        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1").create_bucket(Bucket=name)
        return name


def processes_titled(text: str, root: psutil.Process | None = None) -> list[psutil.Process]:
    """Descendants of `root` (this process) whose command line contains `text` (Ray titles its workers)."""
    found = []
    for proc in (root or psutil.Process()).children(recursive=True):
        try:
            if text in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def kill_one(text: str, root: psutil.Process | None = None) -> int | None:
    """SIGKILL one descendant process titled `text`; its pid, or None if there was none."""
    for proc in processes_titled(text, root):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        return proc.pid
    return None


def assert_store_whole(store, task: str, users: list[str], base_fp: str) -> dict[str, str]:
    """Each user has exactly one version, the one its pointer names, and it verifies (sha256 of
    every file, fitted on `base_fp`); no half-written version (files without a manifest) is left.
    Returns each user's version."""
    versions = {}
    for user in users:
        latest = store.latest_version(task, user)
        assert store.list_versions(task, user) == [latest], (user, store.list_versions(task, user), latest)
        files, manifest = store.fetch_bytes(task, user, expect_base=base_fp)
        assert set(files) == set(manifest.files) and manifest.version == latest
        versions[user] = latest
    folders = {key.rsplit("/", 1)[0] for key in store.backend.list(f"adapters/{task}") if "/versions/" in key}
    half = [f for f in folders if not store.backend.exists(f"{f}/manifest.json")]
    assert half == [], f"half-written versions left: {half}"
    return versions


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, by its full name with labels."""
    out = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(url: str, prefix: str) -> float:
    return sum(v for k, v in metrics(url).items() if k.startswith(prefix))


def soak(url: str, models: list[str], prompt: str, clients: int, seconds: float, max_tokens: int = 4) -> dict:
    """`clients` threads send completions for random users' models for `seconds`; latencies of the
    answers, refusals (429 with Retry-After, kept apart) and failures (anything else but a 200
    answered by the user's adapter)."""
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    refused: list[float] = []
    failures: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while time.monotonic() < stop:
                body = {"model": rng.choice(models), "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": 0}
                start = time.perf_counter()
                try:
                    r = session.post(f"{url}/v1/completions", json=body, timeout=60)
                except requests.RequestException as e:
                    failures.append(repr(e))
                    continue
                took = time.perf_counter() - start
                if r.status_code == 429 and r.headers.get("retry-after"):
                    refused.append(took)
                    continue
                latencies.append(took)
                if r.status_code != 200 or r.headers.get("x-peftu-adapter") == "none":
                    failures.append(f"{r.status_code} {r.headers.get('x-peftu-adapter')} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def ms(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    return {"requests": len(latencies), "failures": failures, "p50_ms": ms(latencies, 0.5),
            "p99_ms": ms(latencies, 0.99), "refused": len(refused), "refused_p50_ms": ms(refused, 0.5),
            "refused_max_ms": ms(refused, 1.0)}


def raw_post(url: str, head: str, chunks: list[bytes]) -> bytes:
    """Send a request as raw bytes (as much of `chunks` as the server takes); the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):  # refused and closed under us
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    return answer


def open_request(url: str, body: dict) -> socket.socket:
    """A completion sent on a raw connection and left unread: the caller hangs up by closing it."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def assert_bank_bounds(url: str, max_adapters: int) -> None:
    """The cache never holds more than its slots, and evicted rather than refused."""
    m = metrics(url)
    assert m["peftu_adapters_resident"] <= max_adapters
    resident = requests.get(f"{url}/admin/adapters", timeout=10).json()["users"]
    assert len(resident) <= max_adapters
    assert m["peftu_adapter_evictions_total"] > 0
