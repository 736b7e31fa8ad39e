"""Where peftu keeps what it builds: models and caches, never in the repo."""

from __future__ import annotations

import os
from pathlib import Path


def peftu_home() -> Path:
    """`$PEFTU_HOME`, else `~/.cache/peftu`."""
    return Path(os.environ.get("PEFTU_HOME") or Path.home() / ".cache" / "peftu")
