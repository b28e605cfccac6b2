"""The Celery app shared by the API (to send tasks by name), the coordinator, the monitor and the peers."""

from __future__ import annotations

from celery import Celery

app = Celery("peertrain")
app.config_from_object("celeryconfig")
