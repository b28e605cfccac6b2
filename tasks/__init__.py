"""Celery side of peertrain: the app, the peer's `train` task, the coordinator, the monitor, storage.

Importing this package loads only the Celery app: task modules (and torch) are imported by workers
through the app's `include`, never by the API.
"""

from tasks.celery import app

__all__ = ["app"]
