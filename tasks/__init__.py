"""Celery side of peertrain: the apps, the peer's `train` task, the coordinator, the monitor, storage.

Importing this package loads nothing: task modules (and torch) are imported by the processes that run
them. `celery -A tasks worker -Q coordinator` runs the coordinator (its app, `tasks.app`, is made from
the environment when the command line asks for it: tasks/coordinator.py).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from tasks import coordinator

        return coordinator.app
    raise AttributeError(name)
