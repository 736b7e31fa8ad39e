"""Serving speed: the base alone vs batches split per user vs our mixed batches.

One run, one machine: random adapters for `users` users go into a local store
through the real publish path; the app runs on a local Ray and a closed loop of
`clients` concurrent HTTP clients sends `requests` completions per phase:

- (a) base: every request for the base model (no adapter at all);
- (b) split: requests for users' adapters, batches hold one user each (what
  `@serve.batch` does: it splits batches by multiplexed model id);
- (c) mixed: the same, with batches that mix users (our batcher).

(b) and (c) each run on a freshly deployed app (a cold cache), first with
uniform user popularity, then Zipf. Cold loads and the hit rate come from the
response headers (`x-peftu-cache`, `x-peftu-load-ms`).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from rich.table import Table

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.data.synthetic import generate
from peftu.serving.local import local_app
from peftu.store import AdapterStore

TASK = "synth-gen"
"""Headlines of ~10 tokens: answers long enough that decoding, not HTTP, dominates."""


@dataclass
class Phase:
    """One closed-loop run against the app."""

    name: str
    batching: str
    popularity: str
    requests: int
    seconds: float
    tokens: int
    latencies_ms: list[float] = field(repr=False)
    load_ms: list[float] = field(repr=False)
    hits: int
    adapter_requests: int
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def latency(self, q: float) -> float:
        return _quantile(self.latencies_ms, q)

    def cold_load(self, q: float) -> float:
        return _quantile(self.load_ms, q)

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

    def summary(self) -> dict:
        """The JSON line: ratios under uniform popularity, as the targets are set."""
        base, split, mixed = (self.phases[k] for k in ("base", "split uniform", "mixed uniform"))
        return {"users": self.users, "base_rps": round(base.rps, 2), "split_rps": round(split.rps, 2),
                "mixed_rps": round(mixed.rps, 2), "mixed_vs_base": round(mixed.rps / base.rps, 3),
                "mixed_vs_split": round(mixed.rps / split.rps, 3), "p50_ms": round(mixed.latency(0.5), 1),
                "p99_ms": round(mixed.latency(0.99), 1), "cold_load_p99_ms": round(mixed.cold_load(0.99), 1),
                "hit_rate": round(mixed.hit_rate, 3)}


def _user_sampler(users: list[str], popularity: str, rng: random.Random, zipf_s: float):
    if popularity == "uniform":
        return lambda: rng.choice(users)
    ranked = users[:]
    rng.shuffle(ranked)
    weights = [1.0 / (k + 1) ** zipf_s for k in range(len(ranked))]
    return lambda: rng.choices(ranked, weights)[0]


async def _closed_loop(url: str, model_name: str, pick_user, prompts: list[str], n: int, clients: int,
                       max_tokens: int) -> tuple[float, list[dict]]:
    """`clients` workers each send one request at a time until `n` are done."""
    import aiohttp

    records: list[dict] = []
    left = n

    async def worker(session: aiohttp.ClientSession, rng: random.Random) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            user = pick_user()
            body = {"model": f"{model_name}:{user}" if user else model_name, "prompt": rng.choice(prompts),
                    "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as r:
                answer = await r.json()
                records.append({"ms": (time.perf_counter() - start) * 1000, "status": r.status,
                                "user": user, "cache": r.headers.get("x-peftu-cache"),
                                "load_ms": float(r.headers.get("x-peftu-load-ms", "nan")),
                                "tokens": answer.get("usage", {}).get("completion_tokens", 0)})

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session, random.Random(i)) for i in range(clients)))
        return time.perf_counter() - start, records


def _phase(name: str, batching: str, popularity: str, seconds: float, records: list[dict]) -> Phase:
    ok = [r for r in records if r["status"] == 200]
    adapter = [r for r in ok if r["user"] is not None]
    return Phase(name, batching, popularity, len(ok), seconds, sum(r["tokens"] for r in ok),
                 [r["ms"] for r in ok], [r["load_ms"] for r in ok if r["cache"] == "load"],
                 sum(r["cache"] == "hit" for r in adapter), len(adapter), len(records) - len(ok))


def bench_serve(base: str, *, users: int = 1000, clients: int = 32, requests: int = 2000, max_tokens: int = 16,
                cache_size: int = 0, zipf_s: float = 1.1, seed: int = 0, port: int = 0, log=print) -> ServeBench:
    """Run the three modes (see the module docs) and return their phases."""
    import ray
    import requests as http

    rng = random.Random(seed)
    ids = [f"user{i:05d}" for i in range(users)]
    spec, gen_users, _ = generate(TASK, 50, seed=seed)
    prompts = [spec.render(e.input) for u in gen_users for e in u.test]
    cache_size = cache_size or users
    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory(prefix="peftu-bench-serve-") as store_dir:
        start = time.monotonic()
        publish_random_adapters(AdapterStore.open(store_dir), TASK, ids, base, seed=seed, progress=True)
        log(f"published {users} random adapters in {time.monotonic() - start:.0f} s")
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        for batching in ("mixed", "split"):
            config = {"base": base, "store": store_dir, "task": TASK, "batching": batching,
                      "max_adapters": cache_size, "max_rank": 8, "max_tokens_limit": max(16, max_tokens)}
            with local_app(config, port) as url:
                model_name = http.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
                runs = [("base", "uniform", lambda: None)] if batching == "mixed" else []
                runs += [(f"{batching} {pop}", pop, _user_sampler(ids, pop, rng, zipf_s))
                         for pop in ("uniform", "zipf")]
                for name, pop, pick in runs:
                    seconds, records = asyncio.run(_closed_loop(url, model_name, pick, prompts, requests,
                                                                clients, max_tokens))
                    phases[name] = _phase(name, batching, pop, seconds, records)
                    log(f"{name}: {phases[name].rps:.1f} requests/s, p50 {phases[name].latency(0.5):.0f} ms")
    order = ["base", "split uniform", "mixed uniform", "split zipf", "mixed zipf"]
    return ServeBench(users, clients, max_tokens, cache_size, {k: phases[k] for k in order})


def render_serve_table(result: ServeBench) -> Table:
    base = result.phases["base"].rps
    table = Table(title=f"Serving: {result.users} users, {result.clients} clients, "
                  f"{result.max_tokens} tokens per answer, cache {result.cache_size} adapters")
    for col in ("phase", "requests/s", "vs base", "tokens/s", "p50 ms", "p99 ms", "cold load p50 ms",
                "cold load p99 ms", "hit rate", "errors"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for p in result.phases.values():
        table.add_row(p.name, f"{p.rps:.1f}", f"{p.rps / base:.2f}x", f"{p.tokens_per_s:.0f}",
                      f"{p.latency(0.5):.0f}", f"{p.latency(0.99):.0f}", f"{p.cold_load(0.5):.1f}",
                      f"{p.cold_load(0.99):.1f}", "-" if p.name == "base" else f"{p.hit_rate:.2f}",
                      str(p.errors))
    return table


def plot_serve(result: ServeBench, path: str) -> None:
    """Requests/s and latency of every phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(result.phases.values())
    names = [p.name for p in phases]
    colors = ["tab:gray" if p.name == "base" else "tab:orange" if p.batching == "split" else "tab:blue"
              for p in phases]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    rates = [p.rps for p in phases]
    left.bar(names, rates, color=colors)
    for i, rate in enumerate(rates):
        left.annotate(f"{rate:.1f}", (i, rate), ha="center", va="bottom")
    left.axhline(0.7 * rates[0], color="tab:gray", linestyle="--", linewidth=0.8, label="0.7x base (target)")
    left.set_ylabel("requests / s")
    left.set_title(f"{result.users} users, {result.clients} clients")
    left.legend()
    x = range(len(phases))
    right.bar([i - 0.2 for i in x], [p.latency(0.5) for p in phases], width=0.4, label="p50", color="tab:cyan")
    right.bar([i + 0.2 for i in x], [p.latency(0.99) for p in phases], width=0.4, label="p99", color="tab:purple")
    right.set_xticks(list(x), names)
    right.set_ylabel("latency, ms")
    right.set_title("latency per request")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
