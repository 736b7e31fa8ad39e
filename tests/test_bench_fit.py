"""`python -m jobs.bench_fit` end to end on the tiny test base: its JSON line, never its speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ["users", "reference_users_per_hour", "banked_users_per_hour", "floor_users_per_hour",
        "speedup_vs_reference", "ratio_to_floor", "max_loss_diff"]


def test_bench_fit_reports_every_fit_and_the_banked_losses_match(tiny_base, tmp_path):
    plot = tmp_path / "fit.png"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.bench_fit", "--users", "4", "--epochs", "1", "--pack-size", "4",
         "--sweep", "2", "--base", tiny_base, "--threads", "1", "--plot", str(plot), "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary) == KEYS
    assert summary["users"] == 4
    for key in KEYS[1:-1]:
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert 0 <= summary["max_loss_diff"] < 1e-3
    assert "reference" in result.stderr and "banked" in result.stderr and "floor" in result.stderr
    assert plot.stat().st_size > 10_000
