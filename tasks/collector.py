"""Peers' results in: read from the results queue, judged by the gate, decided once, passed on.

Peers publish each task's outcome to the results exchange, stamped with their broker user (which
RabbitMQ verifies). `ResultCollector`, a consumer step of the coordinator's worker (Celery's documented
extension point), reads them; `Collector.collect` asks the gate whether to believe each one
(tasks/gate.py: sender, assignment, size, fields), decides the task's outcome once (a conditional
update: a result delivered twice, or racing a "left out" verdict, is decided by whichever came first)
and passes it on (tasks/relay.py: into the round's chord, or to the coordinator's `update`). A failed
task is handed to `peer_lost` at once, so one failing peer does not wait for the slowest.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu import Consumer

import models
from models import assignment as assignments
from tasks import protocol, relay
from tasks.gate import Budget, Dropped, Outcome
from tasks.services import Services

log = logging.getLogger(__name__)


class Collector:
    """Applies reported results, each at most once."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.gate = services.gate

    def collect(self, user_id: str | None, size: int, payload: Any) -> bool:
        """Apply one reported outcome; False (and a counted, logged reason) when it changes nothing."""
        models.ensure_connected(self.services.settings.mongodb_uri)
        try:
            found = self.gate.report(user_id, size, payload)
        except Dropped as exc:
            self.gate.drop(exc.reason, exc.detail, "a result")
            return False
        if found is None:
            return False  # STARTED, RETRY: nothing to decide
        assignment, outcome = found
        now = self.services.clock.now()
        if assignments.claim(assignment["_id"], outcome.stored(), now):
            relay.hand_on(self.services.app, self.services.queue, assignment, outcome, now)
            return True
        assignment = assignments.get(assignment["_id"])
        if assignment.get("settled"):
            self.gate.drop("already reported", f"task {assignment['_id']} was decided before", "a result")
        else:  # decided by another consumer, passing it on now, or by one that died before it could
            relay.hand_on(self.services.app, self.services.queue, assignment, Outcome.of(assignment), now)
        return False


def step(services: Services) -> type[bootsteps.ConsumerStep]:
    """The consumer step that feeds `services`' collector from the results queue."""

    class ResultCollector(bootsteps.ConsumerStep):
        def __init__(self, c, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.collector = Collector(services)
            self.queue = protocol.results_queue(services.settings.results_queue)
            # A peer has one task out at a time: a few results a second is plenty, and the rest is a flood.
            self.budget = Budget(rate=20.0, burst=200.0)

        def get_consumers(self, channel) -> list[Consumer]:
            # on_message: the raw message, so its size is checked before its body is decoded.
            return [Consumer(channel, queues=[self.queue], on_message=self.on_message, accept=["json"],
                             prefetch_count=256)]

        def on_message(self, message) -> None:
            if not self.budget.allow(message.properties.get("user_id")):
                self.collector.gate.drop("over budget", f"results from {message.properties.get('user_id')!r}",
                                         "a result")
                message.ack()
                return
            size = len(message.body or b"")
            try:
                self.collector.collect(message.properties.get("user_id"), size,
                                       message.decode() if size <= protocol.MAX_RESULT_BYTES else None)
            except Exception:  # one bad result must not stop the coordinator from hearing the others
                log.exception("could not apply a reported result")
            message.ack()

    return ResultCollector
