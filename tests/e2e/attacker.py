"""A hostile peer's toolbox: raw AMQP with exactly what one registered peer holds (its enrolment)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from amqp.exceptions import AccessRefused, PreconditionFailed
from kombu import Connection, Exchange, Queue

REFUSED = (AccessRefused, PreconditionFailed)


class Attacker:
    """Publishes and consumes over its own broker login, with publisher confirms so refusals surface at once."""

    def __init__(self, environment: dict[str, str]) -> None:
        self.environment = environment
        self.url = environment["BROKER_URL"]
        self.user = Connection(self.url).userid
        self.events = environment["EVENT_EXCHANGE"]  # its own event exchange, the only one it may publish events to

    def _connection(self) -> Connection:
        return Connection(self.url, transport_options={"confirm_publish": True}, connect_timeout=10)

    def publish(self, exchange: str, routing_key: str, body: Any, user_id: str | None = None,
                headers: dict[str, Any] | None = None) -> None:
        """Publish `body` as JSON; raises AccessRefused / PreconditionFailed when the broker refuses."""
        with self._connection() as connection:
            producer = connection.Producer()
            producer.publish(body, exchange=exchange, routing_key=routing_key, serializer="json", declare=[],
                             user_id=self.user if user_id is None else user_id, headers=headers or {})

    def event(self, exchange: str, kind: str, user_id: str | None = None, **fields: Any) -> None:
        """A Celery event, as a worker would publish it."""
        body = {"type": kind, "timestamp": time.time(), "utcoffset": 0, "pid": 1, "clock": 1, **fields}
        self.publish(exchange, kind.replace("-", "."), body, user_id=user_id,
                     headers={"hostname": fields.get("hostname", "x")})

    def task(self, exchange: str, routing_key: str, name: str, args: list[Any]) -> None:
        """A hand-made Celery task message (protocol 2)."""
        task_id = str(uuid.uuid4())
        headers = {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "parent_id": None,
                   "group": None, "argsrepr": json.dumps(args)[:100], "kwargsrepr": "{}", "origin": "attacker",
                   "retries": 0, "eta": None, "expires": None, "timelimit": [None, None]}
        body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        self.publish(exchange, routing_key, body, headers=headers)

    def flood(self, exchange: str, seconds: float, **fields: Any) -> int:
        """Publish `task-heartbeat` events in its own name as fast as one connection goes, for `seconds`;
        returns how many it sent."""
        sent, until = 0, time.monotonic() + seconds
        with Connection(self.url, connect_timeout=10) as connection:
            producer = connection.Producer()
            while time.monotonic() < until:
                for _ in range(200):
                    body = {"type": "task-heartbeat", "timestamp": time.time(), "clock": sent, **fields,
                            "epoch": 1 + sent % 50}
                    producer.publish(body, exchange=exchange, routing_key="task.heartbeat", serializer="json",
                                     declare=[], user_id=self.user)
                    sent += 1
        return sent

    def consume(self, queue: str) -> None:
        """Try to read a queue (raises when refused)."""
        with self._connection() as connection:
            connection.default_channel.basic_get(queue)

    def declare_queue(self, name: str, **arguments: Any) -> None:
        with self._connection() as connection:
            Queue(name, Exchange(name, "direct"), routing_key=name, queue_arguments=arguments)(
                connection.default_channel).declare(nowait=False)

    def declare_exchange(self, name: str, kind: str = "topic") -> None:
        with self._connection() as connection:
            Exchange(name, kind, durable=True)(connection.default_channel).declare()

    def delete_exchange(self, name: str) -> None:
        with self._connection() as connection:
            connection.default_channel.exchange_delete(name)


def flood_apart(environment: dict[str, str], exchange: str, seconds: float, **fields: Any) -> int:
    """`Attacker.flood` from a process of its own, as from the attacker's own machine (a thread of the test's
    process would take the platform's interpreter lock, which no real attacker shares); returns how many
    it sent."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_flood, (environment, exchange, seconds, fields))


def _flood(environment: dict[str, str], exchange: str, seconds: float, fields: dict[str, Any]) -> int:
    return Attacker(environment).flood(exchange, seconds, **fields)

