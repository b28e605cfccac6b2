"""The peer's Celery app: what runs on a machine the platform does not own.

    celery -A tasks.peer worker -Q peer.<name> -n peer.<name>@%h -c 1 --without-gossip --without-mingle

A peer holds one credential, its own broker login (`python -m tasks.registry add NAME` issues it), and
the grants inside its current task. So, unlike the platform's own app (tasks/celery.py), it:
- reports each task's outcome by publishing it to the results exchange (`ResultReporter`), not by
  writing a result backend: it has no Redis credentials, and the coordinator joins the chord;
- stamps every event and result with `user_id` = its broker user, which RabbitMQ verifies
  (`StampedDispatcher`), so the monitor and the coordinator know who sent it;
- declares nothing at all: its queues, and the exchanges its events and results go to, are the
  platform's (its login has no configure right);
- takes no remote-control commands (`worker_enable_remote_control = False`): broadcasting would need
  the right to declare the shared control exchange, which would also let a peer delete it;
- reads stop notices for its sessions from its own queue (`protocol.StopNotices`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.app.events import Events
from celery.backends.base import BaseBackend
from celery.events.dispatcher import EventDispatcher

import celeryconfig
from settings import Settings
from tasks import protocol
from tasks.celery import command_line_app

log = logging.getLogger(__name__)

# A broker outage of up to a minute must not lose a result: keep trying to publish it that long.
PUBLISH_RETRY = {"max_retries": 40, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}


class StampedDispatcher(EventDispatcher):
    """Celery's event dispatcher, with every event stamped `user_id` and no exchange declared."""

    def _publish(self, event, producer, routing_key, retry=False, retry_policy=None, **_):
        # Celery's own _publish, less `declare` (a peer may not declare the shared exchange) and with
        # the verified user_id. Kept in step with celery.events.dispatcher.EventDispatcher._publish.
        if producer is None:
            return
        try:
            producer.publish(
                event, routing_key=routing_key, exchange=self.exchange.name, retry=retry,
                retry_policy=retry_policy, declare=[], serializer=self.serializer, headers=self.headers,
                delivery_mode=self.delivery_mode, user_id=protocol.identity(self.app),
            )
        except Exception:
            if not self.buffer_while_offline:
                raise
            self._outbound_buffer.append((event, routing_key))


class StampedEvents(Events):
    dispatcher_cls = "tasks.peer:StampedDispatcher"


class ResultReporter(BaseBackend):
    """A result "backend" that sends each task's outcome to the coordinator instead of storing it."""

    def __init__(self, app: Celery, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.exchange = protocol.results_exchange(app.conf.peertrain_results)

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        payload = protocol.result_message(task_id, state, result, traceback)
        with self.app.producer_or_acquire() as producer:
            producer.publish(payload, exchange=self.exchange, routing_key=protocol.ROUTING_KEY, declare=[],
                             serializer="json", user_id=protocol.identity(self.app), delivery_mode=2, retry=True,
                             retry_policy=PUBLISH_RETRY)
        return result

    def on_chord_part_return(self, request, state, result, **kwargs):
        """The coordinator joins chords (tasks/collector.py): a peer never sees the group's state."""

    def _get_task_meta_for(self, task_id):
        raise NotImplementedError("a peer cannot read results")

    def as_uri(self, include_password: bool = False) -> str:
        return f"results-exchange://{self.exchange.name}"


class RedeliveredAfterReconnect(logging.Filter):
    """Celery logs a task that finished after its broker connection was lost as critical, with a traceback:
    it cannot acknowledge the message on the dead channel. That is expected after an outage (the broker
    hands the message out again, and the peer answers it from memory: tasks/training.py), so say so."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Couldn't ack %r, reason:%r":
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
            record.msg += " (the broker connection was lost meanwhile: it will hand the task out again)"
        return True


_REDELIVERED = RedeliveredAfterReconnect()


def create_app(broker_url: str | None = None, settings: Settings | None = None,
               event_exchange: str | None = None) -> Celery:
    """A peer's app; `broker_url` (default BROKER_URL) carries the peer's own credentials, `event_exchange`
    (default EVENT_EXCHANGE) names the exchange its registration gave it for its events."""
    settings = settings or Settings.from_env()
    app = Celery("peertrain-peer", events=StampedEvents, backend=ResultReporter)
    app.conf.update(celeryconfig.peer(settings))
    logging.getLogger("celery.worker.request").addFilter(_REDELIVERED)
    app.conf.broker_url = broker_url or settings.broker_url
    app.conf.event_exchange = event_exchange or settings.event_exchange
    name = protocol.peer_of(protocol.identity(app))
    if name is not None:
        # Its queue as the platform declared it (`-Q peer.<name>` picks it): consumed, never declared.
        app.conf.task_queues = [protocol.tasks_queue(name)]
    from tasks import training  # torch loads with the task, on peers only

    training.register(app, settings)
    return app


# `celery -A tasks.peer worker ...` on a peer machine.
__getattr__ = command_line_app(lambda settings: create_app(settings=settings))
