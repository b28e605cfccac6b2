"""The platform's Celery app: the API (to send tasks by name), the coordinator, the monitor, Flower.

Peers run another app (tasks/peer.py) that holds only a peer's own broker login.
"""

from __future__ import annotations

from celery import Celery

app = Celery("peertrain")
app.config_from_object("celeryconfig")
# The coordinator's worker also reads the peers' results queue (a string: the API never imports it).
app.steps["consumer"].add("tasks.collector:ResultCollector")
