"""The Ray Serve application: `serve run serve.app:app`, or `serve/config.yaml`.

An application builder: Serve calls `app(args)` with the config's `args`
(fields of `peftu.config.ServeConfig`); all logic is in `peftu.serving`.
"""

from peftu.serving.server import build_app as app

__all__ = ["app"]
