"""``dmdd serve``: the inspection web app and HTTP API (needs the ``serve`` extra: ``pip install dmdd[serve]``)."""

from dmdd.deploy.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
