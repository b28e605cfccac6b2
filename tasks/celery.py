"""The platform's Celery app, made from a `Settings` (as Flask's Celery example makes it from the app's config).

`create_app(settings)` is what the API (to send tasks by name), the monitor and Flower use: it runs no
task and loads no torch. The coordinator's worker adds its tasks to one (tasks/coordinator.py); peers run
another app (tasks/peer.py) that holds only a peer's own broker login.

For Celery's command line, `app` is made from the environment on first use (`celery -A tasks.celery flower`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger

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


# Celery logs each task received and each task's whole return value (a training's every epoch) at INFO: on a
# console, that buries the platform's own line per session event. They show with LOG_LEVEL=DEBUG.
CHATTY = ("celery.app.trace", "celery.worker.strategy")


def quiet_task_logs(level: str | int) -> None:
    """Celery's per-task lines at WARNING, unless `level` (a name or a number) is DEBUG."""
    name = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
    for logger in CHATTY:
        logging.getLogger(logger).setLevel(logging.NOTSET if name == "DEBUG" else logging.WARNING)


@after_setup_logger.connect(weak=False, dispatch_uid="peertrain.quiet_task_logs")
def _quiet_workers(loglevel: Any = None, **_: Any) -> None:
    # `celery worker` processes (peers, the coordinator) set their logging up themselves.
    quiet_task_logs(loglevel if loglevel is not None else logging.INFO)


__getattr__ = command_line_app(create_app)
