"""Benchmark: serving requests/s and latency, base alone vs batches split per user vs mixed batches.

    python -m jobs.bench_serve [--users 1000] [--clients 32] [--requests 2000] \\
        [--max-tokens 8] [--plot docs/benchmarks_serve.png] [--json]

The same options as `peftu bench serve` (see `peftu bench serve --help`); what
each phase does and the numbers are in docs/benchmarks.md.
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["bench", "serve", *sys.argv[1:]])
