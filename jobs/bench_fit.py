"""Benchmark: users per hour of the per-user PEFT loop, the banked fit, and one pooled adapter.

    python -m jobs.bench_fit [--users 64] [--epochs 2] [--pack-size 16] [--sweep 1,4,32] \\
        [--task synth-cls] [--threads N] [--plot docs/benchmarks_fit.png] [--json]

The same options as `peftu bench fit` (see `peftu bench fit --help`); the
numbers and what each fit does are in docs/benchmarks.md.
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["bench", "fit", *sys.argv[1:]])
