"""Fault injection for the reliability tests: real processes killed, real endpoints stopped.

Nothing here mocks a failure: an S3 endpoint goes down because its server stops
listening, a Ray worker or Serve replica dies because its process gets SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TypeVar

import boto3
import psutil

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, deadline_s: float = 30.0, poll_s: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy; fail naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")


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
