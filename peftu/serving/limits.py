"""Request bodies bounded in size and in time, before the app reads them.

An ASGI middleware in the replica, in front of FastAPI: a body whose
`Content-Length` is over `max_body_bytes` is answered 413 before a byte of it is
read; a body without a length (chunked) is counted as it arrives and answered
413 at the first chunk past the limit; a body that has not fully arrived
`body_timeout_s` after the request began is answered 408 and the connection
closed. Serve's proxy forwards a body's chunks only as the replica reads them,
so a refused body is not buffered there either. Once the body is in, `receive`
passes through untouched (streams wait on it for a client's disconnect).
"""

from __future__ import annotations

import asyncio
import json
import time

from peftu.serving.api import error_body


class _Refused(Exception):
    """Raised out of `receive` to stop the app; the answer was already sent (FastAPI would turn any error
    while it reads a body into its own 400)."""


class BodyLimits:
    """Reads its limits from `app.state.body_limits` ((max bytes, timeout s), set by the replica); off without."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        limits = getattr(scope["app"].state, "body_limits", None) if scope["type"] == "http" else None
        if limits is None:
            return await self.app(scope, receive, send)
        request = _Request(receive, send, *limits)
        length = _content_length(scope)
        if length is not None and not length.isdigit():
            return await request.refuse(400, "the Content-Length header is not a number")
        if length is not None and int(length) > request.max_bytes:
            return await request.refuse(413, f"the request body has {int(length)} bytes, this server takes at most "
                                             f"{request.max_bytes}")
        try:
            await self.app(scope, request.receive, request.send)
        except _Refused:
            pass


class _Request:
    """One request's body: counted and timed until its last chunk, then `receive` passes through."""

    def __init__(self, receive, send, max_bytes: int, timeout_s: float):
        self._receive, self._send = receive, send
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.received, self.done, self.started, self.refused = 0, False, False, False

    async def receive(self):
        if self.done:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await self.refuse(408, f"the request body did not arrive within {self.timeout_s:g} s")
            raise _Refused() from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                await self.refuse(413, f"the request body is over {self.max_bytes} bytes, the most this server takes")
                raise _Refused()
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    async def send(self, message) -> None:
        if self.refused:  # the app's own answer to the aborted read: already answered
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

    async def refuse(self, status: int, message: str) -> None:
        """Answer in OpenAI's error shape and close the connection (unless the app already answered)."""
        if self.started or self.refused:
            return
        self.refused = True
        body = json.dumps(error_body(message)).encode()
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await self._send({"type": "http.response.body", "body": body})


def _content_length(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return value.decode("latin-1").strip()
    return None
