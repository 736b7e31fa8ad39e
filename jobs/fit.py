"""Ray job: fit every user's adapter of a data set across the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.fit --data DATA --store STORE [--workers 2] [--pack-size 16] [--r 8 ...]

The same options as `peftu fit` (see `peftu fit --help`).
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["fit", *sys.argv[1:]])
