"""The platform's Celery app, made from a `Settings` (as Flask's Celery example makes it from the app's config).

`create_app(settings)` is what the API (to send tasks by name), the monitor and Flower use: it runs no
task and loads no torch. The coordinator's worker adds its tasks to one (tasks/coordinator.py); peers run
another app (tasks/peer.py) that holds only a peer's own broker login.

For Celery's command line, `app` is made from the environment on first use (`celery -A tasks.celery flower`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

import celeryconfig
from settings import Settings


def create_app(settings: Settings) -> Celery:
    """The platform's app as `settings` configure it."""
    app = Celery("peertrain")
    app.conf.update(celeryconfig.platform(settings))
    return app


def command_line_app(factory: Callable[[Settings], Celery]) -> Callable[[str], Any]:
    """A module `__getattr__` giving Celery's command line (`celery -A module ...`) the module's `app`, made by
    `factory` from the environment the first time it is asked for: importing the module reads nothing."""
    made: list[Celery] = []

    def module_getattr(name: str) -> Any:
        if name != "app":
            raise AttributeError(name)
        if not made:
            made.append(factory(Settings.from_env()))
        return made[0]

    return module_getattr


__getattr__ = command_line_app(create_app)
