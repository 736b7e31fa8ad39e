"""Ray job: search LoRA rank, learning rate, alpha and epochs for a data set's task.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.tune --data DATA --store STORE [--trials 16] [--users 8] [--by-activity] [--json]

The same options as `peftu tune` (see `peftu tune --help`). The best config
lands in the store; `python -m jobs.fit --config best ...` applies it.
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
