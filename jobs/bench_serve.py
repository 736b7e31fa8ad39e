"""Benchmark: serving throughput and latency, continuous vs static scheduling, base vs users' adapters.

    python -m jobs.bench_serve [--users 1000] [--clients 32] [--requests 200] [--rates 0.5,1,1.5] \\
        [--max-tokens 64] [--no-split] [--plot docs/benchmarks_serve.png] [--json]

The same options as `peftu bench serve` (see `peftu bench serve --help`); what
each phase does and the numbers are in docs/benchmarks.md.
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["bench", "serve", *sys.argv[1:]])
