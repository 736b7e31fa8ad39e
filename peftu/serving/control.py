"""One message to every replica of the app: a user deleted, invalidated or given a new version.

A Serve request reaches one replica, and Serve has no public way to call every
replica of a deployment. So each application has one small named Ray actor,
`Control`, that holds a numbered log of events. Every replica long-polls it
from a background task, applies each event (evicts the user, forgets their
PPlug history) and acknowledges it; `publish` returns once every live replica
has acknowledged the event (or a timeout passes, saying which did not), so the
admin call that published it can answer "evicted everywhere". A replica that
has not polled for a while (stopped, crashed) no longer counts as live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import ray

log = logging.getLogger("peftu.serving")

POLL_S = 5.0
"""A poll waits at most this long for an event before it returns empty (and is sent again)."""
LIVE_S = 3 * POLL_S
"""A replica that has not polled for this long is taken for gone."""
_KEEP = 10_000  # events kept for replicas that poll late


@ray.remote(num_cpus=0, max_concurrency=1000)
class Control:
    """The application's event log and who has applied how much of it."""

    def __init__(self) -> None:
        self.events: list[tuple[int, dict]] = []
        self.seq = 0
        self.acked: dict[str, int] = {}
        self.seen: dict[str, float] = {}
        self._changed = asyncio.Condition()

    def _live(self) -> list[str]:
        now = time.monotonic()
        for replica in [r for r, t in self.seen.items() if now - t > LIVE_S]:
            self.seen.pop(replica)
            self.acked.pop(replica, None)
        return list(self.seen)

    async def register(self, replica: str) -> int:
        """A new replica starts after the current event (what came before, it never loaded)."""
        async with self._changed:
            self.seen[replica], self.acked[replica] = time.monotonic(), self.seq
            return self.seq

    async def poll(self, replica: str, after: int, timeout_s: float = POLL_S) -> list[tuple[int, dict]]:
        """Events after `after`, waiting up to `timeout_s` for one."""
        async with self._changed:
            self.seen[replica] = time.monotonic()
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.seq > after), timeout_s)
            except asyncio.TimeoutError:
                pass
            self.seen[replica] = time.monotonic()
            return [(s, e) for s, e in self.events if s > after]

    async def ack(self, replica: str, seq: int) -> None:
        async with self._changed:
            self.seen[replica] = time.monotonic()
            self.acked[replica] = max(self.acked.get(replica, 0), seq)
            self._changed.notify_all()

    async def publish(self, event: dict, timeout_s: float = 30.0) -> dict:
        """Append `event`; return once every live replica has applied it, or `timeout_s` passed."""
        async with self._changed:
            self.seq += 1
            seq = self.seq
            self.events.append((seq, event))
            del self.events[:-_KEEP]
            self._changed.notify_all()

            def done() -> bool:
                return all(self.acked.get(r, 0) >= seq for r in self._live())

            try:
                await asyncio.wait_for(self._changed.wait_for(done), timeout_s)
            except asyncio.TimeoutError:
                pass
            live = self._live()
            return {"replicas": len(live), "applied": sum(self.acked.get(r, 0) >= seq for r in live),
                    "missing": sorted(r for r in live if self.acked.get(r, 0) < seq)}


def control(app_name: str):
    """The application's Control actor, created by whichever replica asks first."""
    return Control.options(name=f"peftu-control-{app_name}", namespace="peftu", get_if_exists=True,
                           lifetime="detached").remote()


class Broadcast:
    """A replica's end: it applies every published event with `forget(user)`, and publishes its own.

    Outside a Serve replica (no application, e.g. the engine in a test) it is local only.
    """

    def __init__(self, forget: Callable[[str], None], timeout_s: float = 30.0):
        self.forget, self.timeout_s = forget, timeout_s
        self._task: asyncio.Task | None = None
        context = _replica_context()
        self.app_name, self.replica = (context.app_name, context.replica_tag) if context else (None, None)

    def listen(self) -> None:
        """Start polling (once; on the replica's event loop, so from a request or an async method)."""
        if self._task is None and self.app_name is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def publish(self, user: str, why: str) -> dict:
        """Forget `user` here and on every live replica; how many applied it (and which did not in time)."""
        self.forget(user)
        if self.app_name is None:
            return {"replicas": 1, "applied": 1, "missing": []}
        self.listen()
        result = await control(self.app_name).publish.remote({"user": user, "why": why}, self.timeout_s)
        if result["missing"]:
            log.warning("%s of user %r: replicas %s did not confirm within %.0f s (they find it at their next "
                        "version check)", why, user, ", ".join(result["missing"]), self.timeout_s)
        return result

    async def _run(self) -> None:
        after = None
        while True:
            try:
                actor = control(self.app_name)
                if after is None:
                    after = await actor.register.remote(self.replica)
                for seq, event in await actor.poll.remote(self.replica, after):
                    self.forget(event["user"])
                    after = seq
                    await actor.ack.remote(self.replica, seq)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the control actor gone: find or make it, register again
                log.warning("replica %s: the control actor did not answer (%s); registering again", self.replica, e)
                after = None
                await asyncio.sleep(1.0)  # a back-off, not a wait for a signal


def _replica_context():
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context()
    except RayServeException:  # not in a replica
        return None
