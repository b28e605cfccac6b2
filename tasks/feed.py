"""Session events on the broker: every API process hears each event a process stores (models/event.py).

The events go to a fanout exchange on the Celery broker, `<EVENT_EXCHANGE>.sessions`, which each API
process binds a queue of its own to (webapp/stream.py). A fanout exchange on the configured broker
works the same on RabbitMQ (a deployment: API workers, coordinator and monitor in separate processes
or machines) and on kombu's in-memory transport (`make run`: one process), so one code path serves
both; Redis is not part of `make run`. Announcements are transient and best-effort: the log in the
database is the record, and a stream that misses one finds it there when the next one shows a gap.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange

from models import event as events

# Give up publishing quickly when the broker is down: the event is stored, the writer must go on.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def exchange(app: Celery) -> Exchange:
    """The fanout exchange session events are announced on."""
    return Exchange(f"{app.conf.event_exchange}.sessions", type="fanout", durable=False, auto_delete=False,
                    delivery_mode="transient")


def message(stored: list[dict[str, Any]]) -> dict[str, Any]:
    """The announcement of one session's newly stored events (as models.event.append returns them)."""
    return {"session": str(stored[0]["session_id"]),
            "events": [{key: doc[key] for key in ("seq", "kind", "key", "data")} for doc in stored]}


class Announcer:
    """Publishes stored events on the exchange through the Celery app's producer pool (thread-safe)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.exchange = exchange(app)

    def __call__(self, stored: list[dict[str, Any]]) -> None:
        with self.app.producer_or_acquire() as producer:
            producer.publish(message(stored), exchange=self.exchange, routing_key="", serializer="json",
                             declare=[self.exchange], retry=True, retry_policy=RETRY_POLICY)


def install(app: Celery) -> None:
    """Announce on `app`'s broker every event this process stores."""
    events.announce_with(Announcer(app))
