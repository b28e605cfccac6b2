"""The platform's Celery app, made from a `Settings` (as Flask's Celery example makes it from the app's config).

`create_app(settings)` is what the API (to send tasks by name), the monitor and Flower use: it runs no
task and loads no torch. The coordinator's worker adds its tasks to one (tasks/coordinator.py); peers run
another app (tasks/peer.py) that holds only a peer's own broker login.

For Celery's command line, `app` is made from the environment on first use (`celery -A tasks.celery flower`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

import celeryconfig
from settings import Settings


def create_app(settings: Settings) -> Celery:
    """The platform's app as `settings` configure it."""
    app = Celery("peertrain")
    app.conf.update(celeryconfig.platform(settings))
    return app


_cli_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A tasks.celery ...`: the command line's app, made when it asks for it (importing reads nothing).
    global _cli_app
    if name != "app":
        raise AttributeError(name)
    if _cli_app is None:
        _cli_app = create_app(Settings.from_env())
    return _cli_app
