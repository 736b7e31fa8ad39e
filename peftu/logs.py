"""The one logging set-up: the `peftu` command, `jobs/` and Ray tasks that log on their own."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Time, logger, message; a no-op where logging is already set up (as `basicConfig` is)."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2"):  # the openai SDK's HTTP library logs every request at info
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
