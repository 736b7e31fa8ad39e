"""Ray job: personalization methods side by side on one task (`peftu bench quality`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.evaluate --task tweeteval [--methods base,majority,oppu] [--users 20] [--json]

The same options as `peftu bench quality` (see `peftu bench quality --help`).
"""

import sys

from peftu.cli import main

if __name__ == "__main__":
    main(["bench", "quality", *sys.argv[1:]])
