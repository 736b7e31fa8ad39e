"""Request body limits (peftu/serving/limits.py) at the ASGI level: refused before they are read.

Over HTTP through Serve's proxy: tests/test_serving_faults.py::test_oversized_and_never_finished_bodies.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request

from peftu.serving.limits import BodyLimits

LIMIT, TIMEOUT = 1000, 0.2


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimits)
    app.state.body_limits = (LIMIT, TIMEOUT)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app


def _call(headers: list[tuple[bytes, bytes]], chunks: list[bytes], *, stall: bool = False) -> tuple[int, dict, int]:
    """(status, body, chunks the app read) of one POST whose body comes in `chunks` (then never ends if `stall`)."""
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks) or stall}
        await asyncio.Event().wait()  # the client sends nothing more

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/echo",
             "raw_path": b"/echo", "query_string": b"", "headers": headers, "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(asyncio.wait_for(_app()(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert [m["type"] for m in sent].count("http.response.start") == 1
    return start["status"], json.loads(body), read


def test_a_body_within_the_limit_is_read():
    assert _call([(b"content-length", b"600")], [b"x" * 300, b"y" * 300])[:2] == (200, {"bytes": 600})


def test_a_declared_oversized_body_is_refused_before_a_byte_is_read():
    status, body, read = _call([(b"content-length", b"50000000")], [b"x" * 500] * 4)
    assert status == 413 and read == 0 and "50000000 bytes" in body["error"]["message"]


def test_a_chunked_body_is_refused_at_the_first_chunk_past_the_limit():
    status, body, read = _call([(b"transfer-encoding", b"chunked")], [b"x" * 400] * 10)
    assert status == 413 and read == 3 and f"over {LIMIT} bytes" in body["error"]["message"]


def test_a_body_that_never_arrives_is_a_408():
    status, body, read = _call([(b"content-length", b"900")], [b"x" * 10], stall=True)
    assert status == 408 and read == 1 and "did not arrive within" in body["error"]["message"]


def test_a_bad_content_length_is_a_400():
    assert _call([(b"content-length", b"12abc")], [b"{}"])[0] == 400
