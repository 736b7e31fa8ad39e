"""`peftu serve` as an operator runs it, in a subprocess: SIGTERM or SIGINT stops it gracefully.

A stream that is running when the signal comes is answered to its end; the command exits 0,
with no traceback, after Serve and Ray are down. Slow: the subprocess starts its own Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests
from transformers import AutoTokenizer

from peftu.serving.local import free_port
from tests.faults import wait_for

pytestmark = pytest.mark.slow


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"peftu serve exited early ({proc.returncode}): {proc.stdout.read()}")
    try:
        return requests.get(f"{url}/healthz", timeout=5).status_code == 200
    except requests.RequestException:  # not listening yet, or the app not deployed yet
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_running_stream_finish_and_exits_0(sig, tiny_base, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftu", "serve", "--port", str(port), "--base", tiny_base,
         "--store", str(tmp_path / "store"), "--set", "user_tokens=false", "--set", "oppu=false",
         "--grace-s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url, proc), "peftu serve to answer /healthz", deadline_s=600, poll_s=1)
        eos = AutoTokenizer.from_pretrained(tiny_base).eos_token_id
        stream = requests.post(f"{url}/v1/completions", stream=True, timeout=300, json={
            "model": "tiny-test", "prompt": "Review: the lamp was great. Sentiment:", "max_tokens": 256,
            "temperature": 0, "stream": True, "logit_bias": {str(eos): -100}})
        lines = (line for line in stream.iter_lines() if line)
        assert next(lines).startswith(b"data: {")  # it is running
        proc.send_signal(sig)
        after = list(lines)
        assert after[-1] == b"data: [DONE]"
        chunks = [json.loads(line[6:]) for line in after[:-1]]
        assert chunks and chunks[-1]["choices"][0]["finish_reason"] == "length"  # all 256 tokens came
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert f"{sig.name}: stopping" in out and "stopped" in out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
