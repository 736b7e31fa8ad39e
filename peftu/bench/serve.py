"""Serving speed: continuous vs static scheduling, the base alone vs users' adapters, closed and open loop.

One run, one machine: random adapters for `users` users per round go into a
local store through the real publish path; the apps run side by side on a local
Ray (each at its own path, freshly deployed, so their adapter caches start cold)
and clients stream completions over HTTP. The workload mixes lengths: each
request's max_tokens is drawn from 1..`max_tokens` and its prompt is one to four
of the task's inputs (so prompts of about 10 to 60 tokens); EOS is biased away,
so every request writes exactly its max_tokens.

- warm-up: `warmup` requests to each app's base alone, not measured (an app's
  first forwards and connections would otherwise fall into its first phase);
- closed loop, `clients` concurrent clients, `requests` requests per phase in
  `rounds` rounds: in each round every app in turn runs users' adapters with
  uniform popularity (first: it meets the round's own, cold users), then Zipf,
  then the base alone (no adapter). The apps take turns so that a ratio between
  them compares the same minutes of a machine whose speed drifts (on the 2-core
  machine here, by 10 to 20% from one run to the next);
- open loop, Poisson arrivals at each rate of the sweep (`rates` times the continuous
  app's closed-loop requests/s, so the sweep goes past saturation), users uniform,
  the apps in turn at each rate.

The apps: `scheduling: continuous` (the default), `scheduling: static` (one batch
at a time, users mixed), and with `split` also static with `batching: split` (one
user per batch, what `@serve.batch` does), closed loop uniform only. Time to first
token, inter-token latency (the gaps between streamed chunks) and end-to-end latency
are measured by the client; cold loads and the hit rate come from the response
headers (`x-peftu-cache`, `x-peftu-load-ms`), and the JSON line also gives the
cold loads of requests sent while steps run (`cold_load_steady_*`: without a
closed loop's opening burst of `clients` cold loads at once).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.table import Table

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.data.synthetic import generate
from peftu.serving.local import local_apps
from peftu.store import AdapterStore

TASK = "synth-gen"
"""Headlines of ~10 tokens, joined one to four per prompt for prompts of mixed length."""


@dataclass
class Phase:
    """One load shape against one app."""

    name: str
    scheduling: str
    popularity: str
    load: str
    """closed: `clients` at a time; open: Poisson arrivals at `rate`."""
    rate: float | None
    requests: int
    seconds: float
    tokens: int
    ttft_ms: list[float] = field(repr=False)
    itl_ms: list[float] = field(repr=False)
    e2e_ms: list[float] = field(repr=False)
    load_ms: list[float] = field(repr=False)
    steady_load_ms: list[float] = field(repr=False)
    """Cold loads of the requests sent once the first answer streamed (steps running): the loads under load,
    without the phase's opening burst, where up to `clients` cold loads start at once and queue behind each other."""
    hits: int
    adapter_requests: int
    errors: int
    asked: int = 0
    """Tokens the answered requests asked for (max_tokens): with EOS biased away, `tokens` should equal it."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def q(self, values: str, q: float) -> float:
        return _quantile(getattr(self, values), q)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.adapter_requests if self.adapter_requests else float("nan")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


@dataclass
class ServeBench:
    users: int
    clients: int
    max_tokens: int
    cache_size: int
    phases: dict[str, Phase]

    def get(self, scheduling: str, popularity: str, load: str = "closed") -> Phase | None:
        return self.phases.get(f"{scheduling} {popularity} {load}")

    def summary(self) -> dict:
        """The JSON line: closed loop, users' adapters under uniform popularity, as the targets are set."""
        base, mixed, static = self.get("continuous", "base"), self.get("continuous", "uniform"), \
            self.get("static", "uniform")
        split = self.get("split", "uniform")
        out = {"users": self.users, "base_rps": round(base.rps, 2), "mixed_rps": round(mixed.rps, 2),
               "mixed_vs_base": round(mixed.rps / base.rps, 3), "p50_ms": round(mixed.q("e2e_ms", 0.5), 1),
               "p99_ms": round(mixed.q("e2e_ms", 0.99), 1), "cold_load_p99_ms": round(mixed.q("load_ms", 0.99), 1),
               "hit_rate": round(mixed.hit_rate, 3)}
        if split is not None:
            out |= {"split_rps": round(split.rps, 2), "mixed_vs_split": round(mixed.rps / split.rps, 3)}
        return out | {
            "continuous_vs_static": round(mixed.tokens_per_s / static.tokens_per_s, 3),
            "users_vs_base_tokens": round(mixed.tokens_per_s / base.tokens_per_s, 3),
            "ttft_p50_ms": round(mixed.q("ttft_ms", 0.5), 1), "ttft_p99_ms": round(mixed.q("ttft_ms", 0.99), 1),
            "itl_p50_ms": round(mixed.q("itl_ms", 0.5), 1), "itl_p99_ms": round(mixed.q("itl_ms", 0.99), 1),
            "static_ttft_p99_ms": round(static.q("ttft_ms", 0.99), 1),
            "cold_load_p50_ms": round(mixed.q("load_ms", 0.5), 1),
            "cold_load_steady_p50_ms": round(mixed.q("steady_load_ms", 0.5), 1),
            "cold_load_steady_p99_ms": round(mixed.q("steady_load_ms", 0.99), 1)}


def _user_sampler(users: list[str], popularity: str, rng: random.Random, zipf_s: float):
    if popularity == "base":
        return lambda: None
    if popularity == "uniform":
        return lambda: rng.choice(users)
    ranked = users[:]
    rng.shuffle(ranked)
    weights = [1.0 / (k + 1) ** zipf_s for k in range(len(ranked))]
    return lambda: rng.choices(ranked, weights)[0]


@dataclass
class Workload:
    """What each request asks: its user, prompt and max_tokens, drawn per request."""

    model_name: str
    pick_user: Callable[[], str | None]
    prompts: list[str]
    max_tokens: int
    eos_id: int
    rng: random.Random

    def body(self) -> tuple[str | None, dict]:
        user = self.pick_user()
        prompt = " ".join(self.rng.choice(self.prompts) for _ in range(self.rng.randint(1, 4)))
        return user, {"model": f"{self.model_name}:{user}" if user else self.model_name, "prompt": prompt,
                      "max_tokens": self.rng.randint(1, self.max_tokens), "temperature": 0, "stream": True,
                      "stream_options": {"include_usage": True}, "logit_bias": {str(self.eos_id): -100}}


async def _one(session, url: str, work: Workload) -> dict:
    """Send one streamed completion; its timings as the client sees them."""
    user, body = work.body()
    start = time.perf_counter()
    chunks: list[float] = []
    first = None
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status == 200:
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    if data["choices"][0].get("text"):
                        chunks.append(now)
        else:
            await r.read()
        end = time.perf_counter()
        return {"status": r.status, "user": user, "asked": body["max_tokens"], "cache": r.headers.get("x-peftu-cache"),
                "load_ms": float(r.headers.get("x-peftu-load-ms", "nan")), "tokens": tokens, "start": start,
                "first": first, "end": end, "chunks": chunks}


async def _closed_loop(url: str, work: Workload, n: int, clients: int) -> tuple[float, list[dict]]:
    """`clients` workers each send one request at a time until `n` are done."""
    import aiohttp

    records: list[dict] = []
    left = n

    async def worker(session) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            records.append(await _one(session, url, work))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        return time.perf_counter() - start, records


async def _open_loop(url: str, work: Workload, n: int, rate: float, rng: random.Random) -> tuple[float, list[dict]]:
    """`n` requests sent at Poisson arrivals of `rate` per second, whatever the answers' pace."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        tasks, at = [], 0.0
        for _ in range(n):
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))  # the arrival process itself
            tasks.append(asyncio.create_task(_one(session, url, work)))
        records = await asyncio.gather(*tasks)
        return time.perf_counter() - start, list(records)


def _phase(name: str, scheduling: str, popularity: str, load: str, rate: float | None,
           segments: list[tuple[float, list[dict]]]) -> Phase:
    """One phase from its segments (seconds, records), the rounds it ran in; a cold load is steady if it
    started once its segment's first answer streamed."""
    ok, steady = [], []
    for _, records in segments:
        answered = [r for r in records if r["status"] == 200 and r["first"] is not None]
        running = min((r["first"] for r in answered), default=0.0)
        ok += answered
        steady += [r["load_ms"] for r in answered if r["cache"] == "load" and r["start"] > running]
    adapter = [r for r in ok if r["user"] is not None]
    sent = sum(len(records) for _, records in segments)
    return Phase(name, scheduling, popularity, load, rate, len(ok), sum(seconds for seconds, _ in segments),
                 sum(r["tokens"] for r in ok),
                 [(r["first"] - r["start"]) * 1000 for r in ok],
                 [(b - a) * 1000 for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])],
                 [(r["end"] - r["start"]) * 1000 for r in ok],
                 [r["load_ms"] for r in ok if r["cache"] == "load"], steady,
                 sum(r["cache"] == "hit" for r in adapter), len(adapter), sent - len(ok),
                 sum(r["asked"] for r in ok))


def bench_serve(base: str, *, users: int = 1000, clients: int = 32, requests: int = 400, open_requests: int = 100,
                rates: tuple[float, ...] = (0.5, 1.0, 1.5), max_tokens: int = 64, cache_size: int = 0,
                split: bool = True, zipf_s: float = 1.1, seed: int = 0, port: int = 0, warmup: int = 64,
                rounds: int = 2, log=print) -> ServeBench:
    """Run every app and load shape (see the module docs) and return their phases."""
    import ray
    import requests as http
    from transformers import AutoTokenizer

    ids = [[f"user{k:02d}-{i:05d}" for i in range(users)] for k in range(rounds)]
    spec, gen_users, _ = generate(TASK, 50, seed=seed)
    prompts = [e.input for u in gen_users for e in u.test]
    eos_id = AutoTokenizer.from_pretrained(base).eos_token_id
    cache_size = cache_size or users
    apps = {"continuous": {"scheduling": "continuous"}, "static": {"scheduling": "static", "batching": "mixed"}}
    if split:
        apps["split"] = {"scheduling": "static", "batching": "split"}
    segments: dict[tuple[str, str], list[tuple[float, list[dict]]]] = {}
    with tempfile.TemporaryDirectory(prefix="peftu-bench-serve-") as store_dir:
        start = time.monotonic()
        publish_random_adapters(AdapterStore.open(store_dir), TASK, [u for r in ids for u in r], base, seed=seed,
                                progress=True)
        log(f"published {users * rounds} random adapters in {time.monotonic() - start:.0f} s")
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        common = {"base": base, "store": store_dir, "task": TASK, "max_adapters": cache_size, "max_rank": 8,
                  "max_tokens_limit": max(16, max_tokens), "user_tokens": False}
        with local_apps({app: common | settings for app, settings in apps.items()}, port, cpus=1 / len(apps)) as urls:
            models = {app: http.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
                      for app, url in urls.items()}

            def work(app: str, users: list[str], pop: str, k: int) -> Workload:
                """Round `k`'s requests: every app gets the same users, prompts and lengths in the same order."""
                pick = _user_sampler(users, pop, random.Random(seed + k), zipf_s)
                return Workload(models[app], pick, prompts, max_tokens, eos_id, random.Random(seed + k))

            if warmup:  # each app's first forwards and connections, on the base: not in any phase
                for app, url in urls.items():
                    asyncio.run(_closed_loop(url, work(app, [], "base", -1), warmup, clients))
            # The apps take turns, round by round, so that both meet the machine as it is then; each
            # round's users are its own, so every round's first phase meets a cold cache.
            for k in range(rounds):
                for app, url in urls.items():
                    for pop in ["uniform"] if app == "split" else ["uniform", "zipf", "base"]:
                        w = work(app, ids[k], pop, k)
                        segments.setdefault((app, pop), []).append(
                            asyncio.run(_closed_loop(url, w, requests // rounds, clients)))
            phases: dict[str, Phase] = {}
            for (app, pop), done in segments.items():
                name = f"{app} {pop} closed"
                phases[name] = p = _phase(name, app, pop, "closed", None, done)
                log(f"{name}: {p.rps:.1f} requests/s, {p.tokens_per_s:.0f} tokens/s, "
                    f"TTFT p99 {p.q('ttft_ms', 0.99):.0f} ms, errors {p.errors}")
            capacity = phases["continuous uniform closed"].rps
            for i, rate in enumerate(round(capacity * m, 2) for m in rates):
                for app, url in urls.items():
                    if app == "split":
                        continue
                    w = work(app, ids[0], "uniform", rounds + i)  # requests of its own, users of round 0
                    done = asyncio.run(_open_loop(url, w, open_requests, rate, random.Random(seed)))
                    name = f"{app} uniform open {rate:g}/s"
                    phases[name] = p = _phase(name, app, "uniform", "open", rate, [done])
                    log(f"{name}: {p.rps:.1f} requests/s, TTFT p50 {p.q('ttft_ms', 0.5):.0f} ms, "
                        f"p99 {p.q('ttft_ms', 0.99):.0f} ms, errors {p.errors}")
    phases = {name: p for app in apps for name, p in phases.items() if p.scheduling == app}  # the table's order
    return ServeBench(users, clients, max_tokens, cache_size, phases)


COLUMNS = ("phase", "requests/s", "tokens/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "e2e p50", "e2e p99",
           "cold load p50", "cold load p99", "hit rate", "errors")


def serve_rows(result: ServeBench) -> list[list[str]]:
    """One row per phase, latencies in ms, in COLUMNS' order."""
    rows = []
    for p in result.phases.values():
        rows.append([p.name, f"{p.rps:.1f}", f"{p.tokens_per_s:.0f}"]
                    + [f"{p.q(k, q):.0f}" for k in ("ttft_ms", "itl_ms", "e2e_ms") for q in (0.5, 0.99)]
                    + [f"{p.q('load_ms', q):.1f}" for q in (0.5, 0.99)]
                    + ["-" if p.popularity == "base" else f"{p.hit_rate:.2f}", str(p.errors)])
    return rows


def render_serve_table(result: ServeBench) -> Table:
    table = Table(title=f"Serving: {result.users} users, {result.clients} closed-loop clients, max_tokens "
                  f"1..{result.max_tokens}, cache {result.cache_size} adapters (latencies in ms)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "phase" else "right")
    for row in serve_rows(result):
        table.add_row(*row)
    return table


def render_serve_markdown(result: ServeBench) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in serve_rows(result)])


def plot_serve(result: ServeBench, path: str) -> None:
    """Throughput and TTFT against the offered rate (open loop), and latency CDFs (closed loop, users uniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft, cdf) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"continuous": "tab:blue", "static": "tab:orange", "split": "tab:red"}
    for app in ("continuous", "static"):
        sweep = sorted((p for p in result.phases.values() if p.scheduling == app and p.load == "open"),
                       key=lambda p: p.rate)
        if not sweep:
            continue
        rates = [p.rate for p in sweep]
        tput.plot(rates, [p.tokens_per_s for p in sweep], "o-", color=colors[app], label=app)
        ttft.plot(rates, [p.q("ttft_ms", 0.99) for p in sweep], "o-", color=colors[app], label=f"{app} p99")
        ttft.plot(rates, [p.q("ttft_ms", 0.5) for p in sweep], "o--", color=colors[app], label=f"{app} p50")
    tput.set_xlabel("offered requests / s (Poisson)")
    tput.set_ylabel("output tokens / s")
    tput.set_title("throughput vs arrival rate")
    ttft.set_xlabel("offered requests / s (Poisson)")
    ttft.set_ylabel("time to first token, ms")
    ttft.set_yscale("log")
    ttft.set_title("TTFT vs arrival rate")
    for app in ("continuous", "static"):
        p = result.get(app, "uniform")
        if p is None:
            continue
        for key, style in (("ttft_ms", "-"), ("e2e_ms", ":")):
            values = sorted(getattr(p, key))
            cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], style, color=colors[app],
                     label=f"{app} {key.removesuffix('_ms').upper()}")
    cdf.set_xscale("log")
    cdf.set_xlabel("ms")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title(f"latency CDF, closed loop, {result.clients} clients")
    for ax in (tput, ttft, cdf):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
