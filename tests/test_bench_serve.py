"""`peftu bench serve` in its small mode: every app and load shape runs, and the JSON line has its keys."""

from __future__ import annotations

import math


def test_the_serve_benchmark_runs_every_phase_and_reports_its_keys(tiny_base, local_ray):
    from peftu.bench.serve import bench_serve, render_serve_markdown

    result = bench_serve(tiny_base, users=3, clients=2, requests=6, open_requests=4, rates=(1.0,), max_tokens=4,
                         split=False, warmup=2, log=lambda *_: None)
    names = [f"{app} {pop} closed" for app in ("continuous", "static") for pop in ("uniform", "zipf", "base")]
    assert set(names) <= set(result.phases) and len(result.phases) == len(names) + 2  # one open-loop rate each
    for p in result.phases.values():
        assert p.errors == 0 and p.requests == (6 if p.load == "closed" else 4), p.name
        assert p.tokens == p.asked > 0, p.name  # EOS is biased away: each request writes its whole budget
        assert len(p.ttft_ms) == p.requests
    summary = result.summary()
    keys = ["users", "base_rps", "mixed_rps", "mixed_vs_base", "p50_ms", "p99_ms", "cold_load_p99_ms", "hit_rate",
            "continuous_vs_static", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "static_ttft_p99_ms"]
    assert all(math.isfinite(summary[k]) for k in keys if k not in ("cold_load_p99_ms",))
    assert {"cold_load_steady_p50_ms", "cold_load_steady_p99_ms"} <= set(summary)  # NaN where every load came first
    assert result.get("continuous", "uniform").load_ms  # three users met for the first time: cold loads
    assert render_serve_markdown(result).count("\n") == len(result.phases) + 1
