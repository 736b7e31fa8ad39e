"""The app on this machine's Ray, for the demo, the benchmark and quick looks.

`local_app(config)` starts Serve on a loopback port, deploys `PeftuServer` with
`config` (ServeConfig fields), yields its URL and shuts Serve down again
(`local_apps`: several such apps side by side, each at its own path); a
local Ray is started with `address="local"` (never attaching to another
cluster) unless one is already initialised.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

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
    with local_apps({"peftu": config}, port, env) as urls:
        yield urls["peftu"]


@contextmanager
def local_apps(configs: dict[str, dict], port: int = 0, env: dict[str, str] | None = None,
               cpus: float = 1.0) -> Iterator[dict[str, str]]:
    """Several apps side by side, each at http://127.0.0.1:<port>/<name> (one alone: at the root), each replica
    taking `cpus` of Ray's CPUs (the benchmark runs its apps together so that they meet the same machine)."""
    import ray
    from ray import serve

    from peftu.serving.server import PeftuServer

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = port or free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"num_cpus": cpus} | ({"runtime_env": {"env_vars": env}} if env else {})
        app = PeftuServer.options(ray_actor_options=options)
        urls = {}
        for name, config in configs.items():
            prefix = "/" if len(configs) == 1 else f"/{name}"
            serve.run(app.bind(config), name=name, route_prefix=prefix)
            urls[name] = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
        yield urls
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
    the users' come back. Every request goes through the official `openai` SDK,
    as a client of the app would send it. User tokens are on, as in production:
    each user's client carries a token minted for them under this run's own
    secret as its API key.
    """
    best: tuple[str, str, dict[str, tuple[str, str]], int] | None = None
    secret = secrets.token_hex(32)
    with local_app({"base": base, "store": store, "task": spec.name, "user_tokens": True},
                   env={"PEFTU_TOKEN_SECRET": secret}) as url:
        anonymous = _client(url)
        model = anonymous.models.list().data[0].id
        clients = {user: _client(url, make_token(secret, user, model, ttl_s=3600)) for user in users}
        for text in texts:
            asked = {user: _ask(clients[user], f"{model}:{user}", spec, text) for user in users}
            distinct: dict[str, tuple[str, str]] = {}
            for user, (answer, version) in asked.items():
                if answer not in {a for a, _ in distinct.values()}:
                    distinct[user] = (answer, version)
            if best is None or len(distinct) > best[3]:
                best = (text, _ask(anonymous, model, spec, text)[0], distinct | asked, len(distinct))
            if len(distinct) >= show:
                break
    text, base_answer, answers, n_distinct = best
    chosen = list(answers)[:show]
    log(f"input: {text!r} ({n_distinct} different answers among {len(users)} users)\n"
        f"  base model: {base_answer!r}")
    for user in chosen:
        answer, version = answers[user]
        log(f"  user {user} ({version}): {answer!r}")
    return {user: answers[user][0] for user in chosen}


def _client(url: str, token: str | None = None):
    """The official SDK's client of the app; a user's token is their API key."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=token or "no-token", max_retries=0, timeout=60)


def _ask(client, model: str, spec: TaskSpec, text: str) -> tuple[str, str]:
    """The task's answer as evaluation gives it (`peftu.inference.predict`), and what gave it.

    A generation task's is a greedy completion; a classification or rating task's the label that
    `/v1/score` finds likeliest (not an OpenAI endpoint: the SDK's own `post` sends it).
    """
    import httpx2  # the SDK's own HTTP library: cast_to a response keeps the headers

    if spec.kind == "generation":
        sampling = answer_sampling(spec)
        raw = client.completions.with_raw_response.create(
            model=model, prompt=spec.render(text), max_tokens=sampling.max_tokens,
            temperature=sampling.temperature, stop=sampling.stop)
        return raw.parse().choices[0].text.strip(), _answered_by(raw.headers)
    r = client.post("/score", cast_to=httpx2.Response, body={"model": model, "input": text})
    return r.json()["label"], _answered_by(r.headers)


def _answered_by(headers) -> str:
    """What answered, from the headers: the user's selected method, and their adapter's version if it ran."""
    method, adapter = headers.get("x-peftu-method", "adapter"), headers["x-peftu-adapter"]
    return method if adapter == "none" else f"{method}, adapter {adapter}"
