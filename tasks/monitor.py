"""The monitor: Celery events in, database state out.

Peers' `worker-online`/`worker-heartbeat` events mark them ONLINE, `worker-offline` or silence marks
them OFFLINE (failing the session they were training for), and every `task-heartbeat` a training
task sends is stored once and shown as the peer's latest progress. Heartbeats are buffered and
written in batches, so a burst costs one insert per batch rather than one per event.

Run it with `python -m tasks.monitor`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from celery import Celery
from celery.events.event import get_exchange
from kombu import Queue

import models
from models import heartbeat as heartbeats
from models import peer as peers
from models import session as sessions
from models import utcnow
from settings import Settings
from tasks import lifecycle

log = logging.getLogger(__name__)

PEER_PREFIX = "peer."
HEARTBEAT = "task-heartbeat"
PROGRESS = ("round", "epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec")


def peer_name(hostname: str | None) -> str | None:
    """`peer.<name>@host` → `<name>`; None for workers that are not peers (the coordinator, …)."""
    if not hostname or not hostname.startswith(PEER_PREFIX):
        return None
    return hostname[len(PEER_PREFIX):].split("@", 1)[0] or None


class Monitor:
    """Applies events to the database; thread-safe, so a consumer thread and a timer can share it."""

    def __init__(self, peer_timeout: float, start_timeout: float = 600.0, batch_size: int = 2000) -> None:
        self.peer_timeout = timedelta(seconds=peer_timeout)
        self.start_timeout = timedelta(seconds=start_timeout)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._beats: list[dict[str, Any]] = []
        self._latest: dict[tuple[ObjectId, str], dict[str, Any]] = {}
        self.stored = 0

    # --- events ------------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == HEARTBEAT:
            self._heartbeat(event)
        elif kind in ("worker-online", "worker-heartbeat"):
            name = peer_name(event.get("hostname"))
            if name:
                peers.seen(name, event["hostname"])
        elif kind == "worker-offline":
            name = peer_name(event.get("hostname"))
            if name:
                self._lost(name, "its worker shut down")

    def _heartbeat(self, event: dict[str, Any]) -> None:
        try:
            session_id = ObjectId(event["session"])
            beat = {
                "session_id": session_id,
                "peer": str(event["peer"]),
                "round": int(event.get("round") or 0),
                "epoch": int(event["epoch"]),
                "sent_at": datetime.fromtimestamp(event["timestamp"], UTC).replace(tzinfo=None)
                if "timestamp" in event else None,
                **{name: event.get(name) for name in heartbeats.METRICS},
            }
        except (KeyError, TypeError, ValueError, InvalidId):
            log.warning("ignoring a malformed heartbeat: %r", event)
            return
        with self._lock:
            self._beats.append(beat)
            key = (session_id, beat["peer"])
            latest = self._latest.get(key)
            if latest is None or (latest["round"], latest["epoch"]) <= (beat["round"], beat["epoch"]):
                self._latest[key] = beat
            full = len(self._beats) >= self.batch_size
        if full:
            self.flush()

    # --- writing -----------------------------------------------------------------------------

    def flush(self) -> int:
        """Write buffered heartbeats and each peer's newest progress; returns how many were new."""
        with self._lock:
            beats, self._beats = self._beats, []
            latest, self._latest = self._latest, {}
        if not beats:
            return 0
        new = heartbeats.insert_many(beats)
        now = utcnow()
        for (session_id, peer), beat in latest.items():
            progress = {name: beat.get(name) for name in PROGRESS}
            sessions.record_progress(session_id, peer, {**progress, "updated_at": now})
        self.stored += new
        return new

    def sweep(self) -> list[str]:
        """Mark peers silent for too long OFFLINE and fail sessions past their deadline; returns the peers."""
        now = utcnow()
        lost = [p.name for p in peers.silent_since(now - self.peer_timeout)]
        for name in lost:
            self._lost(name, f"no heartbeat for {self.peer_timeout.total_seconds():g} s")
        for session in sessions.overdue(now, self.start_timeout):
            why = ("it ran past its deadline" if session.status == sessions.RUNNING
                   else "no coordinator started it in time")
            lifecycle.end(session.id, sessions.FAILED, f"the session was stopped: {why}")
        return lost

    def _lost(self, name: str, why: str) -> None:
        before = peers.gone(name)
        if before is None:
            return
        log.info("peer %s is OFFLINE: %s", name, why)
        if before.status == peers.TRAINING and before.session_id is not None:
            lifecycle.end(before.session_id, sessions.FAILED, f"peer {name} went offline ({why})")


class EventConsumer:
    """Feeds a Monitor from a durable queue bound to Celery's event exchange.

    The queue outlives the monitor, so events sent while it is down or restarting are applied when
    it is back (capped in length and age so that an absent monitor cannot fill the broker).
    Messages are acknowledged only once their heartbeats are written.
    """

    def __init__(self, app: Celery, monitor: Monitor, queue: str, flush_every: float = 0.05,
                 sweep_every: float = 1.0, max_length: int = 1_000_000, message_ttl: float = 86400) -> None:
        self.app = app
        self.monitor = monitor
        self.queue_name = queue
        self.flush_every = flush_every
        self.sweep_every = sweep_every
        self.max_length = max_length
        self.message_ttl = message_ttl
        self.stopped = threading.Event()
        self.ready = threading.Event()

    def queue(self, connection) -> Queue:
        exchange = get_exchange(connection, name=self.app.conf.event_exchange)
        return Queue(self.queue_name, exchange=exchange, routing_key="#", durable=True, auto_delete=False,
                     max_length=self.max_length, message_ttl=self.message_ttl)

    def run(self) -> None:
        """Consume until `stop()`, reconnecting with a growing pause when the broker goes away."""
        pause = 0.5
        while not self.stopped.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    connection.ensure_connection(max_retries=1)
                    pause = 0.5
                    self._consume(connection)
            except Exception:
                if self.stopped.is_set():
                    break
                log.exception("event consumer lost its connection; retrying in %.1f s", pause)
                self.stopped.wait(pause)
                pause = min(pause * 2, 10.0)

    def stop(self) -> None:
        self.stopped.set()

    def _consume(self, connection) -> None:
        pending: list[Any] = []
        # Only AMQP acknowledges up to a delivery tag in one frame; virtual transports ack one by one.
        bulk_ack = connection.transport.driver_type == "amqp"

        def on_message(body: Any, message: Any) -> None:
            for event in body if isinstance(body, list) else (body,):
                self.monitor.on_event(event)
            pending.append(message)

        def settle() -> None:
            self.monitor.flush()
            if pending:
                if bulk_ack:
                    pending[-1].ack(multiple=True)
                else:
                    for message in pending:
                        message.ack()
                pending.clear()

        consumer = connection.Consumer(queues=[self.queue(connection)], callbacks=[on_message], accept=["json"],
                                       no_ack=False, prefetch_count=5000)
        with consumer:
            self.ready.set()
            now = time.monotonic()
            next_flush, next_sweep = now + self.flush_every, now
            while not self.stopped.is_set():
                try:
                    connection.drain_events(timeout=min(self.flush_every, 0.25))
                except TimeoutError:
                    pass
                now = time.monotonic()
                if now >= next_flush or len(pending) >= self.monitor.batch_size:
                    settle()
                    next_flush = now + self.flush_every
                if now >= next_sweep:
                    self.monitor.sweep()
                    next_sweep = now + self.sweep_every
            settle()


def build(app: Celery, settings: Settings) -> EventConsumer:
    """The monitor as `settings` configure it (the database must be connected)."""
    monitor = Monitor(settings.peer_timeout_seconds, settings.session_start_timeout)
    return EventConsumer(app, monitor, settings.monitor_queue)


def main() -> None:
    from tasks.celery import app

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models.connect(settings.mongodb_uri)
    consumer = build(app, settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: consumer.stop())
    log.info("monitor consuming events from %s", settings.monitor_queue)
    consumer.run()


if __name__ == "__main__":
    main()
