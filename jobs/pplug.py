"""Ray job: fit the PPlug of a task once on all its training users, with Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.pplug --data DATA --store STORE [--workers 2] [--epochs 1 ...]

The same options as `peftu pplug fit` (see `peftu pplug fit --help`).
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["pplug", "fit", *sys.argv[1:]])
