"""What the platform and its peers say to each other over the broker, besides Celery's own task messages.

A registered peer `alice` connects as broker user `peer.alice` and may touch only its own resources:
it consumes `peer.alice` (its tasks) and `peer.alice.stop` (stop notices), and publishes to exactly two
exchanges, the event exchange (heartbeats) and the results exchange (its tasks' outcomes), always with
the message property `user_id` set to its user, which RabbitMQ checks against the connection's login.
So whoever reads those messages knows for certain which peer sent them. Both sides import this module;
it imports only kombu and the standard library (peers hold no database code).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from typing import Any

from kombu import Connection, Exchange, Queue

log = logging.getLogger(__name__)

PEER_USER_PREFIX = "peer."
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Stop notices older than this are of no use to anyone: sessions have ended, or restarted peers never saw them.
STOP_NOTICE_TTL = 3600.0  # seconds
# A task's outcome as a peer reports it: metrics and per-epoch history, never weights.
MAX_RESULT_BYTES = 4 << 20
RESULT_STATES = ("SUCCESS", "FAILURE", "REVOKED", "RETRY", "STARTED")
ROUTING_KEY = "result"


def check_name(name: str) -> str:
    """`name` if it can name a peer (letters, digits, `_`, `-`: it becomes queue and user names), else ValueError."""
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"a peer name is 1-63 letters, digits, '_' or '-', starting with a letter or digit; "
                         f"got {name!r}")
    return name


def task_queue(name: str) -> str:
    """The queue a peer's worker consumes its tasks from."""
    return f"peer.{name}"


def stop_queue(name: str) -> Queue:
    """The queue of stop notices for peer `name`: declared alike by whoever touches it first."""
    queue_name = f"peer.{name}.stop"
    return Queue(queue_name, Exchange(queue_name, "direct", durable=True), routing_key=queue_name, durable=True,
                 message_ttl=STOP_NOTICE_TTL)


def broker_user(name: str) -> str:
    """The broker user a peer logs in as."""
    return f"{PEER_USER_PREFIX}{check_name(name)}"


def peer_of(user_id: str | None) -> str | None:
    """The peer a verified broker user is; None for anyone else (the platform's own processes)."""
    if not user_id or not user_id.startswith(PEER_USER_PREFIX):
        return None
    name = user_id[len(PEER_USER_PREFIX):]
    return name if NAME_PATTERN.match(name) else None


def results_exchange(name: str) -> Exchange:
    return Exchange(name, "direct", durable=True)


def results_queue(name: str) -> Queue:
    """The coordinator's queue of peers' results (the exchange and the queue share the setting's name)."""
    return Queue(name, results_exchange(name), routing_key=ROUTING_KEY, durable=True)


def permissions(name: str, event_exchange: str, results: str) -> dict[str, str]:
    """RabbitMQ's configure/write/read patterns for peer `name`: its own queues, and publishing to two exchanges.

    Configure (declare and delete) covers only the peer's own queues and their exchanges, so it can
    neither delete nor redeclare anything the platform shares; write covers the two exchanges it
    reports on; read only its own queues.
    """
    own = rf"peer\.{re.escape(check_name(name))}(\.stop)?"
    return {
        "configure": rf"^{own}$",
        "write": rf"^({own}|{re.escape(event_exchange)}|{re.escape(results)})$",
        "read": rf"^{own}$",
    }


def stop_notice(session_id: str, reason: str) -> dict[str, Any]:
    return {"session": session_id, "reason": reason[:500]}


def identity(app: Any) -> str | None:
    """The broker user a Celery app logs in as (for a peer's app, `peer.<name>`)."""
    return _login(app.conf.broker_url)


@lru_cache(maxsize=64)
def _login(url: str) -> str | None:
    # Stamped on every event and result a peer sends: parse the URL once.
    return Connection(url).userid


class StopNotices:
    """Which sessions this peer has been told to stop, read from its stop queue at most every `every` s."""

    def __init__(self, app: Any, name: str, every: float = 0.5, keep: int = 1000,
                 clock=time.monotonic) -> None:
        self.app, self.queue = app, stop_queue(name)
        self.every, self.keep, self.clock = every, keep, clock
        self.stopped: OrderedDict[str, str] = OrderedDict()
        self._next = 0.0
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def reason(self, session_id: str) -> str | None:
        """Why `session_id` was stopped, or None while it goes on."""
        with self._lock:
            if self.clock() >= self._next:
                self._next = self.clock() + self.every
                self._drain()
            return self.stopped.get(session_id)

    def _drain(self) -> None:
        try:
            if self._connection is None:
                self._connection = self.app.connection_for_read()
            with self._connection.SimpleQueue(self.queue) as notices:
                while True:
                    try:
                        message = notices.get_nowait()
                    except notices.Empty:
                        return
                    body = message.payload if isinstance(message.payload, dict) else {}
                    if isinstance(body.get("session"), str):
                        self.stopped[body["session"]] = str(body.get("reason") or "stopped")[:500]
                        while len(self.stopped) > self.keep:
                            self.stopped.popitem(last=False)
                    message.ack()
        except Exception as exc:  # the broker blinked: ask again next time rather than fail the training
            log.warning("could not read stop notices (%s); will try again", exc)
            if self._connection is not None:
                self._connection.release()
            self._connection = None
