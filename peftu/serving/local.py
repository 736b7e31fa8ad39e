"""The app on this machine's Ray, for the demo, the benchmark and quick looks.

`local_app(config)` starts Serve on a loopback port, deploys `PeftuServer` with
`config` (ServeConfig fields), yields its URL and shuts Serve down again; a
local Ray is started with `address="local"` (never attaching to another
cluster) unless one is already initialised.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from peftu.data.schema import TaskSpec
from peftu.inference.predict import answer_sampling
from peftu.serving.auth import make_token


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_app(config: dict, port: int = 0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Serve the app at http://127.0.0.1:<port> for the duration of the block; `env`: the replica's secrets."""
    import ray
    from ray import serve

    from peftu.serving.server import PeftuServer

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = port or free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = PeftuServer.options(ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}}) if env \
            else PeftuServer
        serve.run(app.bind(config), name="peftu", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def ask_users(base: str, store: str, spec: TaskSpec, users: list[str], texts: list[str], *, show: int = 3,
              log=print) -> dict[str, str]:
    """Start the app, send the same input as several users over HTTP, print the answers.

    Classification and rating tasks are answered by label scoring (`/v1/score`),
    generation tasks by a greedy completion. Of `texts`, the first on which
    `show` users answer differently is used (else the one with the most
    different answers); those users' answers and the base's are printed and
    the users' come back. User tokens are on, as in production: each user's requests
    carry a token minted for them under this run's own secret.
    """
    best: tuple[str, str, dict[str, tuple[str, str]], int] | None = None
    secret = secrets.token_hex(32)
    with local_app({"base": base, "store": store, "task": spec.name, "user_tokens": True},
                   env={"PEFTU_TOKEN_SECRET": secret}) as url:
        model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        tokens = {user: make_token(secret, user, model, ttl_s=3600) for user in users}
        for text in texts:
            asked = {user: _ask(url, f"{model}:{user}", spec, text, tokens[user]) for user in users}
            distinct: dict[str, tuple[str, str]] = {}
            for user, (answer, version) in asked.items():
                if answer not in {a for a, _ in distinct.values()}:
                    distinct[user] = (answer, version)
            if best is None or len(distinct) > best[3]:
                best = (text, _ask(url, model, spec, text)[0], distinct | asked, len(distinct))
            if len(distinct) >= show:
                break
    text, base_answer, answers, n_distinct = best
    chosen = list(answers)[:show]
    log(f"input: {text!r} ({n_distinct} different answers among {len(users)} users)\n"
        f"  base model: {base_answer!r}")
    for user in chosen:
        answer, version = answers[user]
        log(f"  user {user} (adapter {version}): {answer!r}")
    return {user: answers[user][0] for user in chosen}


def _ask(url: str, model: str, spec: TaskSpec, text: str, token: str | None = None) -> tuple[str, str]:
    """The task's answer as evaluation gives it (`peftu.inference.predict`), and which adapter gave it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if spec.kind == "generation":
        sampling = answer_sampling(spec)
        r = requests.post(f"{url}/v1/completions", timeout=60, headers=headers, json={
            "model": model, "prompt": spec.render(text), "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "stop": sampling.stop})
        r.raise_for_status()
        answer = r.json()["choices"][0]["text"].strip()
    else:
        r = requests.post(f"{url}/v1/score", json={"model": model, "input": text}, headers=headers, timeout=60)
        r.raise_for_status()
        answer = r.json()["label"]
    return answer, r.headers["x-peftu-adapter"]
